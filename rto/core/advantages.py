"""Advantage estimators: GAE with a critic, REINFORCE++ without one; whitening.

Pure tensor functions. Shapes [B, R]; `mask` is 1 on response tokens. Values
are V(s_t), the value of the state before token t; the state after the last
token is terminal (value 0).
"""

from __future__ import annotations

import torch

from rto.core.masked import AllSum, local_sum, masked_mean_var


def whiten(x: torch.Tensor, mask: torch.Tensor, all_sum: AllSum = local_sum) -> torch.Tensor:
    """(x - mean) / std over the masked elements of the whole batch - of every process's batch
    when `all_sum` sums over processes; padding stays 0."""
    mean, var = masked_mean_var(x, mask, all_sum)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out * mask.to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
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


def reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                 all_sum: AllSum = local_sum) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (critic-free): discounted return of the token rewards, whitened over the batch.

    Returns (advantages, returns); the returns are the un-whitened return-to-go.
    """
    returns = discounted_returns(rewards, mask, gamma)
    return whiten(returns, mask, all_sum=all_sum), returns
