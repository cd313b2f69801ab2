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

from rto.checkpoint import list_checkpoints
from rto.core.selection import divergence
from rto.data import write_json
from rto.errors import UserError
from rto.models import save_model, write_model_card

SELECTED = "policy_selected"  # OUT/ subdirectory: the dev selection's best policy so far


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
                      "bad_steps": self.bad_steps,
                      "selection": self.selection.state_dict() if self.selection is not None else None}
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
        from rto.checkpoint import save_checkpoint

        out = Path(self.cfg.out)
        tensors, meta = self.state(iteration)
        extra = {SELECTED: out / SELECTED} if (out / SELECTED).is_dir() else None
        save_checkpoint(out / "checkpoints", iteration, tensors, meta, self.cfg.keep_last, extra)

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
            save_model(self.models.policy, self.tokenizer, out / SELECTED)
            (out / SELECTED / "selected.json").write_text(json.dumps({"iteration": point["iteration"]}))

    def _stop_requested(self) -> bool:
        """Process 0 decides (it evaluates); every process learns it in the same collective."""
        local = self.selection is not None and self.selection.should_stop
        return not self.dist.all_true(not local, self.device)

    def _save_results(self, out: Path, summary: dict) -> None:
        """OUT/policy is the result: the selected policy with --select-by (the last one then goes to
        OUT/policy_last), else the last; OUT/critic, OUT/metrics.json, model cards."""
        sel = self.selection
        true = self.cfg.held_out_metric
        summary["divergence"] = divergence(self.curve, true=true) if true else None
        if summary["divergence"] is not None:
            d = summary["divergence"]
            print(f"[rto] ppo: over-optimisation: at iteration {d['iteration']} the dev {true} has fallen to "
                  f"{d[true]:.3f} from {d[true + '_at_best']:.3f} (iteration {d['true_best_iteration']}) "
                  f"while the RM score rose to {d['rm_score']:.3f} from {d['rm_score_at_best']:.3f}",
                  file=sys.stderr, flush=True)
        if sel is not None:
            summary["selection"] = {"metric": sel.metric, "best": sel.best, "best_iteration": sel.best_iteration,
                                    "stopped": sel.stop_reason or None}
        if sel is not None and (out / SELECTED).is_dir():
            save_model(self.models.policy, self.tokenizer, out / "policy_last")
            write_model_card(out / "policy_last", "ppo", self.cfg, summary)
            if (out / "policy").exists():
                shutil.rmtree(out / "policy")
            os.replace(out / SELECTED, out / "policy")
        else:
            save_model(self.models.policy, self.tokenizer, out / "policy")
        if self.models.critic is not None and self.cfg.save_critic and self.models.shared is None:
            save_model(self.models.critic, self.tokenizer, out / "critic")
        write_json(out / "metrics.json", summary)
        write_model_card(out / "policy", "ppo", self.cfg, summary)
