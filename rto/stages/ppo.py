"""`rto ppo`: PPO with a critic, and RTO's dense DPO reward. Every PPO detail is in this file.

One iteration (`PPOTrainer._train`):
 1. rollout: sample `rollout_batch_size` prompts, generate with the policy; the sampled
    tokens' (old) log-probs are recorded while generating;
 2. score, no grad, each model once: reference log-probs, DPO-model log-probs (RTO variants),
    RM score, critic values (padded, or packed without padding: `--packing`);
 3. rewards: `rto.core.rewards.token_rewards` (KL penalty + RM at the last token + the DPO term
    where the placement puts it);
 4. advantages: GAE (or REINFORCE++), whitened over the rollout (of every process);
 5. `ppo_epochs` passes over the rollout, reshuffled each pass, in mini-batches (one optimizer
    step each) made of micro-batches (gradient accumulation); policy and critic have separate
    optimizers, gradient clipping and schedules;
 6. adapt the KL coefficient (if a target is set), log, evaluate on dev prompts.

PPO (`--reward sparse`) and RTO (`--reward rto`) share every line but step 3. All models stay in
eval mode; only policy and critic get gradients. Settings: ppo_config.py; models: ppo_models.py;
checkpoints: ppo_checkpoint.py; the algorithm's tensor functions: rto/core/.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rto import progress
from rto.config import to_dict
from rto.core.advantages import gae, reinforce_pp, whiten
from rto.core.kl_control import AdaptiveKL, FixedKL
from rto.core.losses import entropy_from_logits, policy_loss, value_loss
from rto.core.masked import masked_mean
from rto.core.rewards import dpo_token_term, ensemble_score, kl_estimate, normalise_score, token_rewards
from rto.core.selection import Selection
from rto.custom_rewards import CustomRewards
from rto.distributed import Dist, is_collective_failure
from rto.evaluate import dev_point
from rto.experience import Experience
from rto.faults import inject_faults
from rto.judges import load_judge
from rto.models import load_tokenizer
from rto.prompt_pool import read_prompts
from rto.rollout import (Batch, decode_responses, encode_prompts, generate, pack, response_logits, sampling_logits,
                         sequence_scores, token_logprobs, token_values)
from rto.stages.common import setup
from rto.stages.ppo_checkpoint import CheckpointMixin
from rto.stages.ppo_config import PPOStageConfig
from rto.sharding import gathered, plan_layout, scalar
from rto.stages.ppo_models import (check_tokenizers, device_and_precision, load_models, make_optimizer,
                                  segment_delimiter_ids)
from rto.tasks import load_task
from rto.tracking import MetricsLog


class PPOTrainer(CheckpointMixin):
    def __init__(self, cfg: PPOStageConfig):
        self.cfg = cfg
        setup(cfg.seed, cfg.threads)
        device, bf16 = device_and_precision(cfg.device, cfg.precision)
        # Several processes: each samples and trains on its share of every rollout; the models are
        # sharded across them or replicated (rto/sharding.py).
        self.dist = Dist(cpu=device.type == "cpu", timeout_s=cfg.dist_timeout)
        self.device = self.dist.device if self.dist.active else device
        self.layout = plan_layout(cfg.shard, cfg.shard_frozen, self.dist, bf16)
        if self.dist.active and self.dist.is_main:
            print(f"[rto] ppo: {self.layout.describe()}", file=sys.stderr, flush=True)
        self.local_rollout = cfg.rollout_batch_size // self.dist.world
        self.local_mini = cfg.mini_batch_size // self.dist.world
        self.tokenizer = load_tokenizer(cfg.policy, chat_template_path=cfg.chat_template_path)
        check_tokenizers(cfg, self.tokenizer)
        if cfg.generation_backend == "vllm":  # before loading anything: it may not be here at all
            from rto.vllm_backend import require_vllm

            require_vllm(self.device, cfg)  # its sampling settings too: vLLM's limits differ from generate's
        self.prompts = self._read_prompts(cfg.prompts, cfg.prompts_split)
        self.eval_prompts = (self._read_prompts(cfg.eval_prompts)[:cfg.n_eval] if cfg.eval_prompts and cfg.eval_every
                             else [])
        self.models = load_models(cfg, self.device, bf16, self.dist, self.layout)
        self.vllm = None
        if cfg.generation_backend == "vllm":
            from rto.vllm_backend import VLLMRollout

            self.vllm = VLLMRollout.for_run(cfg, self.tokenizer, self.device, self.dist, self.models)
        self.task = load_task(cfg.task) if cfg.task else None
        self.judge = load_judge(cfg.judge, self.tokenizer, self.device) if cfg.judge and self.dist.is_main else None
        self.delimiter_ids = segment_delimiter_ids(cfg, self.tokenizer)
        self.custom = CustomRewards(cfg.custom_rewards, self.tokenizer, self.task)

        self.steps_per_iteration = cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
        self.total_steps = cfg.iterations * self.steps_per_iteration
        self.policy_opt, self.policy_sched = make_optimizer(self.models.policy, cfg.actor_lr, cfg, self.total_steps)
        if self.models.critic is not None:
            self.critic_opt, self.critic_sched = make_optimizer(self.models.critic, cfg.critic_lr, cfg, self.total_steps)
        self.kl_ctl = (AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else FixedKL(cfg.kl_coef))
        self.generator = torch.Generator().manual_seed(cfg.seed)  # prompt order and mini-batch shuffles
        self.bad_steps = 0  # consecutive non-finite updates
        self.order: list[int] = []  # prompts left in this pass over the pool
        self.history: list[dict] = []  # one row of metrics per iteration
        self.curve: list[dict] = []  # one row per dev evaluation
        # Dev selection of the result (best point, early stop, KL budget): rto.core.selection.
        self.selection = Selection(cfg.select_by, cfg.patience, cfg.kl_budget) if cfg.select_by else None

    # --- set-up helpers ------------------------------------------------------------------
    def _read_prompts(self, path: str, split: str = "train"):
        """A prompt pool (rto.prompt_pool): read once into a cached Arrow file, drawn lazily."""
        return read_prompts(path, self.tokenizer, max_len=self.cfg.max_prompt_len, long_prompts=self.cfg.long_prompts,
                            columns=self.cfg.columns, skip_bad_rows=self.cfg.skip_bad_rows, split=split)

    def _next_prompts(self) -> list[str]:
        """This process's share of the next rollout's prompts: the global rollout passes over the
        pool, reshuffled each pass (the same order in every process); process r reads block r."""
        picks = []
        while len(picks) < self.cfg.rollout_batch_size:
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            picks.append(self.order.pop())
        return self.prompts.take(picks[self.dist.rank * self.local_rollout:(self.dist.rank + 1) * self.local_rollout])

    # --- 1-4: rollout, scoring, rewards, advantages --------------------------------------
    @torch.no_grad()
    def make_experience(self, prompts: list[str]) -> Experience:
        with self.models.autocast():
            return self.score_rollout(prompts, self.rollout(prompts))

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
            batch.sampled_logprobs = self._score(lambda b, pk: token_logprobs(
                response_logits(policy, b, pk), b.response_ids, cfg.temperature, cfg.top_k, cfg.top_p), batch)
            return batch
        with gathered(self.models.policy_root):
            return generate(policy, self.tokenizer, ids, mask, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, record_logprobs=True)

    def _score(self, fn, batch: Batch) -> torch.Tensor:
        """fn(sub_batch, packed_or_None) over the rollout in chunks of --score-batch-size, concatenated."""
        outs = [fn(b, pack(b, self.cfg.pack_row_tokens, self.tokenizer.pad_token_id) if self.cfg.packing else None)
                for b in batch.chunks(self.cfg.score_batch_size)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @torch.no_grad()
    def score_rollout(self, prompts: list[str], batch: Batch) -> Experience:
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

        ref_both = self._score(ref_pass, batch)  # [B, 2, R]
        kl = kl_estimate(old_logp, ref_both[:, 0], cfg.kl_estimator) * m

        dpo_term, dpo_clip_frac = torch.zeros_like(m), torch.zeros((), device=m.device)
        if cfg.uses_dpo:
            # The DPO reward is the implicit reward of DPO: the log-ratio at temperature 1.
            dpo_logp = self._score(lambda b, pk: token_logprobs(response_logits(models.dpo, b, pk), b.response_ids), batch)
            dpo_ref_logp = (self._score(lambda b, pk: token_logprobs(response_logits(models.dpo_ref, b, pk),
                                                                     b.response_ids), batch)
                            if models.dpo_ref is not None else ref_both[:, 1])
            dpo_term, dpo_clip_frac = dpo_token_term(dpo_logp, dpo_ref_logp, rmask, cfg.beta1, cfg.dpo_clip)
        raw_score = (self._score(lambda b, pk: sequence_scores(models.rm, b, pk), batch) if models.rm is not None
                     else torch.zeros(len(prompts), device=self.device))
        score = (normalise_score(raw_score, models.rm_stats.mean, models.rm_stats.std, cfg.score_clip)
                 if cfg.normalize_score else raw_score)
        disagreement = None
        if models.rm_ensemble:  # a conservative score from several RMs, each standardised with its own stats
            members = [normalise_score(raw_score, models.rm_stats.mean, models.rm_stats.std, None)]
            members += [normalise_score(self._score(lambda b, pk, rm=rm: sequence_scores(rm, b, pk), batch),
                                        stats.mean, stats.std, None) for rm, stats in models.rm_ensemble]
            score, disagreement = ensemble_score(torch.stack(members), cfg.ensemble_reduce, cfg.ensemble_std_coef)
            score = score.clamp(-cfg.score_clip, cfg.score_clip) if cfg.score_clip is not None else score
        has_eos = ((tokens == self.tokenizer.eos_token_id) & (rmask > 0)).any(-1)
        if cfg.missing_eos_penalty is not None:
            score = torch.where(has_eos, score, score - cfg.missing_eos_penalty)
        segment_end = (torch.isin(tokens, torch.tensor(self.delimiter_ids, dtype=tokens.dtype, device=tokens.device))
                       if self.delimiter_ids else None)
        custom = self.custom(batch.prompt_ids, batch.prompt_mask, tokens, rmask) if self.custom else None
        rewards = token_rewards(cfg.reward, mask=rmask, kl=kl, kl_coef=self.kl_ctl.value, score=score,
                                dpo_term=dpo_term, rm_weight=cfg.rm_weight, segment_end=segment_end, extra=custom)

        if models.critic is not None:
            values = self._score(lambda b, pk: token_values(models.critic, b, pk), batch) * m
            advantages, returns = gae(rewards, values, rmask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = whiten(advantages, rmask, all_sum=self.dist.all_sum)
        else:
            values = torch.zeros_like(m)
            advantages, returns = reinforce_pp(rewards, rmask, cfg.gamma, all_sum=self.dist.all_sum)
        return Experience(batch=batch, prompts=prompts, old_logp=old_logp, values=values, rewards=rewards,
                          advantages=advantages, returns=returns, kl=kl, raw_score=raw_score, score=score,
                          dpo_term=dpo_term, dpo_clip_frac=dpo_clip_frac, has_eos=has_eos, custom=custom,
                          disagreement=disagreement)

    # --- 5: the PPO update ---------------------------------------------------------------
    def train_on(self, exp: Experience) -> dict:
        cfg, policy, critic = self.cfg, self.models.policy, self.models.critic
        n = len(exp.prompts)
        micro = cfg.micro_batch_size or self.local_mini  # validate(): it divides each process's mini-batch
        sums: dict[str, float] = {}
        count = 0
        for _ in range(cfg.ppo_epochs):
            # Each process draws the same permutation of its own share: a global mini-batch is
            # every process's next `local_mini` responses.
            perm = torch.randperm(n, generator=self.generator).to(self.device)
            for start in range(0, n, self.local_mini):
                mini = perm[start:start + self.local_mini]
                self.policy_opt.zero_grad(set_to_none=True)
                if critic is not None:
                    self.critic_opt.zero_grad(set_to_none=True)
                stats: dict[str, float] = {}
                parts = mini.split(micro)
                for i, part in enumerate(parts):
                    self.models.reduce_gradients(i == len(parts) - 1)  # replicated: once per mini-batch
                    weight = len(part) / len(mini)  # micro-batch losses add up to the mini-batch's mean
                    sub = exp.batch.select(part)
                    mask = sub.response_mask
                    packed = pack(sub, cfg.pack_row_tokens, self.tokenizer.pad_token_id) if cfg.packing else None
                    with self.models.update_forward():
                        logits = response_logits(policy, sub, packed)  # [b, R, V]
                    logp = token_logprobs(logits, sub.response_ids, cfg.temperature, cfg.top_k, cfg.top_p)
                    loss, pstats = policy_loss(logp, exp.old_logp[part], exp.advantages[part], mask, cfg.clip_range)
                    (loss * weight).backward()
                    pstats["policy/loss"] = loss.detach()
                    with torch.no_grad():
                        pstats["policy/entropy"] = masked_mean(entropy_from_logits(
                            sampling_logits(logits.detach(), cfg.temperature, cfg.top_k, cfg.top_p)), mask)
                    if critic is not None:
                        with self.models.update_forward():
                            values = token_values(critic, sub, packed)
                        vloss, vstats = value_loss(values, exp.values[part], exp.returns[part], mask, cfg.value_clip)
                        (vloss * weight).backward()
                        pstats.update(vstats)
                        pstats["critic/loss"] = vloss.detach()
                    for k, v in pstats.items():
                        stats[k] = stats.get(k, 0.0) + float(v) * weight
                # The gradients are already averaged over processes (FSDP2's hooks, in backward).
                stats["policy/grad_norm"] = scalar(torch.nn.utils.clip_grad_norm_(
                    _trained_parameters(self.policy_opt), cfg.max_grad_norm))
                if critic is not None:
                    stats["critic/grad_norm"] = scalar(torch.nn.utils.clip_grad_norm_(
                        _trained_parameters(self.critic_opt), cfg.max_grad_norm))
                # Guard: a non-finite loss or gradient skips this optimizer step (both networks, in
                # every process); the schedules still advance, so the run's length and learning
                # rates stay as planned.
                finite = self.dist.all_true(all(math.isfinite(v) for v in stats.values()), self.device)
                self._note_step(finite, "loss or gradient")
                if finite:
                    self.policy_opt.step()
                    if critic is not None:
                        self.critic_opt.step()
                self._step_schedules(1)
                if not finite:
                    sums["guard/skipped_steps"] = sums.get("guard/skipped_steps", 0.0) + 1.0
                    continue
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        out = {k: v / count for k, v in sums.items() if k != "guard/skipped_steps"} if count else {}
        out["guard/skipped_steps"] = sums.get("guard/skipped_steps", 0.0)
        return out

    def _step_schedules(self, steps: int) -> None:
        for _ in range(steps):
            self.policy_sched.step()
            if self.models.critic is not None:
                self.critic_sched.step()

    # --- 6: evaluation and logging --------------------------------------------------------
    def evaluate(self, iteration: int) -> dict:
        """The dev point: one sample per dev prompt; KL to the reference, gold reward, RM score.
        Every process computes it (sharded models need them all; the policy is gathered whole, as
        for a rollout) and takes process 0's, which alone has the judge."""
        cfg, models = self.cfg, self.models
        with models.autocast(), gathered(models.policy_root):
            point = dev_point(models.policy, self.tokenizer, self.eval_prompts,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                              ref=models.ref, task=self.task, rm=models.rm, judge=self.judge)
        point = self.dist.broadcast_object(point)
        return {"iteration": iteration, "prompts_seen": iteration * cfg.rollout_batch_size, **point}

    def experience_metrics(self, exp: Experience) -> dict:
        out = exp.metrics(self.kl_ctl.value)
        if self.task is not None:
            g = self.task.gold_rewards(exp.prompts, decode_responses(self.tokenizer, exp.batch))
            out["gold_reward"] = sum(g) / len(g)
        return out

    def train(self) -> dict:
        try:
            return self._train()
        except Exception as e:
            if self.dist.active and is_collective_failure(e):
                raise self.dist.failure(e) from None
            raise

    def _train(self) -> dict:
        cfg = self.cfg
        out = Path(cfg.out)
        main = self.dist.is_main
        out.mkdir(parents=True, exist_ok=True)
        first = self._resume_point()
        if self.vllm is not None and first:
            self.vllm.sync_from(self.models)  # vLLM loaded the starting weights, not the checkpoint's
        log = MetricsLog(out, f"rto-ppo-{cfg.reward}", to_dict(cfg), cfg.report_to, "ppo", main, self.history)
        bar = tqdm(total=cfg.iterations, initial=first, desc=f"ppo[{cfg.reward}]",
                   disable=not (progress.bars_enabled() and main), dynamic_ncols=True)
        start = time.time()
        for it in range(first, cfg.iterations):
            inject_faults(self.dist.rank, it + 1)
            if self.eval_prompts and it % cfg.eval_every == 0:
                self._evaluated(self.evaluate(it))
                if self._stop_requested():
                    break  # early stop (dev selection): the point just evaluated is the last
            # Sampling randomness per (seed, process, iteration): processes draw different
            # responses, and a resumed run draws what the uninterrupted one would have.
            torch.manual_seed(_sampling_seed(cfg.seed, self.dist.rank, it))
            t0 = time.time()
            exp = self.make_experience(self._next_prompts())
            t1 = time.time()
            bad = exp.nonfinite()
            if not self.dist.all_true(not bad, self.device):
                # Guard: a rollout with non-finite rewards or log-probs (in any process) teaches
                # nothing; every process skips its update, and the schedules advance as if taken.
                self._note_step(False, ", ".join(bad) or "in another process")
                self._step_schedules(self.steps_per_iteration)
                train_stats = {"guard/skipped_steps": float(self.steps_per_iteration), "guard/nonfinite_rollout": 1.0}
            else:
                train_stats = self.train_on(exp)
            if self.vllm is not None:
                self.vllm.sync_from(self.models)
            t2 = time.time()
            metrics = {"iteration": it + 1, **self.experience_metrics(exp), **train_stats,
                       "lr/policy": self.policy_sched.get_last_lr()[0],
                       "time/rollout_s": t1 - t0, "time/train_s": t2 - t1,
                       "tokens_per_s": float(exp.mask.sum()) / max(t2 - t0, 1e-9)}
            metrics = self.dist.mean_metrics(metrics, self.device)
            metrics["tokens_per_s"] *= self.dist.world  # every process's tokens, in the same time
            metrics["iteration"] = it + 1
            if cfg.kl_alert is not None and metrics["kl"] > cfg.kl_alert and main:
                metrics["guard/kl_alert"] = 1.0
                print(f"[rto] ppo: iteration {it + 1}: KL to the reference {metrics['kl']:.3f} per response exceeds "
                      f"--kl-alert {cfg.kl_alert:g}", file=sys.stderr, flush=True)
            if math.isfinite(metrics["kl"]):
                self.kl_ctl.update(metrics["kl"], cfg.rollout_batch_size)
            self.history.append(metrics)
            log.log(metrics, it + 1)
            bar.update(1)
            shown = {k: metrics[k] for k in ("gold_reward", "rm_score", "kl") if k in metrics}
            if main:
                progress.report(it + 1, cfg.iterations)
                progress.milestone(f"ppo[{cfg.reward}]: iteration", it + 1, cfg.iterations, time.time() - start, shown)
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            if cfg.save_every and (it + 1) % cfg.save_every == 0:
                self._save_checkpoint(it + 1)
        else:  # ran to the end: the final weights get their dev evaluation too
            if self.eval_prompts:
                self._evaluated(self.evaluate(cfg.iterations))
        bar.close()
        log.close()
        summary = {"seconds": time.time() - start, "iterations": len(self.history), "reward": cfg.reward,
                   "estimator": cfg.estimator, "processes": self.dist.world, "curve": self.curve,
                   "final": self.history[-1] if self.history else {}}
        if main and self.selection is not None and self.selection.stop_reason:
            print(f"[rto] ppo: stopped after iteration {len(self.history)}: {self.selection.stop_reason}",
                  file=sys.stderr, flush=True)
        self._save_results(out, summary)  # every process: a sharded policy is gathered; process 0 writes
        self.dist.ended_well()
        return summary


def _trained_parameters(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in opt.param_groups for p in group["params"]]


def _sampling_seed(seed: int, rank: int, iteration: int) -> int:
    return zlib.crc32(f"sample/{seed}/{rank}/{iteration}".encode())


def run(cfg: PPOStageConfig) -> dict:
    return PPOTrainer(cfg).train()
