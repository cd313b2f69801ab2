"""What `rto ppo` leaves behind: the policy (the dev selection's, or the last), the critic,
OUT/metrics.json, model cards and the training curve. Every function takes what it reads."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from rto.core.selection import Selection, divergence
from rto.io.data import write_json
from rto.lm.model_cards import write_model_card
from rto.lm.models import save_model
from rto.rl.checkpoint import SELECTED
from rto.rl.config import PPOStageConfig
from rto.rl.models import PPOModels
from rto.rl.plot import plot_run
from rto.runtime.distributed import Dist
from rto.runtime.sharding import full_state_dict


def export_policy(models: PPOModels, tokenizer, dist: Dist, path: Path) -> bool:
    """The policy as an ordinary transformers directory (LoRA merged in). Every process calls it: a
    sharded policy is gathered whole into process 0, which writes it (returns True there)."""
    main = dist.is_main
    if not models.sharded:
        if main:
            save_model(models.policy, tokenizer, path)
        return main
    state = full_state_dict(models.policy_root)
    if main:
        if models.shared is not None:
            from rto.lm.lora import merged_state_dict  # peft, only for a LoRA run

            state = merged_state_dict(models.shared.model, "policy", state)
        save_model(models.policy_root, tokenizer, path, state_dict=state)
    return main


def keep_if_best(selection: Selection | None, point: dict, models: PPOModels, tokenizer, dist: Dist, out: Path) -> None:
    """With --select-by, a new best dev point's policy is saved to OUT/policy_selected (every process
    calls it; the selection is process 0's)."""
    if selection is not None and selection.observe(point):
        if export_policy(models, tokenizer, dist, out / SELECTED):
            (out / SELECTED / "selected.json").write_text(json.dumps({"iteration": point["iteration"]}))


def save_results(
    cfg: PPOStageConfig,
    models: PPOModels,
    tokenizer,
    dist: Dist,
    selection: Selection | None,
    history: list[dict],
    curve: list[dict],
    summary: dict,
) -> None:
    """OUT/policy is the result: the selected policy with --select-by (the last one then goes to
    OUT/policy_last), else the last; OUT/critic, OUT/metrics.json, model cards. Every process calls
    it (a sharded policy is gathered); process 0 writes."""
    out, main = Path(cfg.out), dist.is_main
    true = cfg.held_out_metric
    summary["divergence"] = divergence(curve, true=true) if true else None
    if summary["divergence"] is not None and main:
        d = summary["divergence"]
        print(
            f"[rto] ppo: over-optimisation: at iteration {d['iteration']} the dev {true} has fallen to "
            f"{d[true]:.3f} from {d[true + '_at_best']:.3f} (iteration {d['true_best_iteration']}) "
            f"while the RM score rose to {d['rm_score']:.3f} from {d['rm_score_at_best']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    if selection is not None:
        summary["selection"] = {
            "metric": selection.metric,
            "best": selection.best,
            "best_iteration": selection.best_iteration,
            "stopped": selection.stop_reason or None,
        }
    selected = selection is not None and (out / SELECTED).is_dir()  # (process 0's view is the one that counts)
    if export_policy(models, tokenizer, dist, out / ("policy_last" if selected else "policy")) and selected:
        write_model_card(out / "policy_last", "ppo", cfg, summary)
        if (out / "policy").exists():
            shutil.rmtree(out / "policy")
        os.replace(out / SELECTED, out / "policy")
    if cfg.needs_critic and cfg.save_critic and models.shared is None:
        state = full_state_dict(models.critic) if models.sharded else None
        if main:
            save_model(models.critic, tokenizer, out / "critic", state_dict=state)
    if main:
        write_json(out / "metrics.json", summary)
        write_model_card(out / "policy", "ppo", cfg, summary)
        plot_run(summary, history, out / "training_curve.png")
