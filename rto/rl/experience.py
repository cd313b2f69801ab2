"""The experience of one rollout: what PPO's update reads, each tensor with its shape, and
`ExperienceMaker`, steps 1-4 of an iteration (sample, score, token rewards, advantages).

B responses, P prompt slots, R response slots. Every [B, R] tensor is aligned with the response
tokens (slot t holds token t's quantity) and is 0 on padding; `batch.response_mask` [B, R] says
which slots hold tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rto.core.advantages import ESTIMATORS
from rto.core.losses import explained_variance
from rto.core.masked import masked_mean
from rto.core.rewards import dpo_token_term, ensemble_score, kl_estimate, normalise_score, token_rewards
from rto.lm.rollout import Batch, encode_prompts, generate, pack
from rto.lm.scoring import response_logits, sequence_scores, token_logprobs, token_values
from rto.rl.config import PPOStageConfig
from rto.rl.custom_rewards import CustomRewards
from rto.rl.models import PPOModels, segment_delimiter_ids
from rto.runtime.distributed import Dist
from rto.runtime.sharding import gathered


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
    score: (
        torch.Tensor
    )  # [B] the score paid at the last token: standardised (an ensemble's combined), clipped, EOS-penalised
    dpo_term: torch.Tensor  # [B, R] beta1 * DPO log-ratio, clipped (zeros without a DPO model)
    dpo_clip_frac: torch.Tensor  # [] fraction of response tokens whose DPO term was clipped
    has_eos: torch.Tensor  # [B] bool: the response ended with EOS (not cut off by the length limit)
    custom: torch.Tensor | None  # [B, R] weighted sum of the custom token rewards, if any
    disagreement: torch.Tensor | None = None  # [B] std of an RM ensemble's standardised scores, if any
    ref_logp: torch.Tensor | None = None  # [B, R] the reference's log-probs (sampling temperature), for --kl-loss-coef

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


class ExperienceMaker:
    """Steps 1-4 of a PPO iteration: sample responses to this process's prompts, score them (no
    grad, each model once), pay the token rewards (rto.core.rewards) and estimate the advantages
    (rto.core.advantages), whitened over every process's rollout."""

    def __init__(
        self,
        cfg: PPOStageConfig,
        models: PPOModels,
        tokenizer,
        device: torch.device,
        dist: Dist,
        vllm,
        custom: CustomRewards,
    ):
        self.cfg, self.models, self.tokenizer, self.device, self.dist = cfg, models, tokenizer, device, dist
        self.vllm = vllm  # rto.rl.vllm.VLLMRollout with --generation-backend vllm, else None
        self.custom = custom
        self.delimiter_ids = segment_delimiter_ids(cfg, tokenizer)

    @torch.no_grad()
    def __call__(self, prompts: list[str], kl_coef: float) -> Experience:
        with self.models.autocast():
            return self.score_rollout(prompts, self.rollout(prompts), kl_coef)

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> Batch:
        """1: sample responses (a Batch with the sampled tokens' log-probs)."""
        cfg, policy = self.cfg, self.models.policy
        ids, mask = encode_prompts(self.tokenizer, prompts, cfg.max_prompt_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.vllm is not None:
            batch = self.vllm.generate(ids, mask)
            # vLLM's log-probs come from other kernels than the trained model's; PPO's ratio
            # needs the trainer's own, so they are computed again (one policy pass).
            batch.sampled_logprobs = self.score(
                lambda b, pk: token_logprobs(
                    response_logits(policy, b, pk), b.response_ids, cfg.temperature, cfg.top_k, cfg.top_p
                ),
                batch,
            )
            return batch
        with gathered(self.models.policy_root):
            return generate(policy, self.tokenizer, ids, mask, cfg.sampling, record_logprobs=True)

    def score(self, fn, batch: Batch) -> torch.Tensor:
        """fn(sub_batch, packed_or_None) over the rollout in chunks of --score-batch-size, concatenated."""
        outs = [
            fn(b, pack(b, self.cfg.pack_row_tokens, self.tokenizer.pad_token_id) if self.cfg.packing else None)
            for b in batch.chunks(self.cfg.score_batch_size)
        ]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @torch.no_grad()
    def score_rollout(self, prompts: list[str], batch: Batch, kl_coef: float) -> Experience:
        """2-4: scoring passes, token rewards, advantages (whitened over every process's rollout)."""
        cfg, models = self.cfg, self.models
        tokens, rmask = batch.response_ids, batch.response_mask
        m = rmask.float()
        old_logp = batch.sampled_logprobs  # [B, R], recorded while sampling: no second policy pass

        def ref_pass(b, pk):
            # One reference pass serves the KL (at the sampling temperature) and, when the DPO
            # model came from the same reference, the DPO log-ratio (at temperature 1).
            logits = response_logits(models.ref, b, pk)
            at_t = token_logprobs(logits, b.response_ids, cfg.temperature)
            at_1 = token_logprobs(logits, b.response_ids) if cfg.temperature != 1.0 else at_t
            return torch.stack([at_t, at_1], dim=1)

        ref_both = self.score(ref_pass, batch)  # [B, 2, R]
        kl = kl_estimate(old_logp, ref_both[:, 0], cfg.kl_estimator) * m

        dpo_term, dpo_clip_frac = torch.zeros_like(m), torch.zeros((), device=m.device)
        if cfg.uses_dpo:
            # The DPO reward is the implicit reward of DPO: the log-ratio at temperature 1.
            dpo_logp = self.score(
                lambda b, pk: token_logprobs(response_logits(models.dpo, b, pk), b.response_ids), batch
            )
            dpo_ref_logp = (
                self.score(lambda b, pk: token_logprobs(response_logits(models.dpo_ref, b, pk), b.response_ids), batch)
                if models.dpo_ref is not None
                else ref_both[:, 1]
            )
            dpo_term, dpo_clip_frac = dpo_token_term(dpo_logp, dpo_ref_logp, rmask, cfg.beta1, cfg.dpo_clip)
        raw_score = (
            self.score(lambda b, pk: sequence_scores(models.rm, b, pk), batch)
            if models.rm is not None
            else torch.zeros(len(prompts), device=self.device)
        )
        score = (
            normalise_score(raw_score, models.rm_stats.mean, models.rm_stats.std, cfg.score_clip)
            if cfg.normalize_score
            else raw_score
        )
        disagreement = None
        if models.rm_ensemble:  # a conservative score from several RMs, each standardised with its own stats
            members = [normalise_score(raw_score, models.rm_stats.mean, models.rm_stats.std, None)]
            members += [
                normalise_score(
                    self.score(lambda b, pk, rm=rm: sequence_scores(rm, b, pk), batch), stats.mean, stats.std, None
                )
                for rm, stats in models.rm_ensemble
            ]
            score, disagreement = ensemble_score(torch.stack(members), cfg.ensemble_reduce, cfg.ensemble_std_coef)
            score = score.clamp(-cfg.score_clip, cfg.score_clip) if cfg.score_clip is not None else score
        has_eos = ((tokens == self.tokenizer.eos_token_id) & (rmask > 0)).any(-1)
        if cfg.missing_eos_penalty is not None:
            score = torch.where(has_eos, score, score - cfg.missing_eos_penalty)
        segment_end = (
            torch.isin(tokens, torch.tensor(self.delimiter_ids, dtype=tokens.dtype, device=tokens.device))
            if self.delimiter_ids
            else None
        )
        custom = self.custom(batch.prompt_ids, batch.prompt_mask, tokens, rmask) if self.custom else None
        rewards = token_rewards(
            cfg.reward,
            mask=rmask,
            kl=kl,
            kl_coef=kl_coef,
            score=score,
            dpo_term=dpo_term,
            rm_weight=cfg.rm_weight,
            segment_end=segment_end,
            extra=custom,
        )

        values = (
            self.score(lambda b, pk: token_values(models.critic, b, pk), batch) * m
            if cfg.needs_critic
            else torch.zeros_like(m)
        )
        advantages, returns = ESTIMATORS[cfg.estimator].compute(
            rewards,
            rmask,
            values,
            gamma=cfg.gamma,
            lam=cfg.lam,
            whiten_advantages=cfg.whiten_advantages,
            all_sum=self.dist.all_sum,
            group_size=cfg.num_generations,  # the rollout holds whole groups, consecutive (trainer._next_prompts)
            scale_rewards=cfg.scale_rewards,
        )
        return Experience(
            batch=batch,
            prompts=prompts,
            old_logp=old_logp,
            values=values,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            kl=kl,
            raw_score=raw_score,
            score=score,
            dpo_term=dpo_term,
            dpo_clip_frac=dpo_clip_frac,
            has_eos=has_eos,
            custom=custom,
            disagreement=disagreement,
            ref_logp=ref_both[:, 0] if cfg.kl_loss_coef else None,
        )
