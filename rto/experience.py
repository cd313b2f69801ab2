"""The experience of one rollout: what PPO's update reads, each tensor with its shape.

B responses, P prompt slots, R response slots. Every [B, R] tensor is aligned with the response
tokens (slot t holds token t's quantity) and is 0 on padding; `batch.response_mask` [B, R] says
which slots hold tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rto.core.losses import explained_variance
from rto.core.masked import masked_mean
from rto.rollout import Batch


@dataclass
class Experience:
    batch: Batch  # prompt_ids/prompt_mask [B, P] (left-padded), response_ids/response_mask [B, R]
    prompts: list[str]  # the B prompt texts
    old_logp: torch.Tensor  # [B, R] log-prob of each token under the distribution that sampled it
    values: torch.Tensor  # [B, R] the critic's V(s_t) at sampling time (zeros without a critic)
    rewards: torch.Tensor  # [B, R] per-token reward (rto.core.rewards.token_rewards)
    advantages: torch.Tensor  # [B, R] GAE or REINFORCE++ advantages, whitened
    returns: torch.Tensor  # [B, R] the critic's targets (REINFORCE++: the return-to-go)
    kl: torch.Tensor  # [B, R] per-token KL estimate to the reference
    raw_score: torch.Tensor  # [B] the (first) RM's score (zeros without an RM)
    score: torch.Tensor  # [B] the score paid at the last token: standardised (an ensemble's combined), clipped, EOS-penalised
    dpo_term: torch.Tensor  # [B, R] beta1 * DPO log-ratio, clipped (zeros without a DPO model)
    dpo_clip_frac: torch.Tensor  # [] fraction of response tokens whose DPO term was clipped
    has_eos: torch.Tensor  # [B] bool: the response ended with EOS (not cut off by the length limit)
    custom: torch.Tensor | None  # [B, R] weighted sum of the custom token rewards, if any
    disagreement: torch.Tensor | None = None  # [B] std of an RM ensemble's standardised scores, if any

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.response_mask

    def nonfinite(self) -> list[str]:
        """Names of the tensors PPO trains on that hold a NaN or an infinity."""
        names = ("rewards", "old_logp", "values", "returns", "advantages")
        return [n for n in names if not torch.isfinite(getattr(self, n)).all()]

    def metrics(self, kl_coef: float) -> dict[str, float]:
        """The rollout's side of an iteration's log row (means over responses or tokens)."""
        mask = self.mask
        out = {
            "rm_score": float(self.raw_score.mean()),
            "reward/normalised_score": float(self.score.mean()),
            "reward/total": float(self.rewards.sum(-1).mean()),
            "kl": float(self.kl.sum(-1).mean()),
            "kl_coef": kl_coef,
            "response_length": float(mask.float().sum(-1).mean()),
            "eos_fraction": float(self.has_eos.float().mean()),
            "dpo_term/mean": float(masked_mean(self.dpo_term, mask)),
            "dpo_term/clip_frac": float(self.dpo_clip_frac),
            "critic/explained_variance": float(explained_variance(self.values, self.returns, mask)),
            "critic/value_mean": float(masked_mean(self.values, mask)),
        }
        if self.custom is not None:
            out["reward/custom"] = float(self.custom.sum(-1).mean())
        if self.disagreement is not None:
            out["reward/ensemble_disagreement"] = float(self.disagreement.mean())
        return out
