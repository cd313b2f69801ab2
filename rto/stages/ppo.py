"""`rto ppo`: PPO with a critic, and RTO's dense DPO reward. Every PPO detail is in this file.

One iteration:
 1. rollout: sample `rollout_batch_size` prompts, generate with the policy;
 2. score, no grad, each model once: the policy's (old) log-probs come from generation
    itself; reference log-probs, DPO-model log-probs (RTO variants), RM score, critic values
    from one pass each (padded, or packed without padding: `--packing`);
 3. rewards: `rto.core.rewards.token_rewards` (KL penalty + RM at the last token
    + the DPO term where the variant puts it);
 4. advantages: GAE (or REINFORCE++), whitened over the rollout;
 5. `ppo_epochs` passes over the rollout, reshuffled each pass, in mini-batches
    (one optimiser step each) made of micro-batches (gradient accumulation);
    policy and critic have separate optimisers, gradient clipping and schedules;
 6. adapt the KL coefficient (if a target is set), log, evaluate on dev prompts.

PPO (`--reward sparse`) and RTO (`--reward rto`) share every line but step 3.
All models stay in eval mode (dropout off); only policy and critic get gradients.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rto.config import opt, require
from rto.core.advantages import gae, masked_mean, reinforce_pp, whiten
from rto.core.kl_control import AdaptiveKL, FixedKL
from rto.core.losses import entropy_from_logits, explained_variance, policy_loss, value_loss
from rto.custom_rewards import CustomRewards
from rto.core.rewards import dpo_token_term, kl_estimate, normalise_score, token_rewards
from rto.data import PROMPT_FIELDS, read_rows, render, write_json
from rto import progress
from rto.errors import UserError
from rto.distributed import Dist, is_collective_failure
from rto.stages.common import progress_enabled, report_to_field, seed_field, setup, threads_field
from rto.stages.ppo_checkpoint import CheckpointMixin

RewardKind = Literal["sparse", "rto", "dpo-only", "ddpo", "semi", "rs"]
DENSE_KINDS = ("rto", "dpo-only", "ddpo", "semi", "rs")


@dataclass
class PPOStageConfig:
    # --- models and data ---
    policy: str = opt("", "SFT model directory: the policy starts here")
    prompts: str = opt("", "prompt file ({prompt} or {messages} rows; JSONL, JSON, Parquet or CSV)")
    out: str = opt("", "output directory: OUT/policy, OUT/critic, OUT/metrics.jsonl (per iteration), OUT/metrics.json")
    reward_model: str = opt("", "reward model directory (not needed for --reward dpo-only)")
    ref: str = opt("", "reference model for the KL penalty (empty: --policy)")
    critic: str = opt("", "critic initialisation (empty: --reward-model, else --policy with a new head)")
    dpo_model: str = opt("", "DPO model directory (needed by the dense variants)")
    dpo_ref: str = opt("", "the model DPO was trained from (empty: --ref)")
    task: str = opt("", "task with a gold reward to log (empty: none)")
    eval_prompts: str = opt("", "JSONL prompts for periodic evaluation (empty: none)")
    # --- the reward ---
    reward: RewardKind = opt("sparse", "where rewards go: sparse (PPO), rto, dpo-only, ddpo, semi, rs")
    beta1: float = opt(0.05, "scale of the DPO token reward (0 switches it off)", ge=0)
    dpo_clip: float | None = opt(0.05, "clamp of the scaled DPO term to [-clip, clip] (none: no clamp)", gt=0)
    kl_coef: float = opt(0.01, "KL penalty coefficient (beta2)", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k1", "per-token KL estimator in the reward")
    kl_target: float | None = opt(None, "target KL per response for the adaptive controller (none: fixed)", gt=0)
    kl_horizon: int = opt(10000, "adaptive KL horizon (in responses)", ge=1)
    rm_weight: float = opt(1.0, "weight of the RM score at the last token (beta3)")
    normalize_reward: bool = opt(True, "standardise the RM score with the mean/std stored at RM training")
    reward_clip: float | None = opt(10.0, "clamp of the normalised RM score", gt=0)
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of responses cut off without EOS")
    segment_delimiters: list[str] = opt([], "tokens that end a segment for --reward semi (EOS always does)")
    custom_rewards: list[str] = opt([], "extra per-token rewards, module:function=weight (see rto/custom_rewards.py)")
    # --- advantages ---
    estimator: Literal["gae", "reinforce++"] = opt("gae", "advantage estimator: gae (critic) or reinforce++")
    gamma: float = opt(1.0, "discount", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda", ge=0, le=1)
    whiten_advantages: bool = opt(True, "whiten advantages over the rollout")
    # --- optimisation ---
    iterations: int = opt(100, "rollout + update iterations", ge=1)
    rollout_batch_size: int = opt(64, "prompts per rollout", ge=1)
    mini_batch_size: int = opt(16, "responses per optimiser step", ge=1)
    micro_batch_size: int = opt(0, "responses per forward/backward (0: = mini-batch)", ge=0)
    ppo_epochs: int = opt(1, "passes over each rollout", ge=1)
    actor_lr: float = opt(5e-7, "policy learning rate", gt=0)
    critic_lr: float = opt(9e-6, "critic learning rate", gt=0)
    adam_beta1: float = opt(0.9, "Adam beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.95, "Adam beta2", ge=0, lt=1)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "decay after warm-up (cosine to 10%)")
    warmup_ratio: float = opt(0.03, "fraction of optimiser steps spent warming up", ge=0, lt=1)
    max_grad_norm: float = opt(1.0, "gradient-norm clip", gt=0)
    clip_range: float = opt(0.2, "PPO ratio clip", gt=0)
    value_clip: float | None = opt(0.2, "value clip around rollout values (none: off)", gt=0)
    # --- generation ---
    max_new_tokens: int = opt(64, "response length limit", ge=1)
    max_prompt_len: int = opt(512, "prompt length limit in tokens", ge=1)
    columns: dict = opt({}, "the prompt file's column names, e.g. {prompt: question}")
    skip_bad_rows: bool = opt(False, "skip (and count) prompt rows that cannot be used instead of stopping")
    long_prompts: Literal["error", "skip", "truncate"] = opt(
        "error", "a prompt over --max-prompt-len: error (naming its row), skip (counted), or truncate (keep its end)")
    temperature: float = opt(1.0, "sampling temperature (log-probs use the same)", gt=0)
    top_k: int = opt(0, "top-k sampling (0: off)", ge=0)
    top_p: float = opt(1.0, "nucleus sampling", gt=0, le=1)
    # --- memory ---
    lora_r: int = opt(0, "LoRA rank; > 0: policy and critic are adapters on one frozen shared base, the "
                         "reference is that base, a DPO adapter (rto dpo --lora-r) joins it", ge=0)
    lora_alpha: float = opt(16.0, "LoRA alpha", gt=0)
    lora_target_modules: list[str] = opt(["all-linear"], "modules that get LoRA adapters (peft names)")
    # --- speed ---
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (cuda when there is one)")
    precision: Literal["auto", "fp32", "bf16"] = opt(
        "auto", "bf16: frozen models stored in bf16, trained ones in fp32 under bf16 autocast (auto: bf16 on a "
                "GPU that supports it, else fp32)")
    packing: bool = opt(False, "padding-free scoring and training passes (sequences packed into rows)")
    pack_row_tokens: int = opt(0, "row length when packing (0: the longest sequence)", ge=0)
    score_batch_size: int = opt(0, "sequences per scoring pass (0: the whole rollout at once)", ge=0)
    generation_backend: Literal["hf", "vllm"] = opt("hf", "rollout sampling: hf (transformers generate) or vllm "
                                                         "(GPU; weights synced after every update)")
    vllm_gpu_memory_utilization: float = opt(0.3, "GPU memory share vLLM may take (--generation-backend vllm)",
                                             gt=0, le=1)
    # --- many processes (accelerate launch / torchrun) ---
    dist_timeout: float = opt(600.0, "seconds a process waits for the others in a collective before the run "
                                     "stops with an error (a dead process is noticed sooner); more than process 0 "
                                     "takes to evaluate and save a checkpoint, while the others wait", gt=0)
    # --- logging ---
    report_to: list[str] = report_to_field()
    eval_every: int = opt(10, "evaluate on --eval-prompts every N iterations (0: never)", ge=0)
    # --- guards ---
    max_bad_steps: int = opt(3, "consecutive non-finite updates (loss, gradient, reward, log-prob) skipped "
                                "before the run stops", ge=0)
    kl_alert: float | None = opt(None, "report iterations whose KL to the reference per response exceeds this", gt=0)
    # --- checkpoints ---
    save_every: int = opt(0, "write a resumable checkpoint to OUT/checkpoints every N iterations (0: never)", ge=0)
    keep_last: int = opt(2, "checkpoints kept (older ones are deleted; 0: keep all)", ge=0)
    resume: str = opt("", "resume from a checkpoint: auto (the latest in OUT/checkpoints, if any) or its path")
    n_eval: int = opt(128, "evaluation prompts used", ge=1)
    save_critic: bool = opt(True, "also save the critic to OUT/critic")
    seed: int = seed_field()
    threads: int = threads_field()

    @property
    def uses_dpo(self) -> bool:
        return self.reward in DENSE_KINDS and self.beta1 > 0

    @property
    def uses_rm(self) -> bool:
        return self.reward != "dpo-only" and self.rm_weight != 0

    def validate(self):
        require(self, "ppo", "policy", "prompts", "out")
        from rto.tracking import trackers

        trackers(self.report_to, "ppo")  # a missing tracker package stops the run before any work
        if self.uses_rm and not self.reward_model:
            raise UserError(f"ppo: --reward {self.reward} needs --reward-model")
        if self.uses_dpo and not self.dpo_model:
            raise UserError(f"ppo: --reward {self.reward} needs --dpo-model (or --beta1 0)")
        if self.rollout_batch_size % self.mini_batch_size:
            raise UserError("ppo: --rollout-batch-size must be a multiple of --mini-batch-size")
        if self.micro_batch_size and self.mini_batch_size % self.micro_batch_size:
            raise UserError("ppo: --mini-batch-size must be a multiple of --micro-batch-size")
        from rto.distributed import launched_world_size

        world = launched_world_size()
        if world > 1 and (self.rollout_batch_size % world or self.mini_batch_size % world):
            raise UserError(f"ppo: with {world} processes --rollout-batch-size ({self.rollout_batch_size}) and "
                            f"--mini-batch-size ({self.mini_batch_size}) must be multiples of {world}: each "
                            "process takes an equal share of both")
        if self.micro_batch_size and world > 1 and (self.mini_batch_size // world) % self.micro_batch_size:
            raise UserError(f"ppo: --micro-batch-size must divide each process's share of the mini-batch "
                            f"({self.mini_batch_size // world})")


class PPOTrainer(CheckpointMixin):
    def __init__(self, cfg: PPOStageConfig):
        from rto.models import (check_same_tokenizer, load_causal_lm, load_score_model, load_tokenizer,
                                read_reward_stats)

        self.cfg = cfg
        setup(cfg.seed, cfg.threads)
        self.device, self.bf16 = _device_and_precision(cfg.device, cfg.precision)
        # Data parallelism: each process samples and trains on its share of every rollout.
        self.dist = Dist(cpu=self.device.type == "cpu", timeout_s=cfg.dist_timeout)
        if self.dist.active:
            self.device = self.dist.device
            _warn_unused_engine(self.dist)
        self.local_rollout = cfg.rollout_batch_size // self.dist.world
        self.local_mini = cfg.mini_batch_size // self.dist.world
        self.tokenizer = load_tokenizer(cfg.policy)
        # Every model reads the policy's token ids: their tokenizers must agree with it, up front.
        for path, what in ((cfg.ref, "reference model"), (cfg.dpo_model if cfg.uses_dpo else "", "DPO model"),
                           (cfg.dpo_ref if cfg.uses_dpo else "", "DPO reference model"),
                           (cfg.reward_model if cfg.uses_rm else "", "reward model"), (cfg.critic, "critic")):
            if path:
                check_same_tokenizer(self.tokenizer, f"policy {cfg.policy}", path, what)
        if cfg.generation_backend == "vllm":  # before loading anything: it may not be here at all
            from rto.vllm_backend import require_vllm

            require_vllm(self.device)
        self.prompts = self._read_prompts(cfg.prompts)
        self.eval_prompts = (self._read_prompts(cfg.eval_prompts)[:cfg.n_eval] if cfg.eval_prompts and cfg.eval_every
                             else [])
        self.shared = None
        self.vllm = None
        self.dpo = self.dpo_ref = None
        self.rm, self.rm_stats = None, {"mean": 0.0, "std": 1.0}
        if cfg.uses_rm:
            self.rm = load_score_model(cfg.reward_model, "reward model")
            if cfg.normalize_reward:
                self.rm_stats = read_reward_stats(cfg.reward_model)
        if cfg.lora_r:
            self._shared_base_models()
        else:
            self.policy = load_causal_lm(cfg.policy, "policy")
            self.ref = load_causal_lm(cfg.ref or cfg.policy, "reference model")
            if cfg.uses_dpo:
                self.dpo = load_causal_lm(cfg.dpo_model, "DPO model")
        # --dpo-ref differs from --ref only when the DPO model came from another model.
        if cfg.uses_dpo and cfg.dpo_ref and Path(cfg.dpo_ref).resolve() != Path(cfg.ref or cfg.policy).resolve():
            self.dpo_ref = load_causal_lm(cfg.dpo_ref, "DPO reference model")
        if cfg.estimator == "gae" and self.shared is None:
            self.critic = load_score_model(cfg.critic or cfg.reward_model or cfg.policy, "critic")
        elif cfg.estimator != "gae":
            self.critic = None
        for frozen in (self.ref, self.dpo, self.dpo_ref, self.rm):
            if frozen is not None:
                frozen.requires_grad_(False)
        self._place_models()
        # Every process starts from process 0's trained weights (a new value head is random).
        self.dist.broadcast_([p for params in self._trained().values() for p in params.values()])
        if cfg.generation_backend == "vllm":
            from rto.vllm_backend import VLLMRollout

            self.vllm = VLLMRollout(cfg.policy, self.tokenizer, self.device, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                    gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed)
        self.task = None
        if cfg.task:
            from rto.tasks import load_task

            self.task = load_task(cfg.task)
        vocab = self.tokenizer.get_vocab()
        unknown = [t for t in cfg.segment_delimiters if t not in vocab]
        if unknown:
            raise UserError(f"ppo: --segment-delimiters {', '.join(map(repr, unknown))} not in the tokenizer's vocabulary")
        self.delimiter_ids = [vocab[t] for t in cfg.segment_delimiters]
        self.custom = CustomRewards(cfg.custom_rewards, self.tokenizer, self.task)

        steps_per_iteration = cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
        self.total_steps = cfg.iterations * steps_per_iteration
        self.policy_opt, self.policy_sched = self._optimiser(self.policy, cfg.actor_lr)
        if self.critic is not None:
            self.critic_opt, self.critic_sched = self._optimiser(self.critic, cfg.critic_lr)
        self.kl_ctl = (AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else FixedKL(cfg.kl_coef))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.bad_steps = 0
        self.skipped_total = 0
        self.order: list[int] = []
        self.history: list[dict] = []
        self.curve: list[dict] = []

    # --- setup helpers -----------------------------------------------------------------
    def _read_prompts(self, path: str) -> list[str]:
        """Prompt rows, with the length limit applied as --long-prompts says."""
        cfg = self.cfg
        # Conversational prompts go through the chat template, ending where the assistant speaks.
        prompts = [render(r["prompt"], self.tokenizer, generation_prompt=True)
                   for r in read_rows(path, PROMPT_FIELDS, cfg.columns, cfg.skip_bad_rows)]
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        long_rows = [i for i, n in enumerate(lengths) if n > cfg.max_prompt_len]
        if long_rows and cfg.long_prompts == "error":
            i = long_rows[0]
            raise UserError(f"{path}: row {i + 1}: field 'prompt' is {lengths[i]} tokens, longer than --max-prompt-len "
                            f"{cfg.max_prompt_len} ({len(long_rows)} such rows; --long-prompts skip or truncate "
                            "to accept them)")
        if long_rows and cfg.long_prompts == "skip":
            drop = set(long_rows)
            prompts = [p for i, p in enumerate(prompts) if i not in drop]
            if not prompts:
                raise UserError(f"{path}: no prompts left: all {len(drop)} are longer than --max-prompt-len "
                                f"{cfg.max_prompt_len}")
            print(f"[rto] ppo: {path}: skipped {len(drop)} of {len(lengths)} prompts longer than --max-prompt-len "
                  f"{cfg.max_prompt_len}", file=sys.stderr, flush=True)
        return prompts

    def _place_models(self) -> None:
        """Everything on the device; frozen full models in bf16 when asked (trained ones keep fp32
        master weights and run under autocast, so Adam's updates are not rounded away)."""
        frozen = [m for m in (self.ref, self.dpo, self.dpo_ref, self.rm) if m is not None and
                  not hasattr(m, "shared")]
        if self.shared is not None:
            base = self.shared.model
            if self.bf16:
                base.get_base_model().to(torch.bfloat16)
            base.to(self.device)
            self.shared.value_head.to(self.device)
        else:
            self.policy.to(self.device)
            if self.critic is not None:
                self.critic.to(self.device)
        for m in frozen:
            m.to(self.device)
            if self.bf16:
                m.to(torch.bfloat16)
        if self.shared is not None and self.bf16:
            for adapter in ("policy", "critic"):  # adapters train in fp32 on the bf16 base
                for p in self.shared.adapter_parameters(adapter):
                    p.data = p.data.float()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _shared_base_models(self) -> None:
        """--lora-r: one frozen SFT model; policy and critic adapters; reference = no adapter."""
        from rto.lora import SharedBase, adapter_base, is_adapter_dir, rm_value_head, same_path
        from rto.models import load_causal_lm

        cfg = self.cfg
        if cfg.ref and not same_path(cfg.ref, cfg.policy):
            raise UserError("ppo: with --lora-r the reference is the shared base (--policy); drop --ref")
        if cfg.critic:
            raise UserError("ppo: with --lora-r the critic is an adapter on the shared base; drop --critic")
        dpo_adapter = None
        if cfg.uses_dpo and is_adapter_dir(cfg.dpo_model) and same_path(adapter_base(cfg.dpo_model), cfg.policy):
            dpo_adapter = cfg.dpo_model
        # The critic starts from the RM (rto.lora): its head, and its adapter when the RM is an
        # adapter on this same base.
        rm_adapter = (cfg.reward_model if self.rm is not None and is_adapter_dir(cfg.reward_model)
                      and same_path(adapter_base(cfg.reward_model), cfg.policy) else None)
        head = rm_value_head(self.rm) if self.rm is not None and cfg.estimator == "gae" else None
        self.shared = SharedBase(load_causal_lm(cfg.policy, "policy"), cfg.lora_r, cfg.lora_alpha,
                                 cfg.lora_target_modules if cfg.lora_target_modules != ["all-linear"] else "all-linear",
                                 dpo_adapter, critic_adapter=rm_adapter, value_head=head)
        self.policy = self.shared.view("policy")
        self.ref = self.shared.view(None)
        if cfg.uses_dpo:
            # A DPO model trained as an adapter on this base joins it; any other is loaded whole.
            self.dpo = self.shared.view("dpo") if dpo_adapter else load_causal_lm(cfg.dpo_model, "DPO model")
        self.critic = self.shared.critic() if cfg.estimator == "gae" else None

    def _optimiser(self, model, lr):
        from transformers import get_scheduler

        cfg = self.cfg
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        name = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
        extra = {"min_lr_rate": 0.1} if cfg.lr_schedule == "cosine" else None
        sched = get_scheduler(name, opt, num_warmup_steps=math.ceil(cfg.warmup_ratio * self.total_steps),
                              num_training_steps=self.total_steps, scheduler_specific_kwargs=extra)
        return opt, sched

    def _next_prompts(self) -> list[str]:
        """This process's share of the next rollout's prompts: the global rollout passes over the
        pool, reshuffled each pass (the same order in every process), process r takes block r."""
        out = []
        while len(out) < self.cfg.rollout_batch_size:
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            out.append(self.prompts[self.order.pop()])
        return out[self.dist.rank * self.local_rollout:(self.dist.rank + 1) * self.local_rollout]

    def _trained_parameters(self, opt) -> list[torch.nn.Parameter]:
        return [p for group in opt.param_groups for p in group["params"]]

    # --- 1-4: rollout, scoring, rewards, advantages --------------------------------------
    @torch.no_grad()
    def make_experience(self, prompts: list[str]) -> dict:
        with self.autocast():
            return self.score_rollout(prompts, self.rollout(prompts))

    @torch.no_grad()
    def rollout(self, prompts: list[str]):
        """1: sample responses (a Batch with the sampled tokens' log-probs)."""
        from rto.rollout import encode_prompts, generate, response_logits, token_logprobs

        cfg = self.cfg
        ids, mask = encode_prompts(self.tokenizer, prompts, cfg.max_prompt_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.vllm is not None:
            batch = self.vllm.generate(ids, mask)
            # vLLM's log-probs come from other kernels than the trained model's; PPO's ratio
            # needs the trainer's own, so they are computed again (one policy pass).
            batch.sampled_logprobs = self._score(lambda b, pk: token_logprobs(
                response_logits(self.policy, b, pk), b.response_ids, cfg.temperature, cfg.top_k, cfg.top_p), batch)
            return batch
        return generate(self.policy, self.tokenizer, ids, mask, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, record_logprobs=True)

    @torch.no_grad()
    def score_rollout(self, prompts: list[str], batch) -> dict:
        """2-4: scoring passes, token rewards, advantages (whitened over every process's rollout)."""
        from rto.rollout import response_logits, sequence_scores, token_logprobs, token_values

        cfg = self.cfg
        tokens, rmask = batch.response_ids, batch.response_mask
        m = rmask.float()
        old_logp = batch.sampled_logprobs  # recorded while sampling: no second policy pass

        def ref_pass(b, pk):
            # One reference pass serves the KL (at the sampling temperature) and, when the DPO
            # model came from the same reference, the DPO log-ratio (at temperature 1).
            logits = response_logits(self.ref, b, pk)
            at_t = token_logprobs(logits, b.response_ids, cfg.temperature)
            at_1 = token_logprobs(logits, b.response_ids) if cfg.temperature != 1.0 else at_t
            return torch.stack([at_t, at_1], dim=1)

        ref_both = self._score(ref_pass, batch)
        ref_logp = ref_both[:, 0]
        kl = kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * m

        dpo_term = torch.zeros_like(m)
        if cfg.uses_dpo:
            # The DPO reward is the implicit reward of DPO: log-ratio at temperature 1.
            dpo_logp = self._score(lambda b, pk: token_logprobs(response_logits(self.dpo, b, pk), b.response_ids), batch)
            dpo_ref_logp = (self._score(lambda b, pk: token_logprobs(response_logits(self.dpo_ref, b, pk),
                                                                     b.response_ids), batch)
                            if self.dpo_ref is not None else ref_both[:, 1])
            dpo_term = dpo_token_term(dpo_logp, dpo_ref_logp, cfg.beta1, cfg.dpo_clip) * m
        raw_score = (self._score(lambda b, pk: sequence_scores(self.rm, b, pk), batch) if self.rm is not None
                     else torch.zeros(len(prompts), device=self.device))
        score = (normalise_score(raw_score, self.rm_stats["mean"], self.rm_stats["std"], cfg.reward_clip)
                 if cfg.normalize_reward else raw_score)
        has_eos = ((tokens == self.tokenizer.eos_token_id) & (rmask > 0)).any(-1)
        if cfg.missing_eos_penalty is not None:
            score = torch.where(has_eos, score, score - cfg.missing_eos_penalty)
        segment_end = torch.isin(tokens, torch.tensor(self.delimiter_ids, dtype=tokens.dtype, device=tokens.device)) if self.delimiter_ids else None
        custom = self.custom(batch.prompt_ids, batch.prompt_mask, tokens, rmask) if self.custom else None
        rewards = token_rewards(cfg.reward, mask=rmask, kl=kl, kl_coef=self.kl_ctl.value, score=score,
                                dpo_term=dpo_term, rm_weight=cfg.rm_weight, segment_end=segment_end, extra=custom)

        if self.critic is not None:
            values = self._score(lambda b, pk: token_values(self.critic, b, pk), batch) * m
            advantages, returns = gae(rewards, values, rmask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = whiten(advantages, rmask, all_sum=self.dist.all_sum)
        else:
            values = torch.zeros_like(m)
            advantages, returns = reinforce_pp(rewards, rmask, cfg.gamma, all_sum=self.dist.all_sum)
        clipped = (dpo_term.abs() >= cfg.dpo_clip - 1e-12) if (cfg.uses_dpo and cfg.dpo_clip) else torch.zeros_like(m).bool()
        return {
            "batch": batch, "old_logp": old_logp, "values": values, "advantages": advantages, "returns": returns,
            "rewards": rewards, "kl": kl, "raw_score": raw_score, "score": score, "dpo_term": dpo_term,
            "dpo_clip_frac": masked_mean(clipped.float(), rmask), "has_eos": has_eos, "prompts": prompts,
            "custom": custom,
        }

    def _score(self, fn, batch):
        """fn(sub_batch, packed_or_None) over the rollout in chunks of --score-batch-size, concatenated."""
        from rto.rollout import pack

        outs = [fn(b, pack(b, self.cfg.pack_row_tokens, self.tokenizer.pad_token_id) if self.cfg.packing else None)
                for b in batch.chunks(self.cfg.score_batch_size)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    # --- 5: the PPO update ---------------------------------------------------------------
    def train_on(self, exp: dict) -> dict:
        from rto.rollout import pack, response_logits, sampling_logits, token_logprobs, token_values

        cfg = self.cfg
        n = len(exp["prompts"])
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
                if self.critic is not None:
                    self.critic_opt.zero_grad(set_to_none=True)
                stats: dict[str, float] = {}
                for part in mini.split(micro):
                    weight = len(part) / len(mini)
                    sub = exp["batch"].select(part)
                    mask = sub.response_mask
                    packed = pack(sub, cfg.pack_row_tokens, self.tokenizer.pad_token_id) if cfg.packing else None
                    with self.autocast():
                        logits = response_logits(self.policy, sub, packed)
                    logp = token_logprobs(logits, sub.response_ids, cfg.temperature, cfg.top_k, cfg.top_p)
                    loss, pstats = policy_loss(logp, exp["old_logp"][part], exp["advantages"][part], mask,
                                               cfg.clip_range)
                    (loss * weight).backward()
                    pstats["policy/loss"] = loss.detach()
                    with torch.no_grad():
                        pstats["policy/entropy"] = masked_mean(entropy_from_logits(
                            sampling_logits(logits.detach(), cfg.temperature, cfg.top_k, cfg.top_p)), mask)
                    if self.critic is not None:
                        with self.autocast():
                            values = token_values(self.critic, sub, packed)
                        vloss, vstats = value_loss(values, exp["values"][part], exp["returns"][part], mask,
                                                   cfg.value_clip)
                        (vloss * weight).backward()
                        pstats.update(vstats)
                        pstats["critic/loss"] = vloss.detach()
                    for k, v in pstats.items():
                        stats[k] = stats.get(k, 0.0) + float(v) * weight
                policy_params = self._trained_parameters(self.policy_opt)
                self.dist.average_gradients(policy_params)
                stats["policy/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy_params, cfg.max_grad_norm))
                if self.critic is not None:
                    critic_params = self._trained_parameters(self.critic_opt)
                    self.dist.average_gradients(critic_params)
                    stats["critic/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(critic_params, cfg.max_grad_norm))
                # Guard: a non-finite loss or gradient skips this optimiser step (both networks, in
                # every process); the schedules still advance, so the run's length and learning
                # rates stay as planned.
                finite = self.dist.all_true(all(math.isfinite(v) for v in stats.values()), self.device)
                self._note_step(finite, "loss or gradient")
                if finite:
                    self.policy_opt.step()
                    if self.critic is not None:
                        self.critic_opt.step()
                self.policy_sched.step()
                if self.critic is not None:
                    self.critic_sched.step()
                if not finite:
                    stats = {"guard/skipped_steps": 1.0}
                    sums["guard/skipped_steps"] = sums.get("guard/skipped_steps", 0.0) + 1.0
                    continue
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        out = {k: v / count for k, v in sums.items() if k != "guard/skipped_steps"} if count else {}
        out["guard/skipped_steps"] = sums.get("guard/skipped_steps", 0.0)
        return out

    def _note_step(self, finite: bool, what: str) -> None:
        """Count consecutive non-finite updates; too many in a row end the run with a clear message."""
        self.bad_steps = 0 if finite else self.bad_steps + 1
        if not finite:
            self.skipped_total += 1
        if self.bad_steps > self.cfg.max_bad_steps:
            from rto.checkpoint import list_checkpoints

            last = list_checkpoints(Path(self.cfg.out) / "checkpoints")
            where = f"; the last good checkpoint is {last[-1]}" if last else ""
            raise UserError(f"ppo: {self.bad_steps} consecutive non-finite updates ({what}) at iteration "
                            f"{len(self.history) + 1}: the run stopped{where}")

    # --- 6: evaluation and logging --------------------------------------------------------
    def evaluate(self, iteration: int) -> dict:
        with self.autocast():
            return self._evaluate(iteration)

    def _evaluate(self, iteration: int) -> dict:
        from rto.evaluate import gold_rewards, kl_to, rm_scores, sample

        texts, batches = sample(self.policy, self.tokenizer, self.eval_prompts, max_new_tokens=self.cfg.max_new_tokens,
                                temperature=self.cfg.temperature, seed=self.cfg.seed + 7919)
        point = {"iteration": iteration, "prompts_seen": iteration * self.cfg.rollout_batch_size,
                 "kl_to_ref": kl_to(self.policy, self.ref, batches, self.cfg.temperature)}
        if self.task is not None:
            g = gold_rewards(self.task, self.eval_prompts, texts)
            point["gold_reward"] = sum(g) / len(g)
        if self.rm is not None:
            s = rm_scores(self.rm, batches)
            point["rm_score"] = sum(s) / len(s)
        return point

    def experience_metrics(self, exp: dict) -> dict:
        from rto.rollout import decode_responses

        mask = exp["batch"].response_mask
        m = mask.float()
        out = {
            "rm_score": float(exp["raw_score"].mean()),
            "reward/normalised_score": float(exp["score"].mean()),
            "reward/total": float(exp["rewards"].sum(-1).mean()),
            "kl": float(exp["kl"].sum(-1).mean()),
            "kl_coef": self.kl_ctl.value,
            "response_length": float(m.sum(-1).mean()),
            "eos_fraction": float(exp["has_eos"].float().mean()),
            "dpo_term/mean": float(masked_mean(exp["dpo_term"], mask)),
            "dpo_term/clip_frac": float(exp["dpo_clip_frac"]),
            "critic/explained_variance": float(explained_variance(exp["values"], exp["returns"], mask)),
            "critic/value_mean": float(masked_mean(exp["values"], mask)),
        }
        if exp["custom"] is not None:
            out["reward/custom"] = float(exp["custom"].sum(-1).mean())
        if self.task is not None:
            texts = decode_responses(self.tokenizer, exp["batch"])
            g = self.task.gold_rewards(exp["prompts"], texts)
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
        from tqdm.auto import tqdm

        from rto.checkpoint import save_checkpoint
        from rto.config import to_dict
        from rto.tracking import MetricsLog

        cfg = self.cfg
        out = Path(cfg.out)
        main = self.dist.is_main
        out.mkdir(parents=True, exist_ok=True)
        first = self._resume_point()
        if self.vllm is not None and first:
            self.vllm.sync_weights(self.policy)  # vLLM loaded the starting weights, not the checkpoint's
        log = MetricsLog(out, f"rto-ppo-{cfg.reward}", to_dict(cfg), cfg.report_to, "ppo", main, self.history)
        bar = tqdm(total=cfg.iterations, initial=first, desc=f"ppo[{cfg.reward}]",
                   disable=not (progress_enabled() and main), dynamic_ncols=True)
        start = time.time()
        for it in range(first, cfg.iterations):
            _fault_die(self.dist.rank, it + 1)
            if self.eval_prompts and it % cfg.eval_every == 0 and main:
                self.curve.append(self.evaluate(it))
            # Sampling randomness per (seed, process, iteration): processes draw different
            # responses, and a resumed run draws what the uninterrupted one would have.
            torch.manual_seed(_sampling_seed(cfg.seed, self.dist.rank, it))
            t0 = time.time()
            exp = self.make_experience(self._next_prompts())
            t1 = time.time()
            bad = [k for k in ("rewards", "old_logp", "values", "returns", "advantages") if not torch.isfinite(exp[k]).all()]
            if not self.dist.all_true(not bad, self.device):
                # Guard: a rollout with non-finite rewards or log-probs (in any process) teaches
                # nothing; every process skips its update.
                self._note_step(False, ", ".join(bad) or "in another process")
                skipped = cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
                for _ in range(skipped):  # the schedules advance as if the steps were taken
                    self.policy_sched.step()
                    if self.critic is not None:
                        self.critic_sched.step()
                train_stats = {"guard/skipped_steps": float(skipped), "guard/nonfinite_rollout": 1.0}
            else:
                train_stats = self.train_on(exp)
            if self.vllm is not None:
                self.vllm.sync_weights(self.policy)
            t2 = time.time()
            metrics = {"iteration": it + 1, **self.experience_metrics(exp), **train_stats,
                       "lr/policy": self.policy_sched.get_last_lr()[0],
                       "time/rollout_s": t1 - t0, "time/train_s": t2 - t1,
                       "tokens_per_s": float(exp["batch"].response_mask.sum()) / max(t2 - t0, 1e-9)}
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
            if main:
                progress.report(it + 1, cfg.iterations)
            bar.set_postfix({k: f"{metrics[k]:.3f}" for k in ("gold_reward", "rm_score", "kl") if k in metrics})
            if cfg.save_every and (it + 1) % cfg.save_every == 0 and main:
                tensors, meta = self.state(it + 1)
                save_checkpoint(out / "checkpoints", it + 1, tensors, meta, cfg.keep_last)
        if self.eval_prompts and main:
            self.curve.append(self.evaluate(cfg.iterations))
        bar.close()
        log.close()
        summary = {"seconds": time.time() - start, "iterations": cfg.iterations, "reward": cfg.reward,
                   "estimator": cfg.estimator, "processes": self.dist.world, "curve": self.curve,
                   "final": self.history[-1] if self.history else {}}
        if not main:  # the weights are the same in every process: process 0 saves them
            return summary
        from rto.models import save_model, write_model_card

        save_model(self.policy, self.tokenizer, out / "policy")
        if self.critic is not None and cfg.save_critic and self.shared is None:
            save_model(self.critic, self.tokenizer, out / "critic")
        write_json(out / "metrics.json", summary)
        write_model_card(out / "policy", "ppo", cfg, summary)
        return summary


def _sampling_seed(seed: int, rank: int, iteration: int) -> int:
    import zlib

    return zlib.crc32(f"sample/{seed}/{rank}/{iteration}".encode())


def _fault_die(rank: int, iteration: int) -> None:
    """Fault injection for the tests: RTO_FAULT_DIE=RANK:ITERATION ends that process abruptly when
    it starts that iteration, as a crash or an out-of-memory kill would; RTO_FAULT_HANG=RANK:ITERATION
    makes it stop responding instead (a hung device, a deadlock)."""
    import os

    if os.environ.get("RTO_FAULT_DIE", "") == f"{rank}:{iteration}":
        print(f"[rto] fault injection: process {rank} dies at iteration {iteration}", file=sys.stderr, flush=True)
        os._exit(17)
    if os.environ.get("RTO_FAULT_HANG", "") == f"{rank}:{iteration}":
        print(f"[rto] fault injection: process {rank} hangs at iteration {iteration}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def _warn_unused_engine(dist: Dist) -> None:
    """FSDP and DeepSpeed configs shard the TRL stages; `rto ppo` keeps a full copy per process."""
    if "FSDP" in dist.distributed_type or "DEEPSPEED" in dist.distributed_type:
        if dist.is_main:
            print(f"[rto] ppo: the accelerate config asks for {dist.distributed_type.split('.')[-1]}; rto ppo runs "
                  "data-parallel with a full copy of each model per process (use --lora-r to share one frozen base "
                  "and --precision bf16 to halve it)", file=sys.stderr, flush=True)


def _device_and_precision(device: str, precision: str) -> tuple[torch.device, bool]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"ppo: --device {device!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"ppo: --device {device}: no CUDA device here")
    if precision == "auto":
        return dev, dev.type == "cuda" and torch.cuda.is_bf16_supported()
    return dev, precision == "bf16"


def run(cfg: PPOStageConfig) -> dict:
    return PPOTrainer(cfg).train()
