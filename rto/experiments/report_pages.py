"""`rto reproduce`'s results as text: the summary table printed at the end, results.md with every
claim's verdict, and the claims table across tasks (python -m rto.experiments.report_pages DIR ...)."""

from __future__ import annotations

import json
from pathlib import Path

from rto.experiments.data_ratio import ratio_text
from rto.experiments.report import format_table
from rto.experiments.report_reproduce import claims, interval_text, verdict_rules
from rto.experiments.tuning import FAMILIES


def summary_table(results: dict) -> str:
    rows = [("method", "gold reward [95% CI]", "win vs sft [95% CI]", "KL to sft", "RM score")]
    for name, m in results["methods"].items():
        rows.append(
            (
                name,
                f"{m['gold_reward']:.3f} {interval_text(m['gold_reward_ci'])}",
                f"{m['win_rate_vs_sft']:.3f} {interval_text(m['win_rate_vs_sft_ci'])}",
                f"{m['kl_to_sft']:.2f}",
                f"{m['rm_score']:.3f}",
            )
        )
    lines = format_table(rows)
    eff = results["data_efficiency"]
    lines.append("")
    if eff:
        lines.append(
            "data ratio, each prompt seen once (PPO's whole pool / RTO's prompts to match it): "
            + ratio_text(eff["ratio"])
        )
    if results.get("rm_accuracy") is not None:
        lines.append(f"RM held-out accuracy against the gold order: {results['rm_accuracy']:.3f}")
    return "\n".join(lines)


def _ci(m: dict, key: str = "gold_reward") -> str:
    return f"{m[key]:.3f} {interval_text(m[f'{key}_ci'])}"


