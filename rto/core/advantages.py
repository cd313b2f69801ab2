"""Advantage estimators: GAE with a critic; REINFORCE++, GRPO and RLOO without one; whitening;
`ESTIMATORS`.

Pure tensor functions. Shapes [B, R]; `mask` is 1 on response tokens. Values
are V(s_t), the value of the state before token t; the state after the last
token is terminal (value 0).

`ESTIMATORS` is the one registry of names (`rto ppo --estimator`): each entry says whether it
needs a critic (the trainer loads, trains and saves a value network only for those) and whether
it needs groups (k responses per prompt, laid out as consecutive rows).

GRPO and RLOO take any token reward, dense or sparse: the advantage of token t is its
return-to-go G_t minus a baseline from the other responses to the same prompt (their whole
returns G_0): the group mean (GRPO; divided by the group's std unless told not to, as Dr. GRPO
argues) or the mean of the others (RLOO, leave-one-out). With RTO's dense reward, G_t carries the
DPO terms still to come while the baseline removes what the prompt makes likely anyway; with a
sparse reward at gamma 1, G_t is the response's return on every token: the usual GRPO/RLOO.
See docs/algorithm.md.
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
    all_sum=, group_size=, scale_rewards=) -> (advantages, returns)`, all [B, R]; `values` are
    zeros when it needs no critic; each takes the keywords it uses."""

    name: str
    needs_critic: bool
    compute: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    summary: str
    needs_groups: bool = False  # k >= 2 responses per prompt (`--num-generations`)


def group_baselined(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    leave_one_out: bool,
    scale: str = "none",
    gamma: float = 1.0,
    all_sum: AllSum = local_sum,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns-to-go) for rows in groups of `group_size` consecutive responses to one
    prompt: A_t = (G_t - b) / s, b the group's mean return (or, leave-one-out, the others' mean),
    s the group's std of returns (scale "group"), the whole batch's ("batch", over every process)
    or 1 ("none"). The std is the unbiased one and eps is added to it, as TRL's GRPO does."""
    returns = discounted_returns(rewards, mask, gamma)
    n = returns.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} responses do not split into groups of {group_size}")
    if leave_one_out and group_size < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 responses per prompt")
    first = mask.long().argmax(-1, keepdim=True)  # each response's first token (right- or left-padded)
    total = (returns.gather(1, first) * mask.gather(1, first).to(returns.dtype)).view(-1, group_size)
    if leave_one_out:
        baseline = (total.sum(1, keepdim=True) - total) / (group_size - 1)
    else:
        baseline = total.mean(1, keepdim=True).expand_as(total)
    advantages = returns - baseline.reshape(n, 1)
    if scale == "group":
        advantages = advantages / (total.std(1, keepdim=True).expand_as(total).reshape(n, 1) + eps)
    elif scale == "batch":
        _, var = masked_mean_var(total.reshape(n), torch.ones(n, device=total.device), all_sum)
        advantages = advantages / (var.sqrt() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return advantages * mask.to(advantages.dtype), returns


def _grpo(rewards, mask, values, *, gamma, all_sum, group_size, scale_rewards, **_):
    return group_baselined(
        rewards, mask, group_size, leave_one_out=False, scale=scale_rewards, gamma=gamma, all_sum=all_sum
    )


def _rloo(rewards, mask, values, *, gamma, all_sum, group_size, **_):
    return group_baselined(rewards, mask, group_size, leave_one_out=True, gamma=gamma, all_sum=all_sum)


def _gae(rewards, mask, values, *, gamma, lam, whiten_advantages, all_sum, **_):
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return (whiten(advantages, mask, all_sum=all_sum) if whiten_advantages else advantages), returns


def _reinforce_pp(rewards, mask, values, *, gamma, all_sum, **_):
    return reinforce_pp(rewards, mask, gamma, all_sum=all_sum)  # always whitened: it has no other baseline


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("gae", True, _gae, "GAE with a learned critic (PPO)"),
        Estimator(
            "reinforce++", False, _reinforce_pp, "REINFORCE++: the whitened return of the token rewards, no critic"
        ),
        Estimator(
            "grpo",
            False,
            _grpo,
            "GRPO: each token's return minus its group's mean return (over --scale-rewards std), no critic",
            needs_groups=True,
        ),
        Estimator(
            "rloo",
            False,
            _rloo,
            "RLOO: each token's return minus the mean return of the group's other responses, no critic",
            needs_groups=True,
        ),
    )
}
