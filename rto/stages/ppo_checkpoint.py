"""What `rto ppo` writes and when it stops: resumable checkpoints (everything the next iteration
depends on), the count of non-finite updates that ends a run, the policy the dev selection keeps,
and the final models.

A mixin of `PPOTrainer` (rto/stages/ppo.py), kept apart so the PPO file holds PPO; the file
format and its atomic writing are in rto/checkpoint.py, the guarantees in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from rto.checkpoint import checkpoint_staging, list_checkpoints
from rto.core.selection import divergence
from rto.data import write_json
from rto.errors import UserError
from rto.models import save_model, write_model_card
from rto.sharding import (full_state_dict, is_wrapped, load_sharded, save_sharded, shard_like,
                          shard_optimizer_state)
from rto.stages.ppo_plot import plot_run

SELECTED = "policy_selected"  # OUT/ subdirectory: the dev selection's best policy so far


class CheckpointMixin:
    # --- checkpoints: everything the next iteration depends on ------------------------------
    # Settings that may change between a run and its resumption without changing its result; and
    # the layout over processes (`shard`: like the number of processes, it changes the order of
    # floating-point sums, as another machine would).
    RESUMABLE_CHANGES = ("iterations", "save_every", "keep_last", "resume", "eval_every", "n_eval", "dist_timeout",
                         "shard_frozen", "shard")

    def _trained(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return self.models.trained()

    @property
    def _sharded_state(self) -> bool:
        """Several processes: trained weights and Adam states go through torch.distributed.checkpoint."""
        return is_wrapped(self.models.trained_modules()[0])

    def _state_parts(self) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
        """The trained modules under one root (their checkpoint names), and their optimizers."""
        names = ("base", "value_head") if self.models.shared is not None else ("policy", "critic")
        root = torch.nn.ModuleDict(dict(zip(names, self.models.trained_modules())))
        return root, [self.policy_opt, *([self.critic_opt] if self.models.critic is not None else [])]

    def state(self, iteration: int) -> tuple[dict, dict]:
        """(tensors, JSON meta); sharded runs leave the weights and Adam states to `save_sharded`."""
        from rto.checkpoint import optimizer_state, rng_state
        from rto.config import to_dict

        tensors: dict[str, torch.Tensor] = {}
        sharded = self._sharded_state
        for model, params in ({} if sharded else self._trained()).items():
            tensors.update({f"{model}.weights.{n}": p for n, p in params.items()})
        meta: dict = {"iteration": iteration, "config": to_dict(self.cfg), "order": self.order,
                      "history": self.history, "curve": self.curve, "kl_coef": self.kl_ctl.value,
                      "bad_steps": self.bad_steps,
                      "selection": self.selection.state_dict() if self.selection is not None else None}
        opts = [("policy", self.policy_opt, self.policy_sched)]
        if self.models.critic is not None:
            opts.append(("critic", self.critic_opt, self.critic_sched))
        for name, opt, sched in opts:
            if not sharded:
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
        mine, defaults = to_dict(self.cfg), to_dict(type(self.cfg)())
        theirs = meta.get("config", {})
        # A setting newer than the checkpoint counts as unchanged at its default.
        changed = sorted(k for k in set(mine) | set(theirs)
                         if k not in self.RESUMABLE_CHANGES and mine.get(k) != theirs.get(k, defaults.get(k)))
        if changed:
            raise UserError(f"ppo: checkpoint {path} was written with other settings ({', '.join(changed)}); "
                            "resume with the same ones or start a new --out")
        sharded = (path / "shards").is_dir()
        if sharded:
            load_sharded(*self._state_parts(), path / "shards")
        with torch.no_grad():  # a one-process checkpoint: whole tensors, into shards where sharded now
            for model, params in ({} if sharded else self._trained()).items():
                for n, p in params.items():
                    key = f"{model}.weights.{n}"
                    if key not in tensors or tensors[key].shape != p.shape:
                        raise UserError(f"ppo: checkpoint {path} does not match the models ({key})")
                    p.copy_(shard_like(tensors[key], p))
        opts = [("policy", self.policy_opt, self.policy_sched)]
        if self.models.critic is not None:
            opts.append(("critic", self.critic_opt, self.critic_sched))
        for name, opt, sched in opts:
            if not sharded:
                load_optimizer_state(opt, tensors, meta[f"{name}_optimizer"], f"{name}.adam")
                shard_optimizer_state(opt)
            sched.load_state_dict(meta[f"{name}_scheduler"])
        load_rng_state(tensors, meta["rng"], self.generator)
        self.order = list(meta["order"])
        self.history = list(meta["history"])
        self.curve = list(meta["curve"])
        self.kl_ctl.value = float(meta["kl_coef"])
        self.bad_steps = int(meta["bad_steps"])
        if self.selection is not None:
            self.selection.load_state_dict(meta["selection"])
            # The selected policy as it was at this checkpoint (a later best, lost with the crash,
            # may be on disk): the resumed run selects exactly as the uninterrupted one.
            selected = Path(self.cfg.out) / SELECTED
            if selected.exists() and self.dist.is_main:
                shutil.rmtree(selected)
            if (path / SELECTED).is_dir() and self.dist.is_main:
                shutil.copytree(path / SELECTED, selected)
        return int(meta["iteration"])

    def _save_checkpoint(self, iteration: int) -> None:
        """Every process calls it. Sharded: each writes its shards into the staging directory, then
        process 0 adds the rest and renames it into place (rto.checkpoint: atomic as ever)."""
        from rto.checkpoint import save_checkpoint

        out = Path(self.cfg.out)
        root, main = out / "checkpoints", self.dist.is_main
        staged = None
        if self._sharded_state:
            staged = checkpoint_staging(root, iteration) if main else None
            staged = Path(self.dist.broadcast_object(str(staged)))
            save_sharded(*self._state_parts(), staged / "shards")
        if main:
            tensors, meta = self.state(iteration)
            extra = {SELECTED: out / SELECTED} if (out / SELECTED).is_dir() else None
            save_checkpoint(root, iteration, tensors, meta, self.cfg.keep_last, extra, staged=staged)
        self.dist.barrier()

    def _resume_point(self) -> int:

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

    def _note_step(self, finite: bool, what: str) -> None:
        """Count consecutive non-finite updates; too many in a row end the run with a clear message."""
        self.bad_steps = 0 if finite else self.bad_steps + 1
        if self.bad_steps > self.cfg.max_bad_steps:
            last = list_checkpoints(Path(self.cfg.out) / "checkpoints")
            where = f"; the last good checkpoint is {last[-1]}" if last else ""
            raise UserError(f"ppo: {self.bad_steps} consecutive non-finite updates ({what}) at iteration "
                            f"{len(self.history) + 1}: the run stopped{where}")

    # --- the dev selection and the final models ---------------------------------------------
    def _evaluated(self, point: dict) -> None:
        """Record a dev evaluation (process 0); with --select-by, a new best's policy is saved."""
        self.curve.append(point)
        if self.selection is not None and self.selection.observe(point):
            out = Path(self.cfg.out)
            if self._export_policy(out / SELECTED):
                (out / SELECTED / "selected.json").write_text(json.dumps({"iteration": point["iteration"]}))

    def _export_policy(self, path: Path) -> bool:
        """The policy as an ordinary transformers directory (LoRA merged in). Every process calls it:
        a sharded policy is gathered whole into process 0, which writes it (returns True there)."""
        models, main = self.models, self.dist.is_main
        if not self._sharded_state:
            if main:
                save_model(models.policy, self.tokenizer, path)
            return main
        state = full_state_dict(models.policy_root)
        if main:
            if models.shared is not None:
                from rto.lora import merged_state_dict

                state = merged_state_dict(models.shared.model, "policy", state)
            save_model(models.policy_root, self.tokenizer, path, state_dict=state)
        return main

    def _stop_requested(self) -> bool:
        """Process 0 decides (it evaluates); every process learns it in the same collective."""
        local = self.selection is not None and self.selection.should_stop
        return not self.dist.all_true(not local, self.device)

    def _save_results(self, out: Path, summary: dict) -> None:
        """OUT/policy is the result: the selected policy with --select-by (the last one then goes to
        OUT/policy_last), else the last; OUT/critic, OUT/metrics.json, model cards. Every process
        calls it (a sharded policy is gathered); process 0 writes."""
        main = self.dist.is_main
        sel = self.selection
        true = self.cfg.held_out_metric
        summary["divergence"] = divergence(self.curve, true=true) if true else None
        if summary["divergence"] is not None and main:
            d = summary["divergence"]
            print(f"[rto] ppo: over-optimisation: at iteration {d['iteration']} the dev {true} has fallen to "
                  f"{d[true]:.3f} from {d[true + '_at_best']:.3f} (iteration {d['true_best_iteration']}) "
                  f"while the RM score rose to {d['rm_score']:.3f} from {d['rm_score_at_best']:.3f}",
                  file=sys.stderr, flush=True)
        if sel is not None:
            summary["selection"] = {"metric": sel.metric, "best": sel.best, "best_iteration": sel.best_iteration,
                                    "stopped": sel.stop_reason or None}
        selected = sel is not None and (out / SELECTED).is_dir()  # (process 0's view is the one that counts)
        if self._export_policy(out / ("policy_last" if selected else "policy")) and selected:
            write_model_card(out / "policy_last", "ppo", self.cfg, summary)
            if (out / "policy").exists():
                shutil.rmtree(out / "policy")
            os.replace(out / SELECTED, out / "policy")
        if self.models.critic is not None and self.cfg.save_critic and self.models.shared is None:
            state = full_state_dict(self.models.critic) if self._sharded_state else None
            if main:
                save_model(self.models.critic, self.tokenizer, out / "critic", state_dict=state)
        if main:
            write_json(out / "metrics.json", summary)
            write_model_card(out / "policy", "ppo", self.cfg, summary)
            plot_run(summary, self.history, out / "training_curve.png")
