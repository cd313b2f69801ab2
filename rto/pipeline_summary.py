"""The end of `rto pipeline`: OUT/summary.json, the results table, the training plot, and the SFT
and DPO reference lines on the dev prompts - everything read back from the stages' outputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rto.data import write_json


def summarise(pipe, start: float, rl_jobs: list) -> dict:
    from rto.report import plot_training, results_table

    out = pipe.out
    ev = json.loads((out / "eval.json").read_text())
    summary: dict = {"task": pipe.cfg.task, "preset": pipe.cfg.preset, "baseline": "sft",
                     "methods": {k: v for k, v in ev["methods"].items() if "@" not in k},
                     "last_checkpoints": {k: v for k, v in ev["methods"].items() if "@" in k},
                     "n_test_prompts": ev["n_prompts"]}
    for summary_key, metrics_file in (("rm", out / "rm" / "metrics.json"), ("judge", out / "judge_rm" / "metrics.json")):
        if metrics_file.is_file():
            rmm = json.loads(metrics_file.read_text())
            if "eval_accuracy" in rmm:
                summary[f"{summary_key}_accuracy"] = rmm["eval_accuracy"]
            summary[f"{summary_key}_train_accuracy"] = rmm.get("train_accuracy")
    for summary_key, info_file, field in (("teacher_gold_reward", "data_info.json", "teacher_gold_reward"),
                                          ("label_agreement", "pairs_info.json", "label_agreement_with_gold")):
        f = out / "data" / info_file
        if f.is_file():
            summary[summary_key] = json.loads(f.read_text())[field]
    curves, selection, divergence = {}, {}, {}
    for name, _, _ in rl_jobs:
        mf = out / name / "metrics.json"
        if mf.is_file():
            run = json.loads(mf.read_text())
            curves[name] = run.get("curve", [])
            if run.get("selection"):
                selection[name] = {**run["selection"], "iterations_run": run["iterations"]}
            if run.get("divergence"):
                divergence[name] = run["divergence"]
    summary.update(curves=curves, selection=selection, divergence=divergence)
    summary["reference_lines"] = reference_lines(pipe, rl_jobs[0][2]) if curves else {}
    if rl_jobs:
        summary["settings"] = settings_record(pipe, rl_jobs)
    summary["timings_s"] = pipe.timings
    summary["seconds"] = time.time() - start
    write_json(out / "summary.json", summary)
    plot = plot_training(summary, out / "training_curve.png")
    table = results_table(summary)
    (out / "results.txt").write_text(table + "\n")
    print("\n" + table)
    if plot:
        print(f"plot: {plot}")
    print(f"summary: {out / 'summary.json'}")
    return summary


def settings_record(pipe, rl_jobs: list) -> dict:
    """Where the RL settings came from (tuned on dev, or the preset as it is) and their values."""
    from rto.tune import TUNED_KEYS

    tuned = pipe.preset_record.get("tuned")
    if tuned:
        b = tuned["budget"]
        source = (f"tuned on the dev split by rto tune (seed {tuned['seed']}, {tuned['criterion']}; {b['ppo_runs']} PPO "
                  f"and {b['rto_runs']} RTO runs of {b['iterations_per_run']} iterations)")
    else:
        source = (f"the task's preset {pipe.cfg.preset!r} as it is (not tuned on this task's dev split; --tune or "
                  "`rto tune` would choose them there)")
    return {"source": source, "tuned": tuned or None,
            "rl": {name: {k: getattr(cfg, k) for k in TUNED_KEYS} for name, _, cfg in rl_jobs}}


def reference_lines(pipe, ppo_cfg) -> dict:
    """SFT and DPO on the same dev prompts, evaluated as the RL curves are (rto.evaluate.dev_point)."""
    from rto.prompt_pool import read_prompts
    from rto.evaluate import dev_point
    from rto.models import load_causal_lm, load_score_model, load_tokenizer

    if not ppo_cfg.eval_prompts or not ppo_cfg.eval_every:
        return {}
    tokenizer = load_tokenizer(pipe.out / "sft")
    # The prompts the trainer's dev evaluations read (same columns and long-prompt handling).
    prompts = read_prompts(ppo_cfg.eval_prompts, tokenizer, max_len=ppo_cfg.max_prompt_len,
                           long_prompts=ppo_cfg.long_prompts, columns=ppo_cfg.columns,
                           skip_bad_rows=ppo_cfg.skip_bad_rows)[:ppo_cfg.n_eval]
    rm = load_score_model(pipe.out / "rm") if (pipe.out / "rm").is_dir() and pipe.task is None else None
    lines = {}
    for name in ("sft", "dpo"):
        if name not in pipe.cfg.methods:
            continue
        point = dev_point(load_causal_lm(pipe.out / name), tokenizer, prompts, max_new_tokens=ppo_cfg.max_new_tokens,
                          temperature=ppo_cfg.temperature, seed=ppo_cfg.seed, task=pipe.task, rm=rm)
        if point:
            lines[name] = point.get("gold_reward", point.get("rm_score"))
    return lines


def last_differs(run: Path) -> bool:
    """An RL run whose dev selection kept another checkpoint than its last (OUT/policy_last)."""
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    sel = metrics.get("selection")
    return bool(sel) and (run / "policy_last").is_dir() and sel["best_iteration"] != metrics["iterations"]
