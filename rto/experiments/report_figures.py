"""The figures of `rto reproduce`: training curves, the data-limited sweep, reward against KL,
win rates, and the token heat-map of the DPO log-ratio beside the gold token reward.

    python -m rto.experiments.report_figures DIR [DIR ...]    # redraw a finished run's figures from its JSON

Reward against KL needs each seed's run directory (its dev curve); where those are gone, that
figure is left as it was and the others are redrawn from DIR/results.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rto.experiments.report import method_styles


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figures(results: dict, per_seed: list[dict], out: Path, cfg=None) -> list[Path]:
    plt = _plt()
    paths = []

    # 1. gold reward vs RL prompts seen
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = method_styles([*results["curves"], *results["methods"]])  # one style per method in every figure
    for name, pts in results["curves"].items():
        pts = [p for p in pts if "gold_reward" in p]
        ax.plot([p["prompts_seen"] for p in pts], [p["gold_reward"] for p in pts], ms=3, label=name, **styles[name])
    for name, value in results["reference_lines"].items():
        ax.axhline(value, color="grey" if name == "sft" else "black", ls=":" if name == "dpo" else "--", label=name)
    ax.set(
        xlabel="RL prompts seen",
        ylabel="gold reward (dev, mean over seeds)",
        title=f"{results['task']}: gold reward over training ({len(results['seeds'])} seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, out / "curves.png", plt))

    # 2. gold reward vs RL prompts, each seen once (the data-limited sweep)
    eff = results["data_efficiency"]
    if eff:  # (a run without the sweep has no such figure)
        fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
        for m in ("ppo", "rto"):
            ys = [r["gold_reward"] for r in eff[m]]
            err = [
                [y - r["gold_reward_ci"][0] for y, r in zip(ys, eff[m])],
                [r["gold_reward_ci"][1] - y for y, r in zip(ys, eff[m])],
            ]
            ax.errorbar(eff["prompts"], ys, yerr=err, marker="o", capsize=3, label=m)
        lo, hi = eff["ppo"][-1]["gold_reward_ci"]
        ax.axhspan(lo, hi, color="C0", alpha=0.15, label="PPO, whole pool (95% CI)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="RL prompts, each seen once", ylabel="gold reward (test)", title="data-limited sweep")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / "data_efficiency.png", plt))

    # 3. gold reward vs sqrt(KL to SFT), one point per dev checkpoint per seed (from the run directories)
    names = [n for n in results["curves"]]
    runs_here = all((Path(ps["runs"][n]) / "metrics.json").is_file() for ps in per_seed for n in names)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for name in names if runs_here else ():
        xs, ys = [], []
        for ps in per_seed:
            curve = json.loads((Path(ps["runs"][name]) / "metrics.json").read_text())["curve"]
            for p in curve:
                if "gold_reward" in p and "kl_to_ref" in p:
                    xs.append(math.sqrt(max(p["kl_to_ref"], 0.0)))
                    ys.append(p["gold_reward"])
        ax.scatter(xs, ys, s=10, alpha=0.6, label=name, color=styles[name]["color"], marker=styles[name]["marker"])
    ax.set(
        xlabel="sqrt(KL to SFT) (nats^0.5, dev samples)",
        ylabel="gold reward (dev)",
        title="reward vs divergence, one point per checkpoint",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if runs_here:
        paths.append(_save(fig, out / "gold_vs_kl.png", plt))
    else:
        plt.close(fig)
        print(f"[rto] figures: {out}/gold_vs_kl.png kept as it was (the seeds' run directories are gone)")

    # 4. win rates with intervals
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    ms = [n for n in results["methods"] if n != "sft" and "@" not in n]
    vals = [results["methods"][n]["win_rate_vs_sft"] for n in ms]
    cis = [results["methods"][n]["win_rate_vs_sft_ci"] for n in ms]
    ax.bar(
        range(len(ms)),
        vals,
        yerr=[[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]],
        capsize=3,
        color=[styles[n]["color"] for n in ms],
    )
    ax.axhline(0.5, color="grey", ls="--")
    ax.set_xticks(range(len(ms)), ms, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="win rate vs SFT (gold reward, 95% CI)", ylim=(0, 1), title="win rate against SFT")
    fig.tight_layout()
    paths.append(_save(fig, out / "win_rates.png", plt))

    # 5. token heat-map: DPO log-ratio beside the true per-token gold reward
    align = next((a for a in results["token_alignment"].values() if a.get("examples")), None)
    if align:
        ex = align["examples"]
        fig, axes = plt.subplots(len(ex), 1, figsize=(11, 1.5 * len(ex) + 0.9), dpi=120, squeeze=False)
        # One scale for all examples, so a colour means the same value in every row; its bars at the right.
        lim = max(max(abs(v) for v in e["dpo_log_ratio"]) for e in ex) or 1.0
        top = max(max(e["gold"]) for e in ex) or 1e-6
        for ax, e in zip(axes[:, 0], ex):
            n = len(e["tokens"])
            ratio = ax.imshow(
                [e["dpo_log_ratio"]], cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", extent=(0, n, 1, 2)
            )
            gold = ax.imshow([e["gold"]], cmap="Greens", vmin=0, vmax=top, aspect="auto", extent=(0, n, 0, 1))
            ax.set_xlim(0, n)
            ax.set_ylim(0, 2)
            for t in range(n):
                # White numbers on dark cells (the colour maps' far ends), black on light ones.
                for y, value, dark in (
                    (1.5, f"{e['dpo_log_ratio'][t]:.1f}", abs(e["dpo_log_ratio"][t]) > 0.6 * lim),
                    (0.5, f"{e['gold'][t]:.2f}", e["gold"][t] > 0.6 * top),
                ):
                    ax.text(t + 0.5, y, value, ha="center", va="center", fontsize=6, color="white" if dark else "black")
            ax.set_xticks([t + 0.5 for t in range(n)], e["tokens"], fontsize=6)
            ax.set_yticks([0.5, 1.5], ["gold", "DPO log-ratio"], fontsize=7)
        fig.suptitle(
            f"DPO log-ratio vs gold token reward on SFT samples; Pearson r = "
            f"{align['pearson_all_tokens']:.2f} (all tokens), {align['pearson_before_last_token']:.2f} "
            f"(all but the last)",
            fontsize=9,
        )
        fig.tight_layout(rect=(0, 0, 0.88, 1))
        for where, image, label in (
            ([0.90, 0.55, 0.012, 0.35], ratio, "DPO log-ratio"),
            ([0.90, 0.10, 0.012, 0.35], gold, "gold token reward"),
        ):
            bar = fig.colorbar(image, cax=fig.add_axes(where))
            bar.set_label(label, fontsize=7)
            bar.ax.tick_params(labelsize=6)
        fig.savefig(out / "token_heatmap.png")
        plt.close(fig)
        paths.append(out / "token_heatmap.png")
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    import sys

    for d in argv if argv is not None else sys.argv[1:]:
        out = Path(d)
        results = json.loads((out / "results.json").read_text())
        per_seed = json.loads((out / "per_seed.json").read_text())
        for path in write_figures(results, per_seed, out):
            print(path)


if __name__ == "__main__":
    main()
