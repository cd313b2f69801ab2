"""The networks of one `rto ppo` run: loaded, checked against the policy's tokenizer, placed on
their device in their precision - full models, or the LoRA shared base (rto/lm/lora.py) - and the
trained ones' optimizers.

Precision: every model loads in fp32 (rto.lm.models); with bf16 the frozen models are cast to bf16
and the trained ones keep fp32 master weights under bf16 autocast, so Adam's small updates are
not rounded away.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rto.io.errors import UserError
from rto.lm.lora import SharedBase, rm_value_head
from rto.lm.models import (
    ScoreStats,
    adapter_base,
    check_same_tokenizer,
    is_adapter_dir,
    load_causal_lm,
    load_score_model,
    read_reward_stats,
    same_path,
)
from rto.rl.config import PPOStageConfig
from rto.runtime.distributed import Dist
from rto.runtime.sharding import Layout, is_wrapped, wrap


@dataclass
class PPOModels:
    """Trained: `policy`, `critic`. Frozen: the rest. Under LoRA, policy, critic, reference (and a
    DPO adapter) are views of one `shared` base."""

    policy: nn.Module
    ref: nn.Module  # the KL penalty's reference (LoRA: the base with every adapter off)
    device: torch.device
    bf16: bool
    critic: nn.Module | None = None  # value model for GAE (None with REINFORCE++)
    rm: nn.Module | None = None  # reward model (None for dpo-only)
    rm_stats: ScoreStats = field(default_factory=ScoreStats)  # its score mean/std at RM training
    rm_ensemble: list[tuple[nn.Module, ScoreStats]] = field(default_factory=list)  # more RMs, each with its stats
    dpo: nn.Module | None = None  # DPO model (dense variants)
    dpo_ref: nn.Module | None = None  # the DPO model's own reference, when it is not `ref`
    shared: SharedBase | None = None
    layout: str = "single"  # of the trained models: single, replicate or shard (rto.runtime.sharding)
    checkpointed_layers: list[nn.Module] = field(default_factory=list)  # --gradient-checkpointing's decoder layers

    def frozen(self) -> list[nn.Module]:
        """The frozen full models (not views of the shared base)."""
        return [
            m
            for m in (self.ref, self.dpo, self.dpo_ref, self.rm, *(m for m, _ in self.rm_ensemble))
            if m is not None and not hasattr(m, "shared")
        ]

    @property
    def policy_root(self) -> nn.Module:
        """The module holding the policy's weights (the one sharding wraps, gathering fetches and
        export reads): the policy, or under LoRA the transformers model inside peft's wrappers
        (generate and forward both run through it)."""
        return self.shared.model.get_base_model() if self.shared is not None else self.policy

    @property
    def sharded(self) -> bool:
        """Several processes with FSDP2: the trained weights are shards (saved and gathered through
        torch.distributed.checkpoint and full_state_dict)."""
        return is_wrapped(self.trained_modules()[0])

    def trained_modules(self) -> list[nn.Module]:
        """The modules holding the trained weights: policy and critic, or the shared base and its value head."""
        if self.shared is not None:
            return [self.policy_root, self.shared.value_head]
        return [self.policy, *([self.critic] if self.critic is not None else [])]

    def reduce_gradients(self, now: bool) -> None:
        """Whether the next backward passes reduce gradients across processes. Replicated, only the
        mini-batch's last micro-batch does (DDP's no_sync: the others accumulate locally); sharded,
        every one does, since a local accumulation would hold whole gradients and undo the sharding."""
        if self.layout == "replicate":
            for m in self.trained_modules():
                m.set_requires_gradient_sync(now)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @contextlib.contextmanager
    def update_forward(self):
        """The update's forward passes (the ones with gradients): bf16 autocast where asked, and with
        --gradient-checkpointing the decoder layers' own `training` flag on. transformers checkpoints
        a layer only in training mode, and these models stay in eval mode throughout (no dropout in
        PPO: the first epoch's ratio is 1); the layer's flag alone leaves dropout and attention below
        it in eval mode."""
        for layer in self.checkpointed_layers:
            layer.training = True
        try:
            with self.autocast():
                yield
        finally:
            for layer in self.checkpointed_layers:
                layer.training = False

    def trained(self) -> dict[str, dict[str, nn.Parameter]]:
        """Trained weights by model: all of a full model's, only the adapters (and value head) with LoRA."""
        if self.shared is not None:
            out = {"policy": self.shared.named_adapter_parameters("policy")}
            if self.critic is not None:
                out["critic"] = self.shared.named_adapter_parameters("critic")
                out["critic"].update(self.shared.value_head.named_parameters(prefix="value_head"))
            return out
        out = {"policy": dict(self.policy.named_parameters())}
        if self.critic is not None:
            out["critic"] = dict(self.critic.named_parameters())
        return out


def device_and_precision(device: str, precision: str) -> tuple[torch.device, bool]:
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


def check_tokenizers(cfg: PPOStageConfig, tokenizer) -> None:
    """Every model reads the policy's token ids: their tokenizers must agree with it, up front."""
    for path, what in (
        (cfg.ref, "reference model"),
        (cfg.dpo_model if cfg.uses_dpo else "", "DPO model"),
        (cfg.dpo_ref if cfg.uses_dpo else "", "DPO reference model"),
        (cfg.reward_model if cfg.uses_rm else "", "reward model"),
        (cfg.critic, "critic"),
        *((path, "ensemble reward model") for path in cfg.reward_model_ensemble if cfg.uses_rm),
    ):
        if path:
            check_same_tokenizer(tokenizer, f"policy {cfg.policy}", path, what)


def segment_delimiter_ids(cfg: PPOStageConfig, tokenizer) -> list[int]:
    """Token ids of --segment-delimiters (Semi-RTO), each checked to be in the vocabulary."""
    vocab = tokenizer.get_vocab()
    unknown = [t for t in cfg.segment_delimiters if t not in vocab]
    if unknown:
        raise UserError(f"ppo: --segment-delimiters {', '.join(map(repr, unknown))} not in the tokenizer's vocabulary")
    return [vocab[t] for t in cfg.segment_delimiters]


def load_models(cfg: PPOStageConfig, device: torch.device, bf16: bool, dist: Dist, layout: Layout) -> PPOModels:
    """Load, freeze, place (sharded or whole: rto.runtime.sharding); every process starts from process 0's
    trained weights. Each model is placed as soon as it is read, so while loading a process holds
    at most one whole model beside the others' shards."""
    place = _Placer(device, bf16, dist, layout)
    rm, rm_stats = None, ScoreStats()
    if cfg.uses_rm:
        rm = load_score_model(cfg.reward_model, "reward model")
        if cfg.normalize_score:
            rm_stats = read_reward_stats(cfg.reward_model)
    if cfg.lora_r:
        models = _shared_base_models(cfg, rm, device, bf16)  # it copies the RM's head: the RM is placed after
        place.shared(models.shared)
        if models.dpo is not None and not hasattr(models.dpo, "shared"):
            place.frozen(models.dpo)
        rm = place.frozen(rm) if rm is not None else None
    else:
        rm = place.frozen(rm) if rm is not None else None
        models = PPOModels(
            policy=place.trained(load_causal_lm(cfg.policy, "policy")),
            ref=place.frozen(load_causal_lm(cfg.ref or cfg.policy, "reference model")),
            device=device,
            bf16=bf16,
        )
        if cfg.uses_dpo:
            models.dpo = place.frozen(load_causal_lm(cfg.dpo_model, "DPO model"))
        if cfg.needs_critic:
            models.critic = place.trained(load_score_model(cfg.critic or cfg.reward_model or cfg.policy, "critic"))
    models.rm, models.rm_stats, models.layout = rm, rm_stats, layout.trained
    models.rm_ensemble = [
        (place.frozen(load_score_model(path, "ensemble reward model")), read_reward_stats(path))
        for path in (cfg.reward_model_ensemble if cfg.uses_rm else [])
    ]
    # --dpo-ref differs from --ref only when the DPO model came from another model.
    if cfg.uses_dpo and cfg.dpo_ref and Path(cfg.dpo_ref).resolve() != Path(cfg.ref or cfg.policy).resolve():
        models.dpo_ref = place.frozen(load_causal_lm(cfg.dpo_ref, "DPO reference model"))
    if cfg.gradient_checkpointing:
        models.checkpointed_layers = checkpoint_layers(models.trained_modules())
    return models


def checkpoint_layers(trained: list[nn.Module]) -> list[nn.Module]:
    """transformers' activation checkpointing on the trained models (non-reentrant: it works with
    frozen inputs, LoRA and FSDP2, whose hooks stay outside the recomputed forward); their decoder
    layers, which PPOModels.update_forward puts in training mode."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = []
    for model in trained:
        if not hasattr(model, "supports_gradient_checkpointing"):
            continue  # the LoRA critic's value head
        if not model.supports_gradient_checkpointing:
            raise UserError(
                f"ppo: --gradient-checkpointing: {type(model).__name__} does not support activation "
                "checkpointing in transformers"
            )
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        layers += [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise UserError("ppo: --gradient-checkpointing: the trained models have no layers transformers can checkpoint")
    return layers


class _Placer:
    """Puts each model where the layout wants it: on the device, whole (one process, or replicated,
    then wrapped by FSDP2 with shards of one), or sharded. Frozen full models in bf16 when asked,
    trained ones in fp32 (bf16 compute through autocast, or FSDP2's mixed precision when wrapped)."""

    def __init__(self, device: torch.device, bf16: bool, dist: Dist, layout: Layout):
        self.device, self.bf16, self.dist, self.layout = device, bf16, dist, layout

    def frozen(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        if self.bf16:
            model.to(torch.bfloat16)
        if self.layout.frozen == "shard":
            return wrap(model, self.dist, "shard", frozen=True)  # moves only this process's shard to the device
        return model.to(self.device)

    def trained(self, model: nn.Module, *more: nn.Module) -> nn.Module:
        for m in (model, *more):
            if self.layout.trained != "shard":  # sharded: fully_shard moves only this process's shard
                m.to(self.device)
            # A new value head or LoRA adapter is random per process: process 0's goes to every
            # process (FSDP2, unlike DDP's wrapper, does not broadcast at start).
            self.dist.broadcast_([p for p in m.parameters() if p.requires_grad])
            if self.layout.trained != "single":
                wrap(m, self.dist, self.layout.trained, self.layout.mixed_precision)
        return model

    def shared(self, shared: SharedBase) -> None:
        """The LoRA shared base: a bf16 base under fp32 adapters, and the critic's value head."""
        base = shared.model.get_base_model()
        if self.bf16:
            base.to(torch.bfloat16)
            for adapter in ("policy", "critic"):  # adapters train in fp32 on the bf16 base
                for p in shared.adapter_parameters(adapter):
                    p.data = p.data.float()
        # The transformers model inside peft's wrappers is what gets wrapped: generate and forward
        # both run through it (PPOModels.trained_modules).
        self.trained(base, shared.value_head)
        shared.find_parameters()  # sharding registers new parameter objects


def _shared_base_models(cfg: PPOStageConfig, rm, device: torch.device, bf16: bool) -> PPOModels:
    """--lora-r: one frozen SFT model; policy and critic adapters; reference = no adapter."""
    if cfg.ref and not same_path(cfg.ref, cfg.policy):
        raise UserError("ppo: with --lora-r the reference is the shared base (--policy); drop --ref")
    if cfg.critic:
        raise UserError("ppo: with --lora-r the critic is an adapter on the shared base; drop --critic")
    dpo_adapter = None
    if cfg.uses_dpo and is_adapter_dir(cfg.dpo_model) and same_path(adapter_base(cfg.dpo_model), cfg.policy):
        dpo_adapter = cfg.dpo_model
    # The critic starts from the RM (rto.lm.lora): its head, and its adapter when the RM is an
    # adapter on this same base.
    rm_adapter = (
        cfg.reward_model
        if rm is not None and is_adapter_dir(cfg.reward_model) and same_path(adapter_base(cfg.reward_model), cfg.policy)
        else None
    )
    head = rm_value_head(rm) if rm is not None and cfg.needs_critic else None
    targets = cfg.lora_target_modules if cfg.lora_target_modules != ["all-linear"] else "all-linear"
    shared = SharedBase(
        load_causal_lm(cfg.policy, "policy"),
        cfg.lora_r,
        cfg.lora_alpha,
        targets,
        dpo_adapter,
        critic_adapter=rm_adapter,
        value_head=head,
    )
    models = PPOModels(policy=shared.view("policy"), ref=shared.view(None), device=device, bf16=bf16, shared=shared)
    if cfg.uses_dpo:
        # A DPO model trained as an adapter on this base joins it; any other is loaded whole.
        models.dpo = shared.view("dpo") if dpo_adapter else load_causal_lm(cfg.dpo_model, "DPO model")
    models.critic = shared.critic() if cfg.needs_critic else None
    return models


@dataclass
class Optimized:
    """A network the loop trains (the policy; the critic where the estimator needs one), with its
    optimizer and learning-rate schedule. `name` prefixes its metrics and checkpoint entries."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.opt.param_groups for p in group["params"]]


def optimized(models: PPOModels, cfg: PPOStageConfig, total_steps: int) -> list[Optimized]:
    """The policy, and the critic where the estimator needs one, each with its own AdamW and schedule."""
    nets = [Optimized("policy", models.policy, *make_optimizer(models.policy, cfg.actor_lr, cfg, total_steps))]
    if cfg.needs_critic:
        nets.append(Optimized("critic", models.critic, *make_optimizer(models.critic, cfg.critic_lr, cfg, total_steps)))
    return nets


def make_optimizer(model: nn.Module, lr: float, cfg: PPOStageConfig, total_steps: int):
    """AdamW over the model's trained parameters, and its schedule: warm-up (--warmup-steps, else
    --warmup-ratio of the run), then cosine (to --lr-min-ratio of the peak, 10% unless set), linear
    (to 0) or constant over the run's optimizer steps."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.weight_decay,
    )
    name = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    extra = {"min_lr_rate": cfg.lr_min_ratio} if cfg.lr_schedule == "cosine" else None
    warmup = min(cfg.warmup_steps, total_steps) if cfg.warmup_steps else math.ceil(cfg.warmup_ratio * total_steps)
    sched = get_scheduler(
        name, opt, num_warmup_steps=warmup, num_training_steps=total_steps, scheduler_specific_kwargs=extra
    )
    return opt, sched
