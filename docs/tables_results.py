"""docs/results.md's tables, from the committed `rto reproduce` results and benchmark JSON
(docs/tables.py writes and checks them)."""

from __future__ import annotations

import math
from pathlib import Path

from tables import read_json

from rto.experiments.data_ratio import ratio_text
from rto.experiments.report_pages import cross_task_markdown
from rto.experiments.report_reproduce import claims
from rto.experiments.tuning import DPO_POLICY

PAGE = "docs/results.md"
TASKS = ("keyed", "ordered", "count")


def _results(root: Path) -> dict[str, dict]:
    return {t: read_json(root, f"docs/results/{t}/results.json") for t in TASKS}


def _ci(lo: float, hi: float, fmt: str = ".3f") -> str:
    return "[n/a]" if math.isnan(lo) or math.isnan(hi) else f"[{lo:{fmt}}, {hi:{fmt}}]"


def paper_claims(root: Path) -> str:
    return cross_task_markdown(_results(root), group="paper")


def tool_checks(root: Path) -> str:
    return cross_task_markdown(_results(root), group="tool")


def runs(root: Path) -> str:
    """How each task's evidence was produced: command, seeds, wall time, machine."""
    lines = [
        "| task | seeds | wall time | machine | DPO policy (tuned on dev) | RL settings (tuned on dev) |",
        "|---|---|---|---|---|---|",
    ]
    for task, r in _results(root).items():
        dpo = ", ".join(f"{k} {v:g}" for k, v in r["tuning"].get("dpo_policy", {}).items()) or "-"
        rl = ", ".join(f"{k} {v:g}" for k, v in r["tuning"]["chosen"].items())
        lines.append(
            f"| `{task}` | {len(r['seeds'])} | {r['wall_time_s'] / 60:.0f} min | {r['machine']} | {dpo} | {rl} |"
        )
    return "\n".join(lines)


def coverage(root: Path) -> str:
    cov = read_json(root, "docs/results/ci_coverage.json")
    settings = cov["real_runs"]["settings"]
    lines = ["| setting (tau, sigma) | seeds | t interval | old hierarchical bootstrap |", "|---|---|---|---|"]
    for row in cov["rows"]:
        s = settings[row["setting"]]
        t, h = row["t_interval"], row["hierarchical_bootstrap"]
        lines.append(
            f"| {row['setting']} ({s['tau']:.3f}, {s['sigma']:.3f}) | {row['seeds']} | "
            f"{t['coverage']:.3f} ± {t['se']:.3f} | {h['coverage']:.3f} ± {h['se']:.3f} |"
        )
    lines += [
        "",
        f"(`{cov['command']}`, {cov['wall_time_s']:.0f} s; {t['reps']} data sets per cell for the t interval, "
        f"{h['reps']} for the old method; ± one binomial SE.)",
    ]
    return "\n".join(lines)


def task_table(task: str):
    def build(root: Path) -> str:
        r = read_json(root, f"docs/results/{task}/results.json")
        sel = r.get("selection", {})
        lines = [
            "| method | test gold reward [95% CI] | win vs SFT | KL to SFT | RM score | dev-selected at |",
            "|---|---|---|---|---|---|",
        ]
        epochs = r.get("dpo_policy_best_epoch_per_seed") or []
        for name, m in r["methods"].items():
            if "@" in name:
                continue
            where = ""
            if name in sel:
                its = ", ".join("-" if i is None else str(i) for i in sel[name]["best_iteration_per_seed"])
                flag = sel[name]["divergence_seeds"]
                where = f"iteration {its}" + (f" (divergence flagged on {flag})" if flag else "")
            elif name == DPO_POLICY and epochs:
                where = "epoch " + ", ".join("-" if e is None else f"{e:g}" for e in epochs)
            lines.append(
                f"| {name} | {m['gold_reward']:.3f} {_ci(*m['gold_reward_ci'])} | {m['win_rate_vs_sft']:.3f} | "
                f"{m['kl_to_sft']:.2f} | {m['rm_score']:.3f} | {where} |"
            )
        lines += ["", "| paired difference | mean [95% CI] | per seed |", "|---|---|---|"]
        for k, c in r["comparisons"].items():
            lines.append(
                f"| {k} | {c['mean']:+.3f} {_ci(*c['ci'], '+.3f')} | "
                + ", ".join(f"{x:+.3f}" for x in c["per_seed"])
                + " |"
            )
        return "\n".join(lines)

    return build


