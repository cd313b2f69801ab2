"""The PPO update's approx-KL diagnostic estimates KL(old || new) from tokens the old policy sampled."""

import torch

from rto.core.losses import policy_loss


def test_approx_kl_estimates_kl_old_to_new_from_old_samples():
    old = torch.tensor([0.85, 0.10, 0.03, 0.02], dtype=torch.float64)
    new = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    kl_old_new = float((old * (old / new).log()).sum())  # 0.83
    kl_new_old = float((new * (new / old).log()).sum())  # 1.08: a swapped estimator lands here
    g = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(old, 400_000, replacement=True, generator=g).view(400, 1000)
    old_logp, new_logp = old.log()[tokens], new.log()[tokens]
    mask = torch.ones_like(old_logp)
    _, stats = policy_loss(new_logp, old_logp, torch.zeros_like(mask), mask)
    assert abs(float(stats["policy/approx_kl"]) - kl_old_new) < 0.02, (float(stats["policy/approx_kl"]), kl_old_new)
    assert abs(kl_old_new - kl_new_old) > 0.2  # the two directions are far apart here