def results_markdown(results: dict, command: str) -> str:
    """The tables of a reproduction as Markdown (the claims paragraph is written by a person)."""
    ms = results["methods"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {results.get('machine', '?')}. Wall time: {results.get('wall_time_s', 0) / 60:.0f} min. "
        f"Seeds: {results['seeds']}; {results['n_test_prompts']} test prompts per seed, one sample each. "
        "Intervals: 95% Student t over seeds (the seed is the unit of replication; n - 1 degrees of freedom) "
        "on the per-seed means, and on the per-seed paired differences below.",
        "",
    ]
    # one column per part of the gold reward, where the task has parts (none: no empty column)
    parts = list(next((m["gold_parts"] for m in ms.values() if m.get("gold_parts")), {}))
    lines += [
        "| method | gold reward [95% CI] | "
        + "".join(f"gold:{k} | " for k in parts)
        + "win vs SFT [95% CI] | KL to SFT | RM score |",
        "|" + "---|" * (5 + len(parts)),
    ]
    for name, m in ms.items():
        if "@" in name:
            continue
        p = "".join(f"{m.get('gold_parts', {}).get(k, float('nan')):.3f} | " for k in parts)
        lines.append(
            f"| {name} | {_ci(m)} | {p}{_ci(m, 'win_rate_vs_sft')} | {m['kl_to_sft']:.2f} | {m['rm_score']:.3f} |"
        )
    lines += [
        "",
        "Paired differences in gold reward (same seed, same prompt):",
        "",
        "| comparison | mean [95% CI] | per seed |",
        "|---|---|---|",
    ]
    for k, v in results["comparisons"].items():
        lines.append(
            f"| {k} | {v['mean']:+.3f} {interval_text(v['ci'], '+.3f')} | "
            + ", ".join(f"{x:+.3f}" for x in v.get("per_seed", []))
            + " |"
        )
    eff = results["data_efficiency"]
    if eff:
        lines += [
            "",
            "Data-limited sweep (each RL prompt seen once; test gold reward):",
            "",
            "| RL prompts (iterations) | "
            + " | ".join(f"{n} ({i})" for n, i in zip(eff["prompts"], eff["iterations"]))
            + " |",
            "|---|" + "---|" * len(eff["prompts"]),
        ]
        for m in ("ppo", "rto"):
            lines.append(f"| {m} | " + " | ".join(_ci(r) for r in eff[m]) + " |")
        per = ", ".join(
            "-" if r is None else f"{'>= ' if c else ''}{r:.3g}"
            for r, c in zip(eff["ratio"]["ratio_per_seed"], eff["ratio"]["censored_per_seed"])
        )
        lines += ["", f"Data ratio ({eff['definition']}): {ratio_text(eff['ratio'])}; per seed: {per}."]
    rules = verdict_rules(results["task"])
    margin = "none" if rules["margin"] is None else f"{rules['margin']:g} ({rules['margin_rule']})"
    lines += [
        "",
        'The paper\'s claims on this task. Verdict rules, fixed before the data: "beats" '
        "holds when the paired interval is above 0, fails when it is below 0 or inside (-margin, +margin), "
        'and is otherwise inconclusive; "at or above" and "reaches" are non-inferiority claims that '
        "hold when the interval's lower end is above -margin and fail when the whole interval is below "
        f"-margin; fewer than {rules['min_seeds']} seeds is inconclusive; a bound touching a threshold does "
        f"not clear it. Margin on this task: {margin}.",
        "",
        "| claim | verdict | evidence |",
        "|---|---|---|",
    ]
    lines += [f"| {c['claim']} | {c['verdict']} | {c['evidence']} |" for c in claims(results)]
    sel = results.get("selection") or {}
    if sel:
        lines += [
            "",
            "Dev selection: the iteration each seed's result was chosen at, and on how many seeds the "
            "proxy/gold divergence fired:",
            "",
            "| method | selected iteration per seed | divergence |",
            "|---|---|---|",
        ]
        lines += [
            f"| {n} | {', '.join('-' if i is None else str(i) for i in v['best_iteration_per_seed'])} | "
            f"{v['divergence_seeds']} of {len(v['best_iteration_per_seed'])} |"
            for n, v in sel.items()
        ]
    epochs = results.get("dpo_policy_best_epoch_per_seed") or []
    if any(e is not None for e in epochs):
        lines += [
            "",
            "The tuned DPO policy's epoch chosen on dev per seed (0: the SFT model): "
            + ", ".join("-" if e is None else f"{e:g}" for e in epochs)
            + ".",
        ]
    tuning = results.get("tuning", {})
    for seed, grids in tuning.get("grids", {}).items():
        # Each family's grids (PPO's at the top level, the critic-free families' under "families").
        families = {"ppo": grids, **grids.get("families", {})}
        for family, (base, dense) in FAMILIES.items():
            rec = families.get(family) or {}
            if f"{base}_grid" not in rec:
                continue
            rows = rec[f"{base}_grid"]
            score = "dev_score" if "dev_score" in rows[0] else "dev_gold"  # older results: final dev gold
            lr = "actor/critic lr" if family == "ppo" else f"{base.upper()} lr"
            lines += [
                "",
                ("Tuning" if family == "ppo" else f"Tuning {base.upper()}, then {dense.upper()},")
                + f" on the dev split (seed {seed}; "
                f"{rec.get('criterion', 'final dev gold reward')}; the grid's runs drew RL seed "
                f"{rec.get('rl_seed', '?')} and only chose the settings, the reported runs are fresh):",
                "",
                f"| {lr} | KL coef | dev score |",
                "|---|---|---|",
            ]
            lines += [f"| {r['actor_lr']:g} | {r['kl_coef']:g} | {r[score]:.3f} |" for r in rows]
            lines += ["", f"| {dense.upper()} beta1 | dpo_clip | dev score |", "|---|---|---|"]
            lines += [f"| {r['beta1']:g} | {r['dpo_clip']:g} | {r[score]:.3f} |" for r in rec[f"{dense}_grid"]]
        dpo = grids.get("dpo_policy")
        if dpo:  # tuned on the same seed, at the same dev criterion, with at least RTO's number of runs
            lines += [
                "",
                f"The DPO policy's grid ({dpo['runs']} runs; {dpo['criterion']}):",
                "",
                "| DPO beta | learning rate | selected epoch | dev score |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {r['beta']:g} | {r['learning_rate']:g} | {r['best_epoch']:g} | {r['dev_score']:.3f} |"
                for r in dpo["dpo_grid"]
            ]
    if tuning.get("chosen"):
        lines += ["", "Chosen: " + ", ".join(f"{k} = {v:g}" for k, v in tuning["chosen"].items()) + "."]
    if tuning.get("dpo_policy"):
        lines += [
            "",
            "The DPO policy (dpo-tuned): "
            + ", ".join(f"{k} = {v:g}" for k, v in tuning["dpo_policy"].items())
            + "; `dpo` is the preset's DPO model, RTO's token reward.",
        ]
    if results.get("rm_accuracy") is not None:
        lines += [
            "",
            f"RM held-out accuracy against the gold order: {results['rm_accuracy']:.3f} "
            f"(per seed: {', '.join(f'{a:.3f}' for a in results['rm_accuracy_per_seed'])}).",
        ]
    align = [a for a in results.get("token_alignment", {}).values() if a]
    if align:
        lines += [
            f"Pearson correlation of the DPO log-ratio with the true per-token gold reward on SFT samples: "
            f"{sum(a['pearson_all_tokens'] for a in align) / len(align):.3f} over all tokens, "
            f"{sum(a['pearson_before_last_token'] for a in align) / len(align):.3f} over all but the last "
            f"(the last token also carries the sequence-level part)."
        ]
    return "\n".join(lines) + "\n"


def cross_task_markdown(results_by_task: dict[str, dict], group: str | None = None) -> str:
    """One table of the claims over tasks (those of `group` only, where given: "paper" or "tool"):
    the verdict per task, the evidence below it."""
    tasks = list(results_by_task)
    rows: dict[str, dict[str, dict]] = {}
    for task, results in results_by_task.items():
        for c in claims(results):
            if group and c["group"] != group:
                continue
            key = c["claim"].split(" with 1/")[0] + (" with 1/8 of the prompts ..." if " with 1/" in c["claim"] else "")
            rows.setdefault(key, {})[task] = c
    lines = ["| claim | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for claim, by_task in rows.items():
        cells = [
            f"{by_task[t]['verdict']}<br>{by_task[t]['evidence']}" if t in by_task else "not tested" for t in tasks
        ]
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m rto.experiments.report_pages DIR [DIR ...]: the cross-task claims table
    import sys

    found = {}
    for d in sys.argv[1:]:
        r = json.loads((Path(d) / "results.json").read_text())
        found[r["task"]] = r
    print(cross_task_markdown(found))
