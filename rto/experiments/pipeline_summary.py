"""The end of `rto pipeline`: OUT/summary.json, the results table, the training plot, the SFT
and DPO reference lines on the dev prompts, and how well the RM and the DPO model (RTO's reward)
order the held-out pairs - everything read back from the stages' outputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rto.io.data import write_json


def summarise(pipe, start: float, rl_jobs: list) -> dict:
    from rto.experiments.report import plot_training, results_table

    out = pipe.out
    ev = json.loads((out / "eval.json").read_text())
    summary: dict = {
        "task": pipe.cfg.task,
        "preset": pipe.cfg.preset,
        "seed": pipe.cfg.seed,
        "baseline": "sft",
        "methods": {k: v for k, v in ev["methods"].items() if "@" not in k},
        "last_checkpoints": {k: v for k, v in ev["methods"].items() if "@" in k},
        "n_test_prompts": ev["n_prompts"],
    }
    for summary_key, metrics_file in (
        ("rm", out / "rm" / "metrics.json"),
        ("judge", out / "judge_rm" / "metrics.json"),
    ):
        if metrics_file.is_file():
            rmm = json.loads(metrics_file.read_text())
            if "eval_accuracy" in rmm:
                summary[f"{summary_key}_accuracy"] = rmm["eval_accuracy"]
            summary[f"{summary_key}_train_accuracy"] = rmm.get("train_accuracy")
    summary.update(heldout_accuracies(pipe, summary))
    for summary_key, info_file, field in (
        ("teacher_gold_reward", "data_info.json", "teacher_gold_reward"),
        ("label_agreement", "pairs_info.json", "label_agreement_with_gold"),
    ):
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
    summary.update(curves=curves, selection=selection, divergence=divergence, dpo_notes=dpo_notes(pipe))
    summary["reference_lines"] = reference_lines(pipe, rl_jobs[0][2]) if curves else {}
    if rl_jobs:
        summary["settings"] = settings_record(pipe, rl_jobs)
    summary["timings_s"] = pipe.runner.timings
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


def heldout_pairs_file(out: Path) -> Path | None:
    """The held-out pairs (test-split prompts, ordered by gold reward) the RM, the judge and the
    DPO model are scored on; None where the pairs stage wrote none."""
    f = Path(out) / "data" / "prefs_heldout.jsonl"
    return f if f.is_file() and f.stat().st_size else None


def heldout_accuracies(pipe, summary: dict) -> dict:
    """On the held-out pairs: the DPO model's implicit-reward accuracy (RTO's reward model, beside
    the RM's), and each accuracy's 95% Wilson interval over the pairs - with a few hundred pairs an
    RM at 0.53 cannot be told from a coin, and the table says so (rto.lm.evaluate.chance_verdict)."""
    from rto.io.config import load_yaml
    from rto.io.data import PREFERENCE_FIELDS, read_rows
    from rto.lm.evaluate import implicit_reward_margins, margin_accuracy, wilson_interval
    from rto.lm.models import load_causal_lm, load_tokenizer

    heldout = heldout_pairs_file(pipe.out)
    if heldout is None:
        return {}
    rows = read_rows(heldout, PREFERENCE_FIELDS)  # as the RM stage reads its eval_data
    out: dict = {"heldout_pairs": len(rows)}
    dpo_dir, dpo_cfg = pipe.out / "dpo", pipe.out / "configs" / "dpo.yaml"
    if dpo_dir.is_dir() and dpo_cfg.is_file():
        cfg = load_yaml(dpo_cfg)
        reference = cfg.get("ref_model") or cfg["model"]  # what DPO trained against: the SFT model here
        margins = implicit_reward_margins(
            load_causal_lm(dpo_dir, "DPO model"),
            load_causal_lm(reference, "DPO reference model"),
            load_tokenizer(dpo_dir),
            rows,
        )
        out.update(
            dpo_accuracy=margin_accuracy(margins), dpo_accuracy_ties=int((margins == 0).sum()), dpo_beta=cfg.get("beta")
        )
    for key in ("rm", "judge", "dpo"):
        acc = out.get(f"{key}_accuracy", summary.get(f"{key}_accuracy"))
        if acc is not None:
            out[f"{key}_accuracy_ci"] = list(wilson_interval(acc, len(rows)))
    return out


def settings_record(pipe, rl_jobs: list) -> dict:
    """Where the RL settings came from (tuned on dev, or the preset as it is) and their values."""
    from rto.experiments.tuning import TUNED_KEYS

    tuned = pipe.preset_record.get("tuned")
    if tuned:
        records = ([tuned] if "budget" in tuned else []) + list(tuned.get("families", {}).values())  # each family's
        budgets = [
            " and ".join(
                f"{v} {k.removesuffix('_runs').upper()}" for k, v in r["budget"].items() if k.endswith("_runs")
            )
            + f" runs of {r['budget']['iterations_per_run']} iterations"
            for r in records
        ]
        criterion = next((r["criterion"] for r in records if "criterion" in r), "")
        source = (
            f"tuned on the dev split by rto tune (seed {tuned['seed']}, {criterion}; {'; '.join(budgets)}"
            + (f"; the DPO policy: {tuned['dpo_policy']['runs']} runs" if tuned.get("dpo_policy") else "")
            + ")"
        )
    else:
        source = (
            f"the task's preset {pipe.cfg.preset!r} as it is (not tuned on this task's dev split; --tune or "
            "`rto tune` would choose them there)"
        )
    return {
        "source": source,
        "tuned": tuned or None,
        "rl": {name: {k: getattr(cfg, k) for k in TUNED_KEYS} for name, _, cfg in rl_jobs},
    }


def reference_lines(pipe, ppo_cfg) -> dict:
    """SFT and DPO on the same dev prompts, evaluated as the RL curves are (rto.lm.evaluate.dev_point)."""
    from rto.io.prompt_pool import read_prompts
    from rto.lm.evaluate import dev_point
    from rto.lm.models import load_causal_lm, load_score_model, load_tokenizer
    from rto.lm.rollout import Sampling

    if not ppo_cfg.eval_prompts or not ppo_cfg.eval_every:
        return {}
    tokenizer = load_tokenizer(pipe.out / "sft")
    # The prompts the trainer's dev evaluations read (same columns and long-prompt handling).
    prompts = read_prompts(
        ppo_cfg.eval_prompts,
        tokenizer,
        max_len=ppo_cfg.max_prompt_len,
        long_prompts=ppo_cfg.long_prompts,
        columns=ppo_cfg.columns,
        skip_bad_rows=ppo_cfg.skip_bad_rows,
    )[: ppo_cfg.n_eval]
    rm = load_score_model(pipe.out / "rm") if (pipe.out / "rm").is_dir() and pipe.task is None else None
    lines = {}
    for name in ("sft", "dpo"):
        if name not in pipe.cfg.methods:
            continue
        point = dev_point(
            load_causal_lm(pipe.out / name),
            tokenizer,
            prompts,
            Sampling(ppo_cfg.max_new_tokens, ppo_cfg.temperature),
            seed=ppo_cfg.seed,
            task=pipe.task,
            rm=rm,
        )
        if point:
            lines[name] = point.get("gold_reward", point.get("rm_score"))
    return lines


def last_differs(run: Path) -> bool:
    """An RL run whose dev selection kept another checkpoint than its last (OUT/policy_last)."""
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    sel = metrics.get("selection")
    return bool(sel) and (run / "policy_last").is_dir() and sel["best_iteration"] != metrics["iterations"]


def dpo_notes(pipe) -> list[str]:
    """Which DPO each DPO row is: the preset's (RTO's token reward, untuned, its last epoch) and,
    where the run has it, the DPO baseline tuned and dev-selected as RTO is."""
    from rto.experiments.tuning import DPO_POLICY
    from rto.io.config import load_yaml

    notes, configs = [], pipe.out / "configs"
    if "dpo" in pipe.cfg.methods and (configs / "dpo.yaml").is_file():
        c = load_yaml(configs / "dpo.yaml")
        tuned = (configs / f"{DPO_POLICY}.yaml").is_file()
        notes.append(
            f"dpo: the preset's DPO settings (beta {c['beta']:g}, learning rate {c['learning_rate']:g}, "
            f"{c['epochs']:g} epoch{'' if c['epochs'] == 1 else 's'}; the last one), "
            "not tuned on dev: RTO's token reward"
            + ("" if tuned else "; a DPO baseline tuned and dev-selected as RTO is: --tune, or rto reproduce")
        )
        if tuned:
            c = load_yaml(configs / f"{DPO_POLICY}.yaml")
            sel = json.loads((pipe.out / DPO_POLICY / "metrics.json").read_text()).get("selection") or {}
            grid = (pipe.preset_record.get("tuned") or {}).get("dpo_policy", {}).get("runs")
            epoch = "?" if sel.get("best_epoch") is None else f"{sel['best_epoch']:g}"
            notes.append(
                f"{DPO_POLICY}: DPO with beta {c['beta']:g}, learning rate {c['learning_rate']:g} (chosen on "
                f"dev{f' from {grid} runs' if grid else ''}), epoch {epoch} of "
                f"{c['epochs']:g} chosen on dev {sel.get('metric', '')} (0: the SFT model)"
            )
    return notes