def sweep(root: Path) -> str:
    """The data-limited sweep per task and the measured data ratio."""
    out = []
    for task, r in _results(root).items():
        eff = r.get("data_efficiency") or {}
        if not eff:
            continue
        out += [
            f"`{task}` (test gold reward; RL prompts, iterations):",
            "",
            "| | " + " | ".join(f"{n} ({i})" for n, i in zip(eff["prompts"], eff["iterations"])) + " |",
            "|---|" + "---|" * len(eff["prompts"]),
        ]
        for m in ("ppo", "rto"):
            out.append(
                f"| {m} | " + " | ".join(f"{p['gold_reward']:.3f} {_ci(*p['gold_reward_ci'])}" for p in eff[m]) + " |"
            )
        ratio = eff["ratio"]
        per = ", ".join(
            "-" if x is None else f"{'>= ' if c else ''}{x:.3g}"
            for x, c in zip(ratio["ratio_per_seed"], ratio["censored_per_seed"])
        )
        out += ["", f"Data ratio: {ratio_text(ratio)}; per seed: {per}.", ""]
    return "\n".join(out)


def dpo_tuning(root: Path) -> str:
    """Each task's DPO policy grid (tuned on dev like RTO) and what the tuning changed."""
    lines = [
        "| task | DPO grid runs (RTO's) | chosen beta, learning rate | epoch chosen per seed | "
        "dpo-tuned - dpo (the preset's) |",
        "|---|---|---|---|---|",
    ]
    for task, r in _results(root).items():
        grid = next((g["dpo_policy"] for g in r["tuning"]["grids"].values() if g.get("dpo_policy")), None)
        if not grid:
            continue
        rto_runs = len(next(iter(r["tuning"]["grids"].values())).get("rto_grid", []))
        chosen = r["tuning"]["dpo_policy"]
        epochs = ", ".join("-" if e is None else f"{e:g}" for e in r.get("dpo_policy_best_epoch_per_seed", []))
        c = r["comparisons"].get(f"{DPO_POLICY} - dpo")
        diff = f"{c['mean']:+.3f} {_ci(*c['ci'], '+.3f')}" if c else "-"
        lines.append(
            f"| `{task}` | {grid['runs']} ({rto_runs}) | {chosen['beta']:g}, {chosen['learning_rate']:g} | "
            f"{epochs} | {diff} |"
        )
    return "\n".join(lines)


