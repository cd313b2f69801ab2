"""Reward assembly against values computed by hand."""

import pytest
import torch

from rto.core.rewards import (at_last_token, dpo_token_term, kl_estimate, last_token_index, normalise_score,
                              token_rewards)

# Two responses: row 0 has 3 tokens (EOS last), row 1 has 2 tokens then padding.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
KL = torch.tensor([[0.1, -0.2, 0.3], [0.5, 0.4, 9.9]])  # 9.9 sits on padding and must vanish
SCORE = torch.tensor([2.0, -1.0])
DPO = torch.tensor([[0.01, -0.02, 0.03], [0.04, -0.05, 7.0]])


def test_last_token_index_and_placement():
    assert last_token_index(MASK).tolist() == [2, 1]
    assert at_last_token(SCORE, MASK).tolist() == [[0, 0, 2.0], [0, -1.0, 0]]
    # An empty response gets nothing anywhere.
    assert at_last_token(torch.tensor([5.0]), torch.tensor([[0, 0]])).tolist() == [[0, 0]]


def test_sparse_by_hand():
    r = token_rewards("sparse", mask=MASK, kl=KL, kl_coef=0.1, score=SCORE)
    expected = torch.tensor([[-0.01, 0.02, -0.03 + 2.0], [-0.05, -0.04 - 1.0, 0.0]])
    assert torch.allclose(r, expected)


def test_rto_by_hand():
    r = token_rewards("rto", mask=MASK, kl=KL, kl_coef=0.1, score=SCORE, dpo_term=DPO, rm_weight=0.5)
    expected = torch.tensor([[-0.01 + 0.01, 0.02 - 0.02, -0.03 + 0.03 + 1.0], [-0.05 + 0.04, -0.04 - 0.05 - 0.5, 0.0]])
    assert torch.allclose(r, expected)


def test_beta1_zero_makes_rto_equal_sparse():
    dpo_logp, ref_logp = torch.randn(2, 3), torch.randn(2, 3)
    term = dpo_token_term(dpo_logp, ref_logp, beta1=0.0, clip=0.05)
    a = token_rewards("sparse", mask=MASK, kl=KL, kl_coef=0.05, score=SCORE)
    b = token_rewards("rto", mask=MASK, kl=KL, kl_coef=0.05, score=SCORE, dpo_term=term)
    assert torch.equal(a, b)


def test_dpo_term_scale_and_clip():
    dpo_logp = torch.tensor([[0.0, -1.0, -3.0]])
    ref_logp = torch.tensor([[-0.5, -1.0, -1.0]])
    # log-ratios 0.5, 0, -2 -> x0.05 -> 0.025, 0, -0.1 -> clip 0.05 -> 0.025, 0, -0.05
    assert torch.allclose(dpo_token_term(dpo_logp, ref_logp, 0.05, 0.05), torch.tensor([[0.025, 0.0, -0.05]]))
    assert torch.allclose(dpo_token_term(dpo_logp, ref_logp, 0.05, None), torch.tensor([[0.025, 0.0, -0.1]]))


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor([1.0]))
    assert torch.allclose(kl_estimate(logp, ref, "k2"), torch.tensor([0.5]))
    # k3 = exp(ref - logp) - 1 - (ref - logp) = e^-1 - 1 + 1
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.tensor([torch.e ** -1]))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k9")


def test_normalise_score():
    out = normalise_score(torch.tensor([3.0, 1000.0]), mean=1.0, std=2.0, clip=10.0)
    assert out.tolist() == [1.0, 10.0]
