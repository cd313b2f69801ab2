"""PPO losses and diagnostics. Pure tensor functions over [B, R] response slots.

Aggregation (`LOSS_AGGREGATIONS`, `--loss-agg`, verl's `agg_loss` modes): by default a token
mean within each response, then a mean over responses (the RTO reference code's choice and
GRPO's), so long and short responses weigh the same; `token-mean` weighs every token the same
(DAPO, Dr. GRPO); `seq-mean-token-sum` sums each response's tokens (Dr. GRPO's unbiased form,
with a constant length normaliser left to the learning rate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rto.core.masked import masked_mean, sequence_mean


def sequence_sum_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row's tokens, then mean over rows."""
    return (x * mask.to(x.dtype)).sum(-1).mean()


# How per-token losses [B, R] become one number: the one registry of these names (`--loss-agg`).
LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "seq-mean-token-mean": sequence_mean,
    "token-mean": masked_mean,
    "seq-mean-token-sum": sequence_sum_mean,
}


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    agg: str = "seq-mean-token-mean",
    clip_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective, aggregated as `agg` says; the ratio is kept in
    [1 - clip, 1 + clip_high] (clip_high None: clip; DAPO's "clip-higher" sets it above clip).
    Returns (loss, detached stats)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    loss = LOSS_AGGREGATIONS[agg](torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy/clip_frac": masked_mean((clipped > unclipped).float(), mask),
            # k3 estimate of KL(old || new) from tokens sampled from the old policy: with
            # r = new / old, E_old[(r - 1) - log r] = KL(old || new) (unbiased, each term >= 0).
            "policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def kl_penalty_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, agg: str = "seq-mean-token-mean"
) -> torch.Tensor:
    """GRPO's KL term in the loss: the k3 estimate of KL(pi || pi_ref) per token, r^-1 - 1 + log r
    with r = pi / pi_ref at the sampled tokens (non-negative, with gradients through logp)."""
    log_ratio = logp - ref_logp
    return LOSS_AGGREGATIONS[agg](torch.expm1(-log_ratio) + log_ratio, mask)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 x squared error, clipped around the rollout-time values (clip None = unclipped)."""
    err = (values - returns).square()
    if clip is not None:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped_err = (clipped_values - returns).square()
        worst = torch.maximum(err, clipped_err)
        frac = masked_mean((clipped_err > err).float(), mask)
    else:
        worst, frac = err, torch.zeros(())
    loss = 0.5 * sequence_mean(worst, mask)
    return loss, {"critic/clip_frac": frac.detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension (tokens at -inf, cut by top-k/top-p, add 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over response tokens (1 = perfect critic)."""
    var_ret = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
    resid = returns - values
    var_res = masked_mean((resid - masked_mean(resid, mask)).square(), mask)
    return 1.0 - var_res / var_ret.clamp(min=1e-8)
