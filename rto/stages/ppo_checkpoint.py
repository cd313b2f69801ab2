"""Checkpoints of `rto ppo`: everything the next iteration depends on, saved and restored.

A mixin of `PPOTrainer` (rto/stages/ppo.py), kept apart so the PPO file holds PPO; the file
format and its atomic writing are in rto/checkpoint.py, the guarantees in docs/reliability.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rto.errors import UserError


class CheckpointMixin:
    # --- checkpoints: everything the next iteration depends on ------------------------------
    # Settings that may change between a run and its resumption without changing its result.
    RESUMABLE_CHANGES = ("iterations", "save_every", "keep_last", "resume", "eval_every", "n_eval")

    def _trained(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return self.models.trained()

    def state(self, iteration: int) -> tuple[dict, dict]:
        from rto.checkpoint import optimizer_state, rng_state
        from rto.config import to_dict

        tensors: dict[str, torch.Tensor] = {}
        for model, params in self._trained().items():
            tensors.update({f"{model}.weights.{n}": p for n, p in params.items()})
        meta: dict = {"iteration": iteration, "config": to_dict(self.cfg), "order": self.order,
                      "history": self.history, "curve": self.curve, "kl_coef": self.kl_ctl.value,
                      "bad_steps": self.bad_steps}
        opts = [("policy", self.policy_opt, self.policy_sched)]
        if self.models.critic is not None:
            opts.append(("critic", self.critic_opt, self.critic_sched))
        for name, opt, sched in opts:
            t, m = optimizer_state(opt, f"{name}.adam")
            tensors.update(t)
            meta[f"{name}_optimizer"] = m
            meta[f"{name}_scheduler"] = sched.state_dict()
        t, m = rng_state(self.generator)
        tensors.update(t)
        meta["rng"] = m
        return tensors, meta

    def load_state(self, path: Path) -> int:
        """Restore a checkpoint; returns the number of iterations it had completed."""
        from rto.checkpoint import load_checkpoint, load_optimizer_state, load_rng_state
        from rto.config import to_dict

        tensors, meta = load_checkpoint(path)
        mine = to_dict(self.cfg)
        theirs = {self.cfg.RENAMED.get(k, k): v for k, v in meta.get("config", {}).items()}  # older names
        changed = sorted(k for k in set(mine) | set(theirs)
                         if k not in self.RESUMABLE_CHANGES and mine.get(k) != theirs.get(k))
        if changed:
            raise UserError(f"ppo: checkpoint {path} was written with other settings ({', '.join(changed)}); "
                            "resume with the same ones or start a new --out")
        with torch.no_grad():
            for model, params in self._trained().items():
                for n, p in params.items():
                    key = f"{model}.weights.{n}"
                    if key not in tensors or tensors[key].shape != p.shape:
                        raise UserError(f"ppo: checkpoint {path} does not match the models ({key})")
                    p.copy_(tensors[key])
        opts = [("policy", self.policy_opt, self.policy_sched)]
        if self.models.critic is not None:
            opts.append(("critic", self.critic_opt, self.critic_sched))
        for name, opt, sched in opts:
            load_optimizer_state(opt, tensors, meta[f"{name}_optimizer"], f"{name}.adam")
            sched.load_state_dict(meta[f"{name}_scheduler"])
        load_rng_state(tensors, meta["rng"], self.generator)
        self.order = list(meta["order"])
        self.history = list(meta["history"])
        self.curve = list(meta["curve"])
        self.kl_ctl.value = float(meta["kl_coef"])
        self.bad_steps = int(meta["bad_steps"])
        return int(meta["iteration"])

    def _resume_point(self) -> int:
        from rto.checkpoint import list_checkpoints

        cfg = self.cfg
        if not cfg.resume:
            return 0
        if cfg.resume == "auto":
            found = list_checkpoints(Path(cfg.out) / "checkpoints")
            if not found:
                return 0
            path = found[-1]
        else:
            path = Path(cfg.resume)
            if not path.is_dir():
                raise UserError(f"ppo: --resume {path}: no such checkpoint directory")
        done = self.load_state(path)
        print(f"[rto] ppo: resumed from {path} after iteration {done}", file=sys.stderr, flush=True)
        return done
