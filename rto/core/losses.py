"""PPO losses and diagnostics. Pure tensor functions over [B, R] response slots.

Aggregation: a token mean within each response, then a mean over responses (the
RTO reference code's choice), so long and short responses weigh the same. With
equal-sized micro-batches this makes accumulated gradients equal the
whole-mini-batch gradient.
"""

from __future__ import annotations

import torch

from rto.core.masked import masked_mean, sequence_mean


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective. Returns (loss, detached stats)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = sequence_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy/clip_frac": masked_mean((clipped > unclipped).float(), mask),
            # k3 estimate of KL(old || new) from tokens sampled from the old policy: with
            # r = new / old, E_old[(r - 1) - log r] = KL(old || new) (unbiased, each term >= 0).
            "policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


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
