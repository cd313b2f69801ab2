"""The training curve of one `rto ppo` run (OUT/training_curve.png), drawn as the run saves its
results; the pipeline's cross-method plot is rto.experiments.report.plot_training."""

from __future__ import annotations

from pathlib import Path


def plot_run(summary: dict, history: list[dict], path: str | Path) -> Path | None:
    """One `rto ppo` run's curves: the score of each rollout (gold reward where the task has one,
    else the RM's) and its KL to the reference, per iteration; beside them the dev-set metric of
    the evaluations (`--eval-prompts`), a star at the checkpoint the dev selection kept."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary.get("curve") or []
    panels = 3 if curve else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), dpi=110)
    its = [h["iteration"] for h in history]
    score = "gold_reward" if any("gold_reward" in h for h in history) else "rm_score"
    for ax, key, label in (
        (axes[0], score, f"{score.replace('_', ' ')} (rollouts)"),
        (axes[1], "kl", "KL to the reference per response"),
    ):
        pts = [(i, h[key]) for i, h in zip(its, history) if key in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_xlabel("iteration")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if curve:
        has = {k for p in curve for k in p}
        key = next(k for k in ("gold_reward", "judge_score", "rm_score") if k in has or k == "rm_score")
        pts = [p for p in curve if key in p]
        axes[2].plot([p["iteration"] for p in pts], [p[key] for p in pts], marker="s", ms=3)
        chosen = summary.get("selection") or {}
        best = [p for p in pts if p["iteration"] == chosen.get("best_iteration")]
        if best:
            axes[2].plot(
                [p["iteration"] for p in best],
                [p[key] for p in best],
                marker="*",
                ms=14,
                ls="",
                label=f"kept (iteration {chosen['best_iteration']})",
            )
            axes[2].legend(fontsize=8)
        axes[2].set_xlabel("iteration")
        axes[2].set_title(f"{key.replace('_', ' ')} (dev prompts)", fontsize=10)
        axes[2].grid(alpha=0.3)
    fig.suptitle(f"rto ppo --reward {summary.get('reward', '')}", fontsize=10)
    # Fixed margins rather than tight_layout, which draws the whole figure once more to measure its
    # text: a third of a plot's time, and a pipeline draws one per run.
    width = fig.get_figwidth()  # margins in inches: room for tick labels such as -0.010
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.14, top=0.83, wspace=0.25)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)  # written whole, then renamed into place
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
