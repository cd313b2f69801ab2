"""`rto ppo`'s checkpoints: what the next iteration depends on, written and read in one place.

`RunState` is the loop's own state beside the weights (the prompt order, the metrics so far, the KL
coefficient, the guard's count, the dev selection, the shuffling RNG); `Checkpoints` saves and
restores it together with the trained networks and their optimizers (`rto.rl.models.Optimized`).
Nothing here reads the trainer: every input is passed in. The file format and its atomic writing
are in rto/runtime/checkpoint.py; the guarantees in docs/reliability.md.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rto.core.kl_control import AdaptiveKL, FixedKL
from rto.core.selection import Selection
from rto.io.config import to_dict
from rto.io.errors import UserError
from rto.rl.config import PPOStageConfig
from rto.rl.models import Optimized, PPOModels
from rto.runtime.checkpoint import (
    checkpoint_staging,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    load_rng_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
)
from rto.runtime.distributed import Dist
from rto.runtime.sharding import load_sharded, save_sharded, shard_like, shard_optimizer_state

SELECTED = "policy_selected"  # OUT/ subdirectory: the dev selection's best policy so far

# Settings that may change between a run and its resumption without changing its result; and the
# layout over processes (`shard`: like the number of processes, it changes the order of
# floating-point sums, as another machine would). `out`: a run folder moved or copied (to another
# disk) resumes where it now is; a checkpoint holds nothing under its old path.
RESUMABLE_CHANGES = (
    "out",
    "iterations",
    "prompt_epochs",
    "save_every",
    "keep_last",
    "resume",
    "eval_every",
    "n_eval",
    "dist_timeout",
    "shard_frozen",
    "shard",
)


@dataclass
class RunState:
    """The training loop's state besides weights and optimizers: all a resumed run needs to go on
    exactly as the uninterrupted one."""

    kl_ctl: FixedKL  # the KL coefficient (fixed, or adaptive: rto.core.kl_control)
    selection: Selection | None  # the dev selection (--select-by), None without it
    generator: torch.Generator  # prompt order and mini-batch shuffles
    order: list[int] = field(default_factory=list)  # prompts left in this pass over the pool
    history: list[dict] = field(default_factory=list)  # one row of metrics per iteration
    curve: list[dict] = field(default_factory=list)  # one row per dev evaluation
    bad_steps: int = 0  # consecutive non-finite updates

    @classmethod
    def start(cls, cfg: PPOStageConfig) -> RunState:
        """A fresh run's state: the KL controller, the dev selection (best point, early stop, KL budget)
        where --select-by asks for one, and the shuffling RNG seeded with the run's seed."""
        kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else FixedKL(cfg.kl_coef)
        selection = Selection(cfg.select_by, cfg.patience, cfg.kl_budget) if cfg.select_by else None
        return cls(kl_ctl=kl_ctl, selection=selection, generator=torch.Generator().manual_seed(cfg.seed))

    def draw(self, pool_size: int, n: int) -> list[int]:
        """The next `n` prompt indices of the global rollout: passes over the pool, reshuffled each pass
        (the same order in every process)."""
        picks = []
        while len(picks) < n:
            if not self.order:
                self.order = torch.randperm(pool_size, generator=self.generator).tolist()
            picks.append(self.order.pop())
        return picks

    def meta(self) -> dict:
        return {
            "order": self.order,
            "history": self.history,
            "curve": self.curve,
            "kl_coef": self.kl_ctl.value,
            "bad_steps": self.bad_steps,
            "selection": self.selection.state_dict() if self.selection is not None else None,
        }

    def load_meta(self, meta: dict) -> None:
        self.order, self.history, self.curve = list(meta["order"]), list(meta["history"]), list(meta["curve"])
        self.kl_ctl.value = float(meta["kl_coef"])
        self.bad_steps = int(meta["bad_steps"])
        if self.selection is not None:
            self.selection.load_state_dict(meta["selection"])


