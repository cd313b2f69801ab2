"""Per-token rewards: where the KL penalty, the RM score and the DPO term go.

Pure tensor functions, no models, no I/O. Shapes: B responses x R response
slots; `mask` is 1 on real response tokens (EOS included) and 0 on padding.
This trainer right-pads responses; a left-padded mask (verl's, OpenRLHF's batches) works the
same: "the last token" is each row's last position where the mask is 1.

The EOS-slot convention: a sentence-level score lands on the *last response
token*, which is the EOS token when the response has one and the final
generated token when it was cut off by the length limit. (TRL's old PPO put it
one slot after EOS; OpenRLHF, verl and the RTO reference code use this slot.)

The reward of token t (reference: ../shared/reference/rto.md):

    r_t = dense_dpo_t - kl_coef * kl_t + [t == last] * rm_weight * score

with dense_dpo_t = clip(beta1 * (log pi_dpo - log pi_dpo_ref), -dpo_clip, dpo_clip).
The placements (`PLACEMENTS`, the one registry the CLI's choices and the pipeline's method
names come from) differ only in where the DPO term is paid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last response token, the last position where `mask` is 1, wherever the
    padding lies (right-padded here; left-padded as other trainers hand their batches in); 0 for
    an empty response."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.zeros_like(positions)).max(-1).values


def check_response_mask(mask: torch.Tensor) -> None:
    """The padding convention, refused when broken: each row's response tokens are one unbroken
    run of ones (padding after them, or before them), and the mask is 0/1 of shape [B, R]."""
    if mask.dim() != 2:
        raise ValueError(f"response mask: expected [batch, response slots], got shape {tuple(mask.shape)}")
    m = mask.long()
    if ((m != 0) & (m != 1)).any():
        raise ValueError("response mask: expected 0s and 1s")
    starts = (m[:, 1:] > m[:, :-1]).sum(-1) + m[:, 0]  # runs of ones begun in each row
    if (starts > 1).any():
        row = int(torch.nonzero(starts > 1)[0, 0])
        raise ValueError(
            f"response mask: row {row} has gaps ({m[row].tolist()}); a response's tokens must be one "
            "unbroken run (right- or left-padded)"
        )


def at_last_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A [B, R] tensor that is zero except `values[b]` at row b's last response token."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out.scatter_(1, last_token_index(mask).unsqueeze(1), values.unsqueeze(1))
    return out * mask.to(values.dtype)


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.expm1(-log_ratio) + log_ratio


# Per-token estimators of KL(pi || pi_ref) from r = pi / pi_ref at tokens sampled from pi:
# k1 = log r (unbiased, can be negative per token), k2 = (log r)^2 / 2, k3 = r^-1 - 1 + log r
# (unbiased and non-negative). The one registry of their names (`--kl-estimator`).
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) (`KL_ESTIMATORS`) from log-probs of tokens sampled from pi."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {tuple(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp - ref_logp)


def dpo_token_term(
    dpo_logp: torch.Tensor, dpo_ref_logp: torch.Tensor, mask: torch.Tensor, beta1: float, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """beta1 * (log pi_dpo - log pi_dpo_ref), clamped to [-clip, clip] (clip None = no clamp), 0 on
    padding; and the fraction of response tokens whose term the clamp cut."""
    m = mask.to(dpo_logp.dtype)
    term = beta1 * (dpo_logp - dpo_ref_logp)
    if clip is None:
        return term * m, torch.zeros((), device=term.device)
    cut = (term.abs() > clip).to(term.dtype)
    return term.clamp(-clip, clip) * m, (cut * m).sum() / m.sum().clamp(min=1)


def normalise_score(score: torch.Tensor, mean: float, std: float, clip: float | None) -> torch.Tensor:
    """RM score standardised with the statistics stored at RM training time, then clamped."""
    out = (score - mean) / max(std, 1e-8)
    return out.clamp(-clip, clip) if clip is not None else out


# How an ensemble's standardised scores [M, B] become one score [B] (`--ensemble-reduce`): mean;
# mean_minus_std: mean - std_coef * std over the members (uncertainty-weighted optimisation); min:
# the worst case (Coste et al., ICLR 2024).
ENSEMBLE_REDUCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "mean": lambda scores, spread, std_coef: scores.mean(0),
    "mean_minus_std": lambda scores, spread, std_coef: scores.mean(0) - std_coef * spread,
    "min": lambda scores, spread, std_coef: scores.min(0).values,
}


def ensemble_score(scores: torch.Tensor, reduce: str, std_coef: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """M reward models' standardised scores of B responses [M, B] -> (one score [B], disagreement [B]).

    `reduce` names one of `ENSEMBLE_REDUCTIONS`. Disagreement is the std over the members
    (population std: two members give half their difference), a warning sign of responses the
    RMs were not trained to judge."""
    if reduce not in ENSEMBLE_REDUCTIONS:
        raise ValueError(f"reduce must be one of {tuple(ENSEMBLE_REDUCTIONS)}, got {reduce!r}")
    spread = scores.std(0, correction=0)
    return ENSEMBLE_REDUCTIONS[reduce](scores, spread, std_coef), spread


def segment_sums_at_ends(term: torch.Tensor, mask: torch.Tensor, segment_end: torch.Tensor) -> torch.Tensor:
    """Sum `term` over each segment and pay the sum at the segment's last token.

    `segment_end` marks delimiter tokens; the last response token always ends a segment.
    """
    m = mask.to(term.dtype)
    ends = ((segment_end.to(term.dtype) * m) + at_last_token(torch.ones_like(m[:, 0]), mask)).clamp(max=1)
    running = torch.cumsum(term * m, dim=-1)
    # For every slot, the index of the previous segment end (-1 if none): the
    # running total there is what earlier segments already paid out.
    idx = torch.arange(term.shape[1], device=term.device).expand_as(running)
    last_end = torch.cummax(torch.where(ends > 0, idx, torch.full_like(idx, -1)), dim=-1).values
    prev_end = torch.cat([torch.full_like(last_end[:, :1], -1), last_end[:, :-1]], dim=-1)
    prev_total = torch.where(prev_end >= 0, running.gather(1, prev_end.clamp(min=0)), torch.zeros_like(running))
    return (running - prev_total) * ends


# Where each placement pays the dense DPO term [B, R] (zero on padding): pay(dense, mask, segment_end).
def _every_token(dense, mask, segment_end):
    return dense


def _summed_at_last(dense, mask, segment_end):
    return at_last_token(dense.sum(-1), mask)


def _shaped(dense, mask, segment_end):
    return dense - at_last_token(dense.sum(-1), mask)


def _summed_at_segment_ends(dense, mask, segment_end):
    return segment_sums_at_ends(dense, mask, segment_end if segment_end is not None else torch.zeros_like(mask))


@dataclass(frozen=True)
class Placement:
    """Where one reward variant pays the DPO term (`pay`, None for no DPO term), and which models it needs."""

    name: str  # the value of `rto ppo --reward`
    method: str  # the method's name in `rto pipeline --methods` and in reports
    pay: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None
    uses_rm: bool  # adds the RM score at the last token
    summary: str

    @property
    def uses_dpo(self) -> bool:
        return self.pay is not None


PLACEMENTS: dict[str, Placement] = {
    p.name: p
    for p in (
        Placement("sparse", "ppo", None, True, "no DPO term (standard RLHF PPO)"),
        Placement("rto", "rto", _every_token, True, "every token gets its own DPO term (RTO)"),
        Placement(
            "dpo-only", "dpo-only", _every_token, False, "every token gets its own DPO term, and there is no RM score"
        ),
        Placement("ddpo", "ddpo", _summed_at_last, True, "the summed DPO term is paid at the last token (delayed)"),
        Placement(
            "semi",
            "semi",
            _summed_at_segment_ends,
            True,
            "the summed DPO term of each segment is paid at the segment's end (a delimiter token, or the last token)",
        ),
        Placement(
            "rs",
            "rs",
            _shaped,
            True,
            "rto, minus the summed DPO term at the last token: a potential-based "
            "shaping whose total equals the sparse return",
        ),
    )
}
REWARD_KINDS = tuple(PLACEMENTS)


def token_rewards(
    kind: str,
    *,
    mask: torch.Tensor,
    kl: torch.Tensor,
    kl_coef: float,
    score: torch.Tensor | None = None,
    dpo_term: torch.Tensor | None = None,
    rm_weight: float = 1.0,
    segment_end: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """The [B, R] reward PPO optimises for reward placement `kind` (a key of `PLACEMENTS`).

    `extra` is any further per-token reward (the weighted sum of custom token rewards),
    added on real response tokens.
    """
    placement = PLACEMENTS.get(kind)
    if placement is None:
        raise ValueError(f"unknown reward {kind!r}; expected one of {REWARD_KINDS}")
    check_response_mask(mask)
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    if extra is not None:
        rewards = rewards + extra.to(kl.dtype) * m
    if placement.uses_rm:
        if score is None:
            raise ValueError(f"reward {kind!r} needs the RM score")
        rewards = rewards + at_last_token(rm_weight * score.to(kl.dtype), mask)
    if placement.pay is None:
        return rewards
    if dpo_term is None:
        raise ValueError(f"reward {kind!r} needs the DPO term")
    return rewards + placement.pay(dpo_term.to(kl.dtype) * m, mask, segment_end)
