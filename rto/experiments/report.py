"""What a person reads at the end: a results table and a plot of gold reward over training."""

from __future__ import annotations

from pathlib import Path


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Aligned text columns: the first left-aligned, the rest right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _with_ci(m: dict, key: str) -> str:
    ci = m.get(f"{key}_ci")
    return f"{_fmt(m.get(key))} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(m.get(key))


def results_table(summary: dict) -> str:
    methods = summary["methods"]
    base = summary.get("baseline", "sft")
    part_names = list(next((m["gold_parts"] for m in methods.values() if m.get("gold_parts")), {}))
    judged = any("judge_score" in m for m in methods.values())
    rows = [
        (
            "method",
            "gold reward [95% CI]",
            *(f"gold:{p}" for p in part_names),
            f"win vs {base}",
            f"KL to {base}",
            "RM score",
            *(["judge [95% CI]"] if judged else []),
            "length",
        )
    ]
    for name, m in {**methods, **(summary.get("last_checkpoints") or {})}.items():
        parts = [_fmt((m.get("gold_parts") or {}).get(p)) for p in part_names]
        rows.append(
            (
                name,
                _with_ci(m, "gold_reward"),
                *parts,
                _fmt(m.get(f"win_rate_vs_{base}")),
                _fmt(m.get(f"kl_to_{base}"), ".2f"),
                _fmt(m.get("rm_score")),
                *([_with_ci(m, "judge_score")] if judged else []),
                _fmt(m.get("response_length"), ".1f"),
            )
        )
    lines = format_table(rows)
    notes = [one_run_note(summary)] if "seed" in summary else []
    for name, sel in (summary.get("selection") or {}).items():
        how = f"stopped early: {sel['stopped']}" if sel.get("stopped") else f"ran {sel['iterations_run']} iterations"
        last = "the last one" if sel["best_iteration"] == sel["iterations_run"] else f"{name}@last is the last"
        notes.append(
            f"{name}: the checkpoint of iteration {sel['best_iteration']}, chosen by dev {sel['metric']} "
            f"({sel['best']:.3f}; {how}); {last}"
        )
    for name, d in (summary.get("divergence") or {}).items():
        true = d.get("metric", "gold_reward")
        notes.append(
            f"{name}: OVER-OPTIMISATION from iteration {d['iteration']}: dev {true.replace('_', ' ')} "
            f"{d[true + '_at_best']:.3f} (iteration {d['true_best_iteration']}) -> {d[true]:.3f} "
            f"while the RM score rose {d['rm_score_at_best']:.3f} -> {d['rm_score']:.3f}"
        )
    notes += summary.get("dpo_notes") or []
    if summary.get("settings"):
        notes.append(f"RL settings: {summary['settings']['source']}")
    if notes:
        notes.append("")
    notes += accuracy_notes(summary)
    if "label_agreement" in summary:
        notes.append(f"preference labels agreeing with the gold order: {summary['label_agreement']:.3f}")
    if "teacher_gold_reward" in summary:
        notes.append(f"teacher (SFT data) gold reward: {summary['teacher_gold_reward']:.3f}")
    if "seconds" in summary:
        notes.append(f"wall time: {summary['seconds']:.0f} s")
    return "\n".join(lines + [""] + notes)


def one_run_note(summary: dict) -> str:
    """What one run can show: its intervals resample the test prompts of this one training run;
    the seed's effect (which can reverse a gap between methods) needs runs over seeds."""
    import shlex

    n = summary.get("n_test_prompts")
    return (
        f"one training run (seed {summary['seed']}): the [95% CI]s cover the sampling of the "
        f"{f'{n} ' if n else ''}test prompts, not the training run's randomness, so a gap between methods "
        f"here can reverse with another seed; over seeds: rto reproduce --task {shlex.quote(str(summary['task']))} "
        "--seeds 5 --out DIR"
    )


