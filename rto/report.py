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


def results_table(summary: dict) -> str:
    methods = summary["methods"]
    base = summary.get("baseline", "sft")
    part_names = list(next((m["gold_parts"] for m in methods.values() if m.get("gold_parts")), {}))
    rows = [("method", "gold reward [95% CI]", *(f"gold:{p}" for p in part_names), f"win vs {base}",
             f"KL to {base}", "RM score", "length")]
    for name, m in methods.items():
        ci = m.get("gold_reward_ci")
        gold = f"{_fmt(m.get('gold_reward'))} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(m.get("gold_reward"))
        parts = [_fmt((m.get("gold_parts") or {}).get(p)) for p in part_names]
        rows.append((name, gold, *parts, _fmt(m.get(f"win_rate_vs_{base}")), _fmt(m.get(f"kl_to_{base}"), ".2f"),
                     _fmt(m.get("rm_score")), _fmt(m.get("response_length"), ".1f")))
    lines = format_table(rows)
    notes = []
    if "rm_accuracy" in summary:
        notes.append(f"RM held-out accuracy against the gold order: {summary['rm_accuracy']:.3f}")
    if "label_agreement" in summary:
        notes.append(f"preference labels agreeing with the gold order: {summary['label_agreement']:.3f}")
    if "teacher_gold_reward" in summary:
        notes.append(f"teacher (SFT data) gold reward: {summary['teacher_gold_reward']:.3f}")
    if "seconds" in summary:
        notes.append(f"wall time: {summary['seconds']:.0f} s")
    return "\n".join(lines + [""] + notes)


def plot_training(summary: dict, path: str | Path) -> Path | None:
    """Dev-set gold reward (or RM score) against prompts seen, one line per RL method."""
    curves = summary.get("curves") or {}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "gold_reward" if any("gold_reward" in p for c in curves.values() for p in c) else "rm_score"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in curves.items():
        pts = [p for p in points if key in p]
        ax.plot([p["prompts_seen"] for p in pts], [p[key] for p in pts], marker="o", ms=3, label=name)
    styles = {"sft": ("grey", "--"), "dpo": ("black", ":")}
    for name, value in (summary.get("reference_lines") or {}).items():
        color, ls = styles.get(name, ("grey", "-."))
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
