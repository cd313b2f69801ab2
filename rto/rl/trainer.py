"""`rto ppo`: PPO with a critic, and RTO's dense DPO reward. Every PPO detail is in this file.

One iteration (`PPOTrainer._train`):
 1. rollout: sample `rollout_batch_size` prompts, generate with the policy; the sampled
    tokens' (old) log-probs are recorded while generating;
 2. score, no grad, each model once: reference log-probs, DPO-model log-probs (RTO variants),
    RM score, critic values (padded, or packed without padding: `--packing`);
 3. rewards: `rto.core.rewards.token_rewards` (KL penalty + RM at the last token + the DPO term
    where the placement puts it);
 4. advantages: the estimator of `rto.core.advantages.ESTIMATORS` (GAE with the critic's values,
    or REINFORCE++), whitened over the rollout (of every process);
 5. `ppo_epochs` passes over the rollout, reshuffled each pass, in mini-batches (one optimizer
    step each) made of micro-batches (gradient accumulation); each trained network (policy,
    critic) has its own loss, optimizer, gradient clipping and schedule;
 6. adapt the KL coefficient (if a target is set), log, evaluate on dev prompts.

PPO (`--reward sparse`) and RTO (`--reward rto`) share every line but step 3. All models stay in
eval mode; only the policy and the critic (for an estimator that needs one) get gradients.
Settings: config.py; models and optimizers: models.py; checkpoints and the loop's state:
checkpoint.py; the results written at the end: results.py; the tensor functions: rto/core/.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rto.core.losses import entropy_from_logits, kl_penalty_loss, policy_loss, value_loss
from rto.core.masked import masked_mean
from rto.io.config import to_dict
from rto.io.errors import UserError
from rto.io.prompt_pool import read_prompts
from rto.lm.evaluate import dev_point
from rto.lm.judges import load_judge
from rto.lm.models import load_tokenizer
from rto.lm.rollout import Batch, Sampling, decode_responses, pack, sampling_logits
from rto.lm.scoring import response_logits, token_logprobs, token_values
from rto.rl.checkpoint import Checkpoints, RunState
from rto.rl.config import PPOStageConfig
from rto.rl.custom_rewards import CustomRewards
from rto.rl.experience import Experience, ExperienceMaker
from rto.rl.models import check_tokenizers, device_and_precision, load_models, optimized
from rto.rl.results import keep_if_best, save_results
from rto.runtime import progress
from rto.runtime.distributed import Dist, is_collective_failure
from rto.runtime.faults import inject_faults
from rto.runtime.process import setup
from rto.runtime.sharding import gathered, plan_layout, scalar
from rto.runtime.tracking import MetricsLog
from rto.tasks import load_task


class PPOTrainer:
    def __init__(self, cfg: PPOStageConfig):
        self.cfg = cfg
        setup(cfg.seed, cfg.threads)
        device, bf16 = device_and_precision(cfg.device, cfg.precision)
        # Several processes: each samples and trains on its share of every rollout; the models are
        # sharded across them or replicated (rto/runtime/sharding.py).
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
            from rto.rl.vllm import require_vllm

            require_vllm(self.device, cfg)  # its sampling settings too: vLLM's limits differ from generate's
        self.prompts = self._read_prompts(cfg.prompts, cfg.prompts_split)
        if cfg.prompt_epochs:  # passes over the prompts, as TRL's num_train_epochs: now that their number is known
            passes = cfg.prompt_epochs * len(self.prompts) * cfg.num_generations / cfg.rollout_batch_size
            self.cfg = cfg = dataclasses.replace(cfg, iterations=max(1, math.ceil(passes)))
        self.eval_prompts = (
            self._read_prompts(cfg.eval_prompts)[: cfg.n_eval] if cfg.eval_prompts and cfg.eval_every else []
        )
        self.models = load_models(cfg, self.device, bf16, self.dist, self.layout)
        vllm = None
        if cfg.generation_backend == "vllm":
            from rto.rl.vllm import VLLMRollout  # vLLM, only when asked for

            vllm = VLLMRollout.for_run(cfg, self.tokenizer, self.device, self.dist, self.models)
        self.task = load_task(cfg.task) if cfg.task else None
        self.judge = load_judge(cfg.judge, self.tokenizer, self.device) if cfg.judge and self.dist.is_main else None
        self.experience = ExperienceMaker(
            cfg,
            self.models,
            self.tokenizer,
            self.device,
            self.dist,
            vllm,
            CustomRewards(cfg.custom_rewards, self.tokenizer, self.task),
        )

        self.steps_per_iteration = cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
        self.total_steps = cfg.iterations * self.steps_per_iteration
        self.trained = optimized(self.models, cfg, self.total_steps)  # the policy (and critic), their optimizers
        self.state = RunState.start(cfg)  # the KL coefficient, the dev selection, the metrics so far, ...
        self.checkpoints = Checkpoints(cfg, self.dist, self.models, self.trained, self.state)

    # --- set-up helpers ------------------------------------------------------------------
    def _read_prompts(self, path: str, split: str = "train"):
        """A prompt pool (rto.io.prompt_pool): read once into a cached Arrow file, drawn lazily."""
        return read_prompts(
            path,
            self.tokenizer,
            max_len=self.cfg.max_prompt_len,
            long_prompts=self.cfg.long_prompts,
            columns=self.cfg.columns,
            skip_bad_rows=self.cfg.skip_bad_rows,
            split=split,
        )

    def _next_prompts(self) -> list[str]:
        """This process's share of the next rollout's prompts, each --num-generations times in a row
        (a group): process r reads block r of the global draw, so a group never straddles processes."""
        k = self.cfg.num_generations
        share = self.local_rollout // k
        picks = self.state.draw(len(self.prompts), self.cfg.rollout_batch_size // k)
        prompts = self.prompts.take(picks[self.dist.rank * share : (self.dist.rank + 1) * share])
        return [p for p in prompts for _ in range(k)]

    # --- 1-4: rollout, scoring, rewards, advantages (rto/rl/experience.py) -------------------
    def make_experience(self, prompts: list[str]) -> Experience:
        return self.experience(prompts, self.state.kl_ctl.value)

    # --- 5: the PPO update ---------------------------------------------------------------
    def train_on(self, exp: Experience) -> dict:
        cfg = self.cfg
        n = len(exp.prompts)
        micro = cfg.micro_batch_size or self.local_mini  # validate(): it divides each process's mini-batch
        loss_of = {"policy": self.policy_loss, "critic": self.value_loss}
        sums: dict[str, float] = {}
        count = 0
        for _ in range(cfg.ppo_epochs):
            # Each process draws the same permutation of its own share: a global mini-batch is
            # every process's next `local_mini` responses.
            perm = torch.randperm(n, generator=self.state.generator).to(self.device)
            for start in range(0, n, self.local_mini):
                mini = perm[start : start + self.local_mini]
                for net in self.trained:
                    net.opt.zero_grad(set_to_none=True)
                stats: dict[str, float] = {}
                parts = mini.split(micro)
                for i, part in enumerate(parts):
                    self.models.reduce_gradients(i == len(parts) - 1)  # replicated: once per mini-batch
                    weight = self._share(exp, part, mini)  # micro-batch losses add up to the mini-batch's
                    sub = exp.batch.select(part)
                    packed = pack(sub, cfg.pack_row_tokens, self.tokenizer.pad_token_id) if cfg.packing else None
                    for net in self.trained:  # the policy, then the critic where the estimator has one
                        loss, part_stats = loss_of[net.name](exp, part, sub, packed)
                        (loss * weight).backward()
                        for k, v in part_stats.items():
                            stats[k] = stats.get(k, 0.0) + float(v) * weight
                # The gradients are already averaged over processes (FSDP2's hooks, in backward).
                for net in self.trained:
                    stats[f"{net.name}/grad_norm"] = scalar(
                        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
                    )
                # Guard: a non-finite loss or gradient skips this optimizer step (every network, in
                # every process); the schedules still advance, so the run's length and learning
                # rates stay as planned.
                finite = self.dist.all_true(all(math.isfinite(v) for v in stats.values()), self.device)
                self.note_step(finite, "loss or gradient")
                if finite:
                    for net in self.trained:
                        net.opt.step()
                self.step_schedules(1)
                if not finite:
                    sums["guard/skipped_steps"] = sums.get("guard/skipped_steps", 0.0) + 1.0
                    continue
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        out = {k: v / count for k, v in sums.items() if k != "guard/skipped_steps"} if count else {}
        out["guard/skipped_steps"] = sums.get("guard/skipped_steps", 0.0)
        return out

    def policy_loss(self, exp: Experience, part: torch.Tensor, sub: Batch, packed) -> tuple[torch.Tensor, dict]:
        """The clipped surrogate of a micro-batch, and its entropy (a statistic, no gradient)."""
        cfg, mask = self.cfg, sub.response_mask
        with self.models.update_forward():
            logits = response_logits(self.models.policy, sub, packed)  # [b, R, V]
        logp = token_logprobs(logits, sub.response_ids, cfg.temperature, cfg.top_k, cfg.top_p)
        loss, stats = policy_loss(
            logp, exp.old_logp[part], exp.advantages[part], mask, cfg.clip_range, cfg.loss_agg, cfg.clip_range_high
        )
        if cfg.kl_loss_coef:  # GRPO's KL term, in the loss rather than the reward
            kl = kl_penalty_loss(logp, exp.ref_logp[part], mask, cfg.loss_agg)
            loss = loss + cfg.kl_loss_coef * kl
            stats["policy/kl_loss"] = kl.detach()
        stats["policy/loss"] = loss.detach()
        with torch.no_grad():
            stats["policy/entropy"] = masked_mean(
                entropy_from_logits(sampling_logits(logits.detach(), cfg.temperature, cfg.top_k, cfg.top_p)), mask
            )
        return loss, stats

    def _share(self, exp: Experience, part: torch.Tensor, mini: torch.Tensor) -> float:
        """A micro-batch's weight in its mini-batch: its share of the responses, or of the tokens
        when every token weighs the same (--loss-agg token-mean)."""
        if self.cfg.loss_agg != "token-mean":
            return len(part) / len(mini)
        mask = exp.batch.response_mask
        return float(mask[part].sum()) / max(float(mask[mini].sum()), 1.0)

    def value_loss(self, exp: Experience, part: torch.Tensor, sub: Batch, packed) -> tuple[torch.Tensor, dict]:
        """The critic's clipped value loss of a micro-batch."""
        with self.models.update_forward():
            values = token_values(self.models.critic, sub, packed)
        loss, stats = value_loss(values, exp.values[part], exp.returns[part], sub.response_mask, self.cfg.value_clip)
        stats["critic/loss"] = loss.detach()
        return loss, stats

    def step_schedules(self, steps: int) -> None:
        for _ in range(steps):
            for net in self.trained:
                net.sched.step()

    def note_step(self, finite: bool, what: str) -> None:
        """Guard: count consecutive non-finite updates; too many in a row end the run with a clear message."""
        self.state.bad_steps = 0 if finite else self.state.bad_steps + 1
        if self.state.bad_steps > self.cfg.max_bad_steps:
            last = self.checkpoints.last()
            where = f"; the last good checkpoint is {last}" if last else ""
            raise UserError(
                f"ppo: {self.state.bad_steps} consecutive non-finite updates ({what}) at iteration "
                f"{len(self.state.history) + 1}: the run stopped{where}"
            )

    # --- 6: evaluation and logging --------------------------------------------------------
    def evaluate(self, iteration: int) -> dict:
        """The dev point: one sample per dev prompt; KL to the reference, gold reward, RM score.
        Every process computes it (sharded models need them all; the policy is gathered whole, as
        for a rollout) and takes process 0's, which alone has the judge."""
        cfg, models = self.cfg, self.models
        with models.autocast(), gathered(models.policy_root):
            point = dev_point(
                models.policy,
                self.tokenizer,
                self.eval_prompts,
                Sampling(cfg.max_new_tokens, cfg.temperature),
                seed=cfg.seed,
                ref=models.ref,
                task=self.task,
                rm=models.rm,
                judge=self.judge,
            )
        point = self.dist.broadcast_object(point)
        return {"iteration": iteration, "prompts_seen": iteration * cfg.rollout_batch_size, **point}

    def record_dev_point(self, point: dict) -> None:
        """A dev evaluation joins the curve; with --select-by, a new best's policy is kept (OUT/policy_selected)."""
        self.state.curve.append(point)
        keep_if_best(self.state.selection, point, self.models, self.tokenizer, self.dist, Path(self.cfg.out))

    def stop_requested(self) -> bool:
        """The dev selection's early stop: process 0 decides (it evaluates); every process learns it in
        the same collective."""
        local = self.state.selection is not None and self.state.selection.should_stop
        return not self.dist.all_true(not local, self.device)

    def experience_metrics(self, exp: Experience) -> dict:
        out = exp.metrics(self.state.kl_ctl.value)
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
        first = self.checkpoints.resume_point()
        vllm = self.experience.vllm
        if vllm is not None and first:
            vllm.sync_from(self.models)  # vLLM loaded the starting weights, not the checkpoint's
        log = MetricsLog(out, f"rto-ppo-{cfg.reward}", to_dict(cfg), cfg.report_to, "ppo", main, self.state.history)
        bar = tqdm(
            total=cfg.iterations,
            initial=first,
            desc=f"ppo[{cfg.reward}]",
            disable=not (progress.bars_enabled() and main),
            dynamic_ncols=True,
        )
        start = time.time()
        for it in range(first, cfg.iterations):
            inject_faults(self.dist.rank, it + 1)
            if self.eval_prompts and it % cfg.eval_every == 0:
                self.record_dev_point(self.evaluate(it))
                if self.stop_requested():
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
                self.note_step(False, ", ".join(bad) or "in another process")
                self.step_schedules(self.steps_per_iteration)
                train_stats = {"guard/skipped_steps": float(self.steps_per_iteration), "guard/nonfinite_rollout": 1.0}
            else:
                train_stats = self.train_on(exp)
            if vllm is not None:
                vllm.sync_from(self.models)
            t2 = time.time()
            metrics = {
                "iteration": it + 1,
                **self.experience_metrics(exp),
                **train_stats,
                "lr/policy": self.trained[0].sched.get_last_lr()[0],
                "time/rollout_s": t1 - t0,
                "time/train_s": t2 - t1,
                "tokens_per_s": float(exp.mask.sum()) / max(t2 - t0, 1e-9),
            }
            metrics = self.dist.mean_metrics(metrics, self.device)
            metrics["tokens_per_s"] *= self.dist.world  # every process's tokens, in the same time
            metrics["iteration"] = it + 1
            if cfg.kl_alert is not None and metrics["kl"] > cfg.kl_alert and main:
                metrics["guard/kl_alert"] = 1.0
                print(
                    f"[rto] ppo: iteration {it + 1}: KL to the reference {metrics['kl']:.3f} per response exceeds "
                    f"--kl-alert {cfg.kl_alert:g}",
                    file=sys.stderr,
                    flush=True,
                )
            if math.isfinite(metrics["kl"]):
                self.state.kl_ctl.update(metrics["kl"], cfg.rollout_batch_size)
            self.state.history.append(metrics)
            log.log(metrics, it + 1)
            bar.update(1)
            shown = {k: metrics[k] for k in ("gold_reward", "rm_score", "kl") if k in metrics}
            if main:
                progress.report(it + 1, cfg.iterations)
                progress.milestone(f"ppo[{cfg.reward}]: iteration", it + 1, cfg.iterations, time.time() - start, shown)
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            if cfg.save_every and (it + 1) % cfg.save_every == 0:
                self.checkpoints.save(it + 1)
        else:  # ran to the end: the final weights get their dev evaluation too
            if self.eval_prompts:
                self.record_dev_point(self.evaluate(cfg.iterations))
        bar.close()
        log.close()
        state = self.state
        summary = {
            "seconds": time.time() - start,
            "iterations": len(state.history),
            "reward": cfg.reward,
            "estimator": cfg.estimator,
            "processes": self.dist.world,
            "curve": state.curve,
            "final": state.history[-1] if state.history else {},
        }
        if main and state.selection is not None and state.selection.stop_reason:
            print(
                f"[rto] ppo: stopped after iteration {len(state.history)}: {state.selection.stop_reason}",
                file=sys.stderr,
                flush=True,
            )
        # Every process: a sharded policy is gathered; process 0 writes.
        save_results(cfg, self.models, self.tokenizer, self.dist, state.selection, state.history, state.curve, summary)
        self.dist.ended_well()
        return summary


def _sampling_seed(seed: int, rank: int, iteration: int) -> int:
    return zlib.crc32(f"sample/{seed}/{rank}/{iteration}".encode())


def run(cfg: PPOStageConfig) -> dict:
    return PPOTrainer(cfg).train()
