"""Means and variances over masked tokens: the statistics every loss, advantage and metric uses.

Pure tensor functions. `mask` is 1 on the elements that count (response tokens) and 0 on
padding; shapes [B, R] unless said otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Sums a tensor over all training processes (identity in one process): statistics then cover the
# global rollout, exactly as if one process held it all.
AllSum = Callable[[torch.Tensor], torch.Tensor]


def local_sum(t: torch.Tensor) -> torch.Tensor:
    return t


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the masked elements (all of them, or along `dim`); 0 where nothing is masked in."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_mean_var(
    x: torch.Tensor, mask: torch.Tensor, all_sum: AllSum = local_sum
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance over the masked elements (the variance unbiased, as in the reference
    implementations) - over every process's elements when `all_sum` sums over processes."""
    m = mask.to(x.dtype)
    totals = all_sum(torch.stack([(x * m).sum(), m.sum()]))
    n = totals[1]
    mean = totals[0] / n.clamp(min=1)
    var = all_sum(((x - mean).square() * m).sum()) / n.clamp(min=1)
    return mean, var * n / (n - 1).clamp(min=1)


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's tokens, then over rows (rows without tokens count as 0): long and
    short responses weigh the same (the RTO reference code's aggregation of the PPO losses)."""
    return masked_mean(x, mask, dim=-1).mean()
