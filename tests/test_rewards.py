"""Reward assembly against values computed by hand."""

import pytest
import torch

from rto.core.rewards import (
    at_last_token,
    dpo_token_term,
    kl_estimate,
    last_token_index,
    normalise_score,
    token_rewards,
)

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


def test_beta1_zero_never_runs_the_dpo_model(tiny_dirs, prompt_file, tmp_path):
    """beta1 = 0 turns RTO into PPO by skipping the DPO pass, not by multiplying its log-ratio by 0:
    with a DPO model whose log-ratio is unbounded (an infinite final norm: non-finite logits), the
    rewards still equal PPO's exactly."""
    from rto.lm.models import load_causal_lm, load_tokenizer, save_model
    from rto.rl.trainer import PPOTrainer
    from tests.test_ppo import _cfg

    poisoned = load_causal_lm(tiny_dirs["dpo"])
    with torch.no_grad():
        poisoned.model.norm.weight.fill_(float("inf"))
    save_model(poisoned, load_tokenizer(tiny_dirs["dpo"]), tmp_path / "dpo_inf")

    def rewards(**kw):
        trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, dpo_model=str(tmp_path / "dpo_inf"), **kw))
        torch.manual_seed(123)
        return trainer.make_experience(trainer.prompts[:8]).rewards

    sparse = rewards(reward="sparse")
    assert torch.isfinite(sparse).all()
    assert torch.equal(rewards(reward="rto", beta1=0.0), sparse)
    assert not torch.isfinite(rewards(reward="rto", beta1=0.5, dpo_clip=None)).all()  # the model is poison


def test_dpo_term_scale_and_clip():
    dpo_logp = torch.tensor([[0.0, -1.0, -3.0]])
    ref_logp = torch.tensor([[-0.5, -1.0, -1.0]])
    # log-ratios 0.5, 0, -2 -> x0.05 -> 0.025, 0, -0.1 -> clip 0.05 -> 0.025, 0, -0.05
    mask = torch.ones_like(dpo_logp)
    term, cut = dpo_token_term(dpo_logp, ref_logp, mask, 0.05, 0.05)
    assert torch.allclose(term, torch.tensor([[0.025, 0.0, -0.05]])) and abs(float(cut) - 1 / 3) < 1e-6
    term, cut = dpo_token_term(dpo_logp, ref_logp, mask, 0.05, None)
    assert torch.allclose(term, torch.tensor([[0.025, 0.0, -0.1]])) and float(cut) == 0.0
    # Padding gets no term and does not count in the clipped fraction.
    term, cut = dpo_token_term(dpo_logp, ref_logp, torch.tensor([[1.0, 1.0, 0.0]]), 0.05, 0.05)
    assert torch.allclose(term, torch.tensor([[0.025, 0.0, 0.0]])) and float(cut) == 0.0


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor([1.0]))
    assert torch.allclose(kl_estimate(logp, ref, "k2"), torch.tensor([0.5]))
    # k3 = exp(ref - logp) - 1 - (ref - logp) = e^-1 - 1 + 1
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.tensor([torch.e**-1]))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k9")


def test_normalise_score():
    out = normalise_score(torch.tensor([3.0, 1000.0]), mean=1.0, std=2.0, clip=10.0)
    assert out.tolist() == [1.0, 10.0]


