"""Advantage estimators: GAE with a critic, REINFORCE++ without one; whitening; `ESTIMATORS`.

Pure tensor functions. Shapes [B, R]; `mask` is 1 on response tokens. Values
are V(s_t), the value of the state before token t; the state after the last
token is terminal (value 0).

`ESTIMATORS` is the one registry of names (`rto ppo --estimator`): each entry says whether it
needs a critic, and the trainer loads, trains and saves a value network only for those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rto.core.masked import AllSum, local_sum, masked_mean_var


def whiten(x: torch.Tensor, mask: torch.Tensor, all_sum: AllSum = local_sum) -> torch.Tensor:
    """(x - mean) / std over the masked elements of the whole batch - of every process's batch
    when `all_sum` sums over processes; padding stays 0."""
    mean, var = masked_mean_var(x, mask, all_sum)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out * mask.to(x.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. Returns (advantages, returns = advantages + values).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}.
    The loop runs over response positions (tens to a few thousand), vectorised over the batch;
    it is the same reverse scan every PPO implementation uses.
    """
    m = mask.to(values.dtype)
    r, v = rewards * m, values * m
    advantages = torch.zeros_like(v)
    next_adv = torch.zeros_like(v[:, 0])
    next_value = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        next_value = v[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + v) * m


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go G_t = r_t + gamma * G_{t+1}, zero on padding."""
    m = mask.to(rewards.dtype)
    r = rewards * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = (r[:, t] + gamma * running) * m[:, t]
        out[:, t] = running
    return out


def reinforce_pp(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, all_sum: AllSum = local_sum
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (critic-free): discounted return of the token rewards, whitened over the batch.

    Returns (advantages, returns); the returns are the un-whitened return-to-go.
    """
    returns = discounted_returns(rewards, mask, gamma)
    return whiten(returns, mask, all_sum=all_sum), returns


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: `compute(rewards, mask, values, gamma=, lam=, whiten_advantages=,
    all_sum=) -> (advantages, returns)`, all [B, R]; `values` are zeros when it needs no critic."""

    name: str
    needs_critic: bool
    compute: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    summary: str


def _gae(rewards, mask, values, *, gamma, lam, whiten_advantages, all_sum):
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return (whiten(advantages, mask, all_sum=all_sum) if whiten_advantages else advantages), returns


def _reinforce_pp(rewards, mask, values, *, gamma, lam, whiten_advantages, all_sum):
    return reinforce_pp(rewards, mask, gamma, all_sum=all_sum)  # always whitened: it has no other baseline


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("gae", True, _gae, "GAE with a learned critic (PPO)"),
        Estimator(
            "reinforce++", False, _reinforce_pp, "REINFORCE++: the whitened return of the token rewards, no critic"
        ),
    )
}
