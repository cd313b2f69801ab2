"""`rto ppo` over several processes on PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

One code path, two layouts of the trained models (policy, critic), each wrapped per decoder
layer and at its root on a device mesh:
- `shard` (an FSDP accelerate config, or --shard full): a 1-D mesh over every process; weights,
  gradients and Adam states are split across the processes and each layer is gathered for its
  pass and freed after it (ZeRO-3): per-process memory of a model falls as 1/processes;
- `replicate` (--shard none): a 2-D mesh (processes x 1), i.e. shards of one process: every
  process keeps every weight and FSDP2 all-reduces the gradients, as DDP does. FSDP2 rather than
  DDP's wrapper: its hooks are per module, so the critic read through its head's hook, two LoRA
  adapters of one base trained in separate backward passes and gradients accumulated over
  micro-batches are averaged exactly as when sharding; DDP follows only its own forward.
Frozen models (reference, DPO model, RMs) are sharded the same way (forward only) or kept whole
in every process (--shard-frozen).

Rollouts: generation runs the policy once per new token and the processes finish after
different numbers of tokens; gathering each layer for each token would cost an all-gather per
layer per token and hang when one process stops first. `gathered` unshards the policy once for
the whole rollout (peak: one full copy of the policy, as a colocated vLLM holds) and reshards after.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from rto.runtime.distributed import Dist


@dataclass
class Layout:
    """How this run places its models. `trained`/`frozen`: "single" (one process), "replicate" or "shard"."""

    trained: str
    frozen: str
    world: int
    mixed_precision: bool  # bf16 compute on fp32 sharded weights (trained models)
    source: str  # what chose it, for the start-up line

    def describe(self) -> str:
        if self.trained == "single":
            return "one process: every model whole"
        where = {
            "shard": f"sharded over {self.world} processes (FSDP2)",
            "replicate": f"replicated in {self.world} processes",
        }
        grads = ", gradients all-reduced (FSDP2, shards of one)" if self.trained == "replicate" else ""
        mp = "; bf16 compute on fp32 weights" if self.mixed_precision else ""
        return (
            f"{self.world} processes ({self.source}): policy and critic {where[self.trained]}{grads}; frozen models "
            f"{where[self.frozen]}{mp}"
        )


def launcher_sharding() -> str | None:
    """What the accelerate config asks for, read from the variables `accelerate launch` sets (its
    PartialState reports FSDP only on GPUs): "FSDP FULL_SHARD", "DEEPSPEED", ... or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return f"FSDP {os.environ.get('FSDP_SHARDING_STRATEGY', 'FULL_SHARD')}"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "DEEPSPEED"
    return None


def plan_layout(shard: str, shard_frozen: str, dist: Dist, bf16: bool) -> Layout:
    """--shard auto follows the launcher's config: an FSDP (but NO_SHARD) or DeepSpeed config shards."""
    if not dist.active:
        return Layout("single", "single", 1, False, "")
    engine = launcher_sharding()
    if shard == "auto":
        trained = "shard" if engine and engine != "FSDP NO_SHARD" else "replicate"
        source = f"accelerate config: {engine}" if engine else "--shard auto"
    else:
        trained, source = ("shard" if shard == "full" else "replicate"), f"--shard {shard}"
    frozen = trained if shard_frozen == "auto" else ("shard" if shard_frozen == "shard" else "replicate")
    return Layout(trained, frozen, dist.world, bf16 and trained != "single", source)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: its `_no_split_modules` classes (as
    accelerate's TRANSFORMER_BASED_WRAP finds them), else the children of its longest ModuleList."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _mesh(dist: Dist, layout: str):
    from torch.distributed.device_mesh import init_device_mesh

    device = dist.device.type if dist.device is not None else "cpu"
    if layout == "shard":
        return init_device_mesh(device, (dist.world,), mesh_dim_names=("shard",))
    return init_device_mesh(device, (dist.world, 1), mesh_dim_names=("replicate", "shard"))


def wrap(model: nn.Module, dist: Dist, layout: str, mixed_precision: bool = False, frozen: bool = False) -> nn.Module:
    """fully_shard each decoder layer, then the root (which keeps what the layers do not: embeddings,
    final norm, heads - tied embeddings stay together). In place; returns the model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _mesh(dist, layout)
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # A frozen root is gathered for its forward only: free it after (a trained root is kept for backward).
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=frozen)
    return model


def units(*models: nn.Module | None) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    found, seen = [], set()
    for model in models:
        for m in model.modules() if model is not None else []:
            if isinstance(m, FSDPModule) and id(m) not in seen:
                found.append(m)
                seen.add(id(m))
    return found


def is_wrapped(model: nn.Module | None) -> bool:
    return bool(units(model))


@contextlib.contextmanager
def gathered(model: nn.Module | None, frozen: bool = False):
    """The model whole in every process for the block (one all-gather per unit), sharded again after."""
    parts = units(model)
    if not parts:
        yield
        return
    for unit in parts:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in parts:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
        # As `wrap` left it: a trained root keeps its weights from forward to backward.
        parts[0].set_reshard_after_forward(frozen, recurse=False)


def full_state_dict(model: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """Every weight whole: on the CPU in process 0 (the others get {}), or `everywhere` on each
    process's device (vLLM's copy). A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `like`: this process's shard of it when `like` is a DTensor (a
    collective: every process calls it in the same order), else the tensor as it is."""
    if not hasattr(like, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements)


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After an optimizer loaded whole states (a one-process checkpoint) for sharded parameters:
    each per-element state (Adam's moments) becomes this process's shard, laid out as its parameter."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape:
                    state[key] = shard_like(value, p)


def scalar(t) -> float:
    return float(full_tensor(t)) if torch.is_tensor(t) else float(t)


# --- checkpoints through torch.distributed.checkpoint ---------------------------------------------
def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Trained weights only: a LoRA base (frozen) is not written again with every checkpoint.
    return StateDictOptions(ignore_frozen_params=True)


def save_sharded(module: nn.Module, optimizers: list[torch.optim.Optimizer], path) -> None:
    """Each process writes its shards of the trained weights and their Adam states into `path` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizers, options=_state_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def load_sharded(module: nn.Module, optimizers: list[torch.optim.Optimizer], path) -> None:
    """The inverse of `save_sharded`; DCP reshards when the number of processes changed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizers, options=_state_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        module, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_state_options()
    )


def resident_bytes(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer] = ()) -> int:
    """Bytes this process holds of the modules' parameters (its shards) and of the optimizers' states."""
    seen: set[int] = set()
    tensors = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                tensors.append(p)
    tensors += [v for opt in optimizers for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)