# --- every placement on one hand-computed example ---------------------------------------
# Row 0: 4 tokens ending in EOS. Row 1: 2 tokens, then padding (whose values must vanish).
# Row 2: 4 tokens cut off by the length limit (no EOS): the score still lands on its last token.
M3 = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
K3 = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 5.0, 5.0], [0, 0, 0, 2.0]])
S3 = torch.tensor([1.0, 2.0, 3.0])
D3 = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.2, 9.0, 9.0], [-0.1, -0.2, 0.0, 0.5]])
SEG3 = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])
EXPECTED = {
    "sparse": [[-0.1, 0, 0, 1.0], [0, 1.9, 0, 0], [0, 0, 0, 2.8]],
    "rto": [[0.0, 0.2, 0.3, 1.4], [0.5, 1.7, 0, 0], [-0.1, -0.2, 0.0, 3.3]],
    "dpo-only": [[0.0, 0.2, 0.3, 0.4], [0.5, -0.3, 0, 0], [-0.1, -0.2, 0.0, 0.3]],
    "ddpo": [[-0.1, 0, 0, 2.0], [0, 2.2, 0, 0], [0, 0, 0, 3.0]],
    "semi": [[-0.1, 0.3, 0, 1.7], [0, 2.2, 0, 0], [-0.1, 0, 0, 3.1]],
    "rs": [[0.0, 0.2, 0.3, 0.4], [0.5, 1.4, 0, 0], [-0.1, -0.2, 0.0, 3.1]],
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_every_placement_by_hand(kind):
    r = token_rewards(kind, mask=M3, kl=K3, kl_coef=0.1, score=S3, dpo_term=D3, segment_end=SEG3)
    assert torch.allclose(r, torch.tensor(EXPECTED[kind]), atol=1e-6), r


def _left_padded(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's real slots moved to the right end (the layout of a left-padded batch)."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        n = int(mask[b].sum())
        out[b, x.shape[1] - n :] = x[b, :n]
    return out


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_left_padded_mask_gets_the_same_rewards(kind):
    """verl and OpenRLHF hand in left-padded batches: the score still lands on the last real token
    (not on the first, as counting the mask's ones would put it), every placement as right-padded."""
    left = {k: _left_padded(v, M3) for k, v in (("kl", K3), ("dpo_term", D3), ("segment_end", SEG3))}
    mask = _left_padded(M3, M3)
    assert last_token_index(mask).tolist() == [3, 3, 3] and mask[1, 0] == 0
    r = token_rewards(kind, mask=mask, kl_coef=0.1, score=S3, **left)
    assert torch.allclose(r, _left_padded(torch.tensor(EXPECTED[kind]), M3), atol=1e-6), r


def test_semi_without_delimiters_is_ddpo():
    a = token_rewards("semi", mask=M3, kl=K3, kl_coef=0.1, score=S3, dpo_term=D3)
    b = token_rewards("ddpo", mask=M3, kl=K3, kl_coef=0.1, score=S3, dpo_term=D3)
    assert torch.allclose(a, b)


def test_rs_return_equals_sparse_return_by_construction():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, R = 5, 9
        lengths = torch.randint(0, R + 1, (B,), generator=g)
        mask = (torch.arange(R) < lengths[:, None]).long()
        kl, dpo = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
        score = torch.randn(B, generator=g)
        kw = dict(mask=mask, kl=kl, kl_coef=0.07, score=score, dpo_term=dpo)
        rs, rto, sparse = (token_rewards(k, **kw).sum(-1) for k in ("rs", "rto", "sparse"))
        assert torch.allclose(rs, sparse, atol=1e-5)  # the return is the RM score (minus KL)
        assert torch.allclose(rto - rs, (dpo * mask).sum(-1), atol=1e-5)  # the DPO terms, shifted


def test_eos_slot_convention():
    """The sentence score lands on the last response token, EOS included - never one slot after."""
    mask = torch.tensor([[1, 1, 1, 0, 0]])  # 2 symbols + EOS, then padding
    r = token_rewards("sparse", mask=mask, kl=torch.zeros(1, 5), kl_coef=0.0, score=torch.tensor([7.0]))
    assert r.tolist() == [[0.0, 0.0, 7.0, 0.0, 0.0]]


def test_extra_token_rewards_are_added_on_real_tokens_only():
    extra = torch.full((3, 4), 0.5)
    r = token_rewards("sparse", mask=M3, kl=K3, kl_coef=0.1, score=S3, extra=extra)
    base = token_rewards("sparse", mask=M3, kl=K3, kl_coef=0.1, score=S3)
    assert torch.allclose(r - base, 0.5 * M3.float())


def test_a_mask_with_gaps_is_refused():
    """Neither right- nor left-padded: where would "the last token" be? Refused, not guessed."""
    from rto.core.rewards import check_response_mask

    check_response_mask(torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]]))  # right, left, empty: fine
    with pytest.raises(ValueError, match=r"row 1 has gaps \(\[1, 0, 1\]\)"):
        token_rewards(
            "rto",
            mask=torch.tensor([[1, 1, 0], [1, 0, 1]]),
            kl=torch.zeros(2, 3),
            kl_coef=0.1,
            score=torch.ones(2),
            dpo_term=torch.zeros(2, 3),
        )
    with pytest.raises(ValueError, match="expected 0s and 1s"):
        check_response_mask(torch.tensor([[2, 1, 0]]))
