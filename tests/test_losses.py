"""PPO losses against values computed by hand."""

import math

import torch

from rto.core.losses import explained_variance, policy_loss, value_loss


def test_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])  # ratios 1.5, 0.5, 1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2 is padding.
    assert torch.allclose(loss, torch.tensor((-1.2 - 0.5) / 2))
    assert torch.allclose(stats["policy/clip_frac"], torch.tensor(0.5))


def test_policy_loss_sequence_mean_then_batch_mean():
    old = torch.zeros(2, 2)
    logp = torch.zeros(2, 2)  # ratio 1: the loss is -advantage on each real token
    adv = torch.tensor([[1.0, 3.0], [4.0, 9.0]])  # 9.0 sits on padding
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = policy_loss(logp, old, adv, mask)
    # Sequence mean: rows (1 + 3) / 2 = 2 and 4 / 1 = 4, then (2 + 4) / 2 = 3. A token mean over
    # the batch would give (1 + 3 + 4) / 3 = 8/3 instead; including padding, 17/4.
    assert torch.allclose(loss, torch.tensor(-3.0))


def test_value_loss_sequence_mean_then_batch_mean():
    values = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    returns = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = value_loss(values, values, returns, mask, clip=None)
    # 0.5 x squared error: rows (1 + 9) / 2 = 5 and 4 / 1 = 4 -> 0.5 x (5 + 4) / 2 = 2.25
    # (a token mean would give 0.5 x 14 / 3).
    assert torch.allclose(loss, torch.tensor(2.25))


def test_value_loss_clipped_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    mask = torch.tensor([[1, 1]])
    loss, _ = value_loss(values, old, returns, mask, clip=0.2)
    # token 0: unclipped err 0, clipped value 0.2 -> err 0.64 -> 0.64; token 1: 0.81 both ways.
    assert torch.allclose(loss, torch.tensor(0.5 * (0.64 + 0.81) / 2))
    loss_off, _ = value_loss(values, old, returns, mask, clip=None)
    assert torch.allclose(loss_off, torch.tensor(0.5 * 0.81 / 2))


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert torch.allclose(explained_variance(ret, ret, mask), torch.tensor(1.0))
    assert explained_variance(torch.zeros(1, 3) + 2.0, ret, mask) < 1e-6


def test_clip_higher_keeps_the_ratio_in_an_asymmetric_band():
    """DAPO's clip-higher (TRL's epsilon_high): with A > 0 the ratio is cut at 1 + clip_high, with A < 0
    at 1 - clip; by hand for ratios 1.25 (A = +1) and 0.7 (A = -1), clip 0.2, clip_high 0.28."""
    logp = torch.log(torch.tensor([[1.25, 0.7]]))
    old, mask, adv = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, -1.0]])
    loss, _ = policy_loss(logp, old, adv, mask, clip=0.2, agg="token-mean", clip_high=0.28)
    # token 1: max(-1.25, -min(1.25, 1.28)) = -1.25 (inside the band: unclipped);
    # token 2: max(0.7, 0.8) = 0.8 (below 1 - 0.2: clipped at 0.8)
    assert math.isclose(loss.item(), (-1.25 + 0.8) / 2, rel_tol=1e-6)
    symmetric, _ = policy_loss(logp, old, adv, mask, clip=0.2, agg="token-mean")
    assert math.isclose(symmetric.item(), (-1.2 + 0.8) / 2, rel_tol=1e-6)  # cut at 1.2 without clip_high