class Checkpoints:
    """OUT/checkpoints/: save every --save-every iterations, resume (--resume), in one process or several."""

    def __init__(self, cfg: PPOStageConfig, dist: Dist, models: PPOModels, trained: list[Optimized], state: RunState):
        self.cfg, self.dist, self.models, self.trained, self.state = cfg, dist, models, trained, state
        self.root = Path(cfg.out) / "checkpoints"

    def _sharded_parts(self) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
        """The trained modules under one root (their checkpoint names), and their optimizers."""
        names = ("base", "value_head") if self.models.shared is not None else ("policy", "critic")
        root = torch.nn.ModuleDict(dict(zip(names, self.models.trained_modules())))
        return root, [net.opt for net in self.trained]

    def contents(self, iteration: int) -> tuple[dict, dict]:
        """(tensors, JSON meta); sharded runs leave the weights and Adam states to `save_sharded`."""
        tensors: dict[str, torch.Tensor] = {}
        for model, params in ({} if self.models.sharded else self.models.trained()).items():
            tensors.update({f"{model}.weights.{n}": p for n, p in params.items()})
        meta: dict = {"iteration": iteration, "config": to_dict(self.cfg), **self.state.meta()}
        for net in self.trained:
            if not self.models.sharded:
                t, m = optimizer_state(net.opt, f"{net.name}.adam")
                tensors.update(t)
                meta[f"{net.name}_optimizer"] = m
            meta[f"{net.name}_scheduler"] = net.sched.state_dict()
        t, m = rng_state(self.state.generator)
        tensors.update(t)
        meta["rng"] = m
        return tensors, meta

    def save(self, iteration: int) -> None:
        """Every process calls it. Sharded: each writes its shards into the staging directory, then
        process 0 adds the rest and renames it into place (rto.runtime.checkpoint: atomic as ever)."""
        out, main = Path(self.cfg.out), self.dist.is_main
        staged = None
        if self.models.sharded:
            staged = checkpoint_staging(self.root, iteration) if main else None
            staged = Path(self.dist.broadcast_object(str(staged)))
            save_sharded(*self._sharded_parts(), staged / "shards")
        if main:
            extra = {SELECTED: out / SELECTED} if (out / SELECTED).is_dir() else None
            save_checkpoint(self.root, iteration, *self.contents(iteration), self.cfg.keep_last, extra, staged=staged)
        self.dist.barrier()

    def load(self, path: Path) -> int:
        """Restore a checkpoint; returns the number of iterations it had completed."""
        tensors, meta = load_checkpoint(path)
        mine, defaults = to_dict(self.cfg), to_dict(type(self.cfg)())
        theirs = meta.get("config", {})
        # A setting newer than the checkpoint counts as unchanged at its default.
        changed = sorted(
            k
            for k in set(mine) | set(theirs)
            if k not in RESUMABLE_CHANGES and mine.get(k) != theirs.get(k, defaults.get(k))
        )
        if changed:
            raise UserError(
                f"ppo: checkpoint {path} was written with other settings ({', '.join(changed)}); "
                "resume with the same ones or start a new --out"
            )
        sharded = (path / "shards").is_dir()
        if sharded:
            load_sharded(*self._sharded_parts(), path / "shards")
        with torch.no_grad():  # a one-process checkpoint: whole tensors, into shards where sharded now
            for model, params in ({} if sharded else self.models.trained()).items():
                for n, p in params.items():
                    key = f"{model}.weights.{n}"
                    if key not in tensors or tensors[key].shape != p.shape:
                        raise UserError(f"ppo: checkpoint {path} does not match the models ({key})")
                    p.copy_(shard_like(tensors[key], p))
        for net in self.trained:
            if not sharded:
                load_optimizer_state(net.opt, tensors, meta[f"{net.name}_optimizer"], f"{net.name}.adam")
                shard_optimizer_state(net.opt)
            net.sched.load_state_dict(meta[f"{net.name}_scheduler"])
        load_rng_state(tensors, meta["rng"], self.state.generator)
        self.state.load_meta(meta)
        if self.state.selection is not None and self.dist.is_main:
            # The selected policy as it was at this checkpoint (a later best, lost with the crash,
            # may be on disk): the resumed run selects exactly as the uninterrupted one.
            selected = Path(self.cfg.out) / SELECTED
            if selected.exists():
                shutil.rmtree(selected)
            if (path / SELECTED).is_dir():
                shutil.copytree(path / SELECTED, selected)
        return int(meta["iteration"])

    def resume_point(self) -> int:
        """The iterations done: 0 for a fresh run, else those of the checkpoint --resume names (auto: the last)."""
        if not self.cfg.resume:
            return 0
        if self.cfg.resume == "auto":
            path = self.last()
            if path is None:
                return 0
        else:
            path = Path(self.cfg.resume)
            if not path.is_dir():
                raise UserError(f"ppo: --resume {path}: no such checkpoint directory")
        done = self.load(path)
        print(f"[rto] ppo: resumed from {path} after iteration {done}", file=sys.stderr, flush=True)
        return done

    def last(self) -> Path | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None