# Which held-out accuracies the table reports, and how it names them.
_ACCURACIES = (
    ("rm", "RM held-out accuracy against the gold order", "the RM"),
    ("judge", "judge (held-out RM) accuracy against the gold order", "the judge"),
    ("dpo", "DPO implicit-reward accuracy on the same pairs (RTO's reward model)", "the DPO model"),
)


def accuracy_notes(summary: dict) -> list[str]:
    """Each held-out accuracy with its 95% Wilson interval over the pairs, and one plain line for
    each whose interval says it cannot be told from chance (rto.lm.evaluate.chance_verdict)."""
    from rto.lm.evaluate import chance_verdict

    n = summary.get("heldout_pairs")
    notes, warnings = [], []
    for key, label, who in _ACCURACIES:
        acc, ci = summary.get(f"{key}_accuracy"), summary.get(f"{key}_accuracy_ci")
        if acc is None:
            continue
        if not ci:  # a summary from before the intervals: the accuracy alone
            notes.append(f"{label}: {acc:.3f}")
            continue
        ties = summary.get(f"{key}_accuracy_ties")
        notes.append(
            f"{label}: {acc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] over {n} pairs"
            + (f" ({ties} exact ties, counted half)" if ties else "")
        )
        verdict = chance_verdict(ci)
        if verdict:
            warnings.append(
                f"WARNING: {who} orders the held-out pairs {verdict}: the 95% interval of its accuracy "
                f"over {n} pairs {'includes' if verdict == 'near chance' else 'lies below'} 0.5"
            )
    return notes + warnings


# Twenty distinct colours (matplotlib's tab20: its ten dark shades, then their light partners) and a
# marker each: no two methods of a figure look alike, however many are compared.
_COLOURS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8", "H", "1", "2", "3", "4", "+"]


def method_styles(names: list[str]) -> dict[str, dict]:
    """A distinct matplotlib style (color, marker, linestyle) per method name, in the order given;
    methods with a gold reward in their name (oracle references) are dashed."""
    out = {}
    for i, name in enumerate(dict.fromkeys(names)):
        out[name] = {
            "color": _COLOURS[i % len(_COLOURS)],
            "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": "--" if "gold" in name else "-",
        }
    return out


def plot_training(summary: dict, path: str | Path) -> Path | None:
    """Dev-set gold reward (else the judge's score, else the RM score) against prompts seen, one line
    per RL method; a star at the checkpoint the dev selection kept, a dotted line where
    over-optimisation was flagged."""
    curves = summary.get("curves") or {}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has = {k for c in curves.values() for p in c for k in p}
    key = next(k for k in ("gold_reward", "judge_score", "rm_score") if k in has or k == "rm_score")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = method_styles(list(curves))
    for name, points in curves.items():
        pts = [p for p in points if key in p]
        (line,) = ax.plot([p["prompts_seen"] for p in pts], [p[key] for p in pts], ms=3, label=name, **styles[name])
        chosen = (summary.get("selection") or {}).get(name)
        if chosen:  # the checkpoint the dev selection kept
            best = [p for p in pts if p["iteration"] == chosen["best_iteration"]]
            ax.plot(
                [p["prompts_seen"] for p in best],
                [p[key] for p in best],
                marker="*",
                ms=14,
                ls="",
                color=line.get_color(),
            )
        flagged = (summary.get("divergence") or {}).get(name)
        if flagged:  # where the proxy kept rising while the gold reward fell
            at = [p["prompts_seen"] for p in pts if p["iteration"] == flagged["iteration"]]
            if at:
                ax.axvline(at[0], color=line.get_color(), ls=":", alpha=0.6)
    references = {"sft": ("grey", "--"), "dpo": ("black", ":")}
    for name, value in (summary.get("reference_lines") or {}).items():
        color, ls = references.get(name, ("grey", "-."))
        ax.axhline(value, color=color, ls=ls, label=name)
    ax.set_xlabel("RL prompts seen")
    ax.set_ylabel(f"{key.replace('_', ' ')} (dev prompts)")
    ax.set_title(f"{summary.get('task', '')}: {key.replace('_', ' ')} over training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