def ensembles_previous(root: Path) -> str:
    """The RM-ensemble checks, from the runs before issue 21's rerun (docs/results/previous-protocol)."""
    lines = ["| task | seeds | an RM ensemble helps PPO | an RM ensemble helps RTO |", "|---|---|---|---|"]
    for task in TASKS:
        r = read_json(root, f"docs/results/previous-protocol/{task}/results.json")
        found = {c["claim"]: c for c in claims(r) if c["claim"].startswith("an RM ensemble")}
        cells = [
            f"{found[k]['verdict']}<br>{found[k]['evidence']}" if k in found else "not tested"
            for k in ("an RM ensemble helps PPO", "an RM ensemble helps RTO")
        ]
        lines.append(f"| `{task}` | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def user_mirror(root: Path) -> str:
    s = read_json(root, "docs/results/user-mirror/summary.json")
    lines = ["| method | test gold reward [95% CI] | win vs SFT | KL to SFT | RM score |", "|---|---|---|---|---|"]
    for name, m in {**s["methods"], **s.get("last_checkpoints", {})}.items():
        sel = s.get("selection", {}).get(name)
        label = f"{name} (dev-selected: iteration {sel['best_iteration']})" if sel else name
        if name.endswith("@last"):
            label = f"{name} (iteration {s['selection'][name[:-5]]['iterations_run']})"
        lo, hi = m["gold_reward_ci"]
        lines.append(
            f"| {label} | {m['gold_reward']:.3f} {_ci(lo, hi)} | {m['win_rate_vs_sft']:.3f} | "
            f"{m['kl_to_sft']:.2f} | {m['rm_score']:.3f} |"
        )
    return "\n".join(lines)


def critic_free_cost(root: Path) -> str:
    """What a critic costs: bytes of trained weights + Adam states per process, and iteration time."""
    r = read_json(root, "docs/results/critic_free.json")
    lines = [
        "| method | estimator | reward | responses per prompt | critic | trained weights + Adam (MB) | "
        "x PPO | frozen models (MB) | iteration (s, median) | x PPO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in r["methods"].items():
        lines.append(
            f"| {name} | {m['estimator']} | {m['reward']} | {m['responses_per_prompt']} | "
            f"{'yes' if m['critic'] else 'no'} | {m['bytes_trained'] / 1e6:.2f} | {m['trained_vs_ppo']:.2f} | "
            f"{m['bytes_frozen'] / 1e6:.2f} | {m['iteration_s_median']:.3f} | {m['time_vs_ppo']:.2f} |"
        )
    arch = r["arch"]
    lines.append("")
    lines.append(
        f"`{r['command']}`: a random Llama ({arch['num_hidden_layers']} layers, hidden {arch['hidden_size']}), "
        f"{r['work']['prompts']} responses of {r['work']['response_len']} tokens per rollout for every method, "
        f"{r['rounds']} rounds in rotating order on {r['threads']} CPU threads; "
        "memory counted (parameters and optimizer states), not sampled."
    )
    return "\n".join(lines) + "\n"


CRITIC_FREE = ("ppo", "rto", "grpo", "rto-grpo", "rloo", "rto-rloo")


def _critic_free(root: Path) -> dict[str, dict]:
    """The tasks whose critic-free runs are committed (each task's runs land as they finish)."""
    done = [t for t in TASKS if (root / f"docs/results/critic-free/{t}/results.json").is_file()]
    return {t: read_json(root, f"docs/results/critic-free/{t}/results.json") for t in done}


def critic_free_claims(root: Path) -> str:
    return cross_task_markdown(_critic_free(root), group="critic-free")


def critic_free_methods(root: Path) -> str:
    """Each method's test gold reward over the seeds, its KL to SFT and the settings it ran with."""
    lines = [
        "| task | method | test gold reward [95% CI over seeds] | KL to SFT | settings (tuned on dev, seed 0) |",
        "|---|---|---|---|---|",
    ]
    for task, r in _critic_free(root).items():
        settings = read_json(root, f"docs/results/critic-free/{task}/per_seed.json")[0]["method_settings"]
        for name in ("sft", *CRITIC_FREE):
            m = r["methods"][name]
            lo, hi = m["gold_reward_ci"]
            unused = {"critic_lr"} if name not in ("ppo", "rto") else set()  # no critic
            unused |= {"beta1", "dpo_clip"} if not name.startswith("rto") else set()  # no DPO term
            tuned = ", ".join(f"{k} {v:g}" for k, v in settings.get(name, {}).items() if k not in unused) or "-"
            lines.append(
                f"| `{task}` | {name} | {m['gold_reward']:.3f} {_ci(lo, hi)} | {m['kl_to_sft']:.2f} | {tuned} |"
            )
    return "\n".join(lines)


def critic_free_runs(root: Path) -> str:
    """The tuning budget each family had (runs x iterations, on seed 0's dev split), and the wall time."""
    import yaml

    lines = [
        "| task | seeds | tuning: PPO, then RTO | tuning: GRPO, then RTO-GRPO | tuning: RLOO, then RTO-RLOO | "
        "wall time of the 5-seed runs |",
        "|---|---|---|---|---|---|",
    ]
    for task, r in _critic_free(root).items():
        tuned = yaml.safe_load((root / f"docs/results/critic-free/{task}/preset.yaml").read_text())["tuned"]
        cells = []
        for rec in (tuned, tuned["families"]["grpo"], tuned["families"]["rloo"]):
            runs = " + ".join(str(v) for k, v in rec["budget"].items() if k.endswith("_runs"))
            cells.append(
                f"{runs} runs x {rec['budget']['iterations_per_run']} iterations ({rec['seconds'] / 60:.0f} min)"
            )
        lines.append(f"| `{task}` | {len(r['seeds'])} | " + " | ".join(cells) + f" | {r['wall_time_s'] / 60:.0f} min |")
    return "\n".join(lines)


TABLES = {
    "results-critic-free-claims": (PAGE, critic_free_claims),
    "results-critic-free-methods": (PAGE, critic_free_methods),
    "results-critic-free-runs": (PAGE, critic_free_runs),
    "results-paper-claims": (PAGE, paper_claims),
    "results-tool-checks": (PAGE, tool_checks),
    "results-runs": (PAGE, runs),
    "results-coverage": (PAGE, coverage),
    "results-sweep": (PAGE, sweep),
    "results-dpo-tuning": (PAGE, dpo_tuning),
    "results-user-mirror": (PAGE, user_mirror),
    "results-ensembles-previous": (PAGE, ensembles_previous),
    "results-critic-free-cost": (PAGE, critic_free_cost),
    **{f"results-{t}": (PAGE, task_table(t)) for t in TASKS},
}
