"""Aggregating `rto reproduce` over seeds, and its figures.

Intervals are 95% hierarchical bootstraps: resample seeds, then prompts within each
resampled seed, so both sources of variation are in the interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rto.report import format_table


def hierarchical_ci(values_by_seed: list[list[float]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    groups = [torch.tensor(v, dtype=torch.float64) for v in values_by_seed if v]
    if not groups:
        return (float("nan"), float("nan"))
    g = torch.Generator().manual_seed(seed)
    means = torch.empty(n_boot, dtype=torch.float64)
    for b in range(n_boot):
        picked = torch.randint(len(groups), (len(groups),), generator=g)
        total, count = 0.0, 0
        for i in picked.tolist():
            vals = groups[i]
            idx = torch.randint(len(vals), (len(vals),), generator=g)
            total += float(vals[idx].sum())
            count += len(vals)
        means[b] = total / count
    return (float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975)))


def _samples(seed_dir: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    with open(seed_dir / "eval_samples.jsonl") as fh:
        for line in fh:
            row = json.loads(line)
            out.setdefault(row["model"], []).append(row)
    return out


def pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 2:
        return float("nan")
    t = torch.tensor([x, y], dtype=torch.float64)
    return float(torch.corrcoef(t)[0, 1])


@torch.no_grad()
def token_alignment(seed_dir: Path, task, n_examples: int = 4, n_prompts: int = 256) -> dict:
    """DPO log-ratio (DPO model vs SFT) beside the true per-token gold reward, on SFT samples."""
    from rto.models import load_causal_lm, load_tokenizer
    from rto.rollout import encode_responses, response_logits, token_logprobs

    rows = _samples(seed_dir)["sft"][:n_prompts]
    tok = load_tokenizer(seed_dir / "sft")
    sft, dpo = load_causal_lm(seed_dir / "sft"), load_causal_lm(seed_dir / "dpo")
    batch = encode_responses(tok, [r["prompt"] for r in rows], [r["response"] for r in rows])
    ratio = (token_logprobs(response_logits(dpo, batch), batch.response_ids)
             - token_logprobs(response_logits(sft, batch), batch.response_ids))
    xs, ys, xs_inner, ys_inner, examples = [], [], [], [], []
    for b, row in enumerate(rows):
        n = int(batch.response_mask[b].sum())
        tokens = tok.convert_ids_to_tokens(batch.response_ids[b, :n].tolist())
        gold = task.gold_token_rewards(row["prompt"], tokens)
        if gold is None:
            return {}
        r = ratio[b, :n].tolist()
        xs += r
        ys += gold
        xs_inner += r[:-1]
        ys_inner += gold[:-1]
        if len(examples) < n_examples:
            examples.append({"prompt": row["prompt"], "tokens": tokens, "dpo_log_ratio": r, "gold": gold})
    return {"pearson_all_tokens": pearson(xs, ys), "pearson_before_last_token": pearson(xs_inner, ys_inner),
            "n_tokens": len(xs), "examples": examples}


def aggregate(per_seed: list[dict], out: Path, cfg) -> dict:
    seeds = [s["seed"] for s in per_seed]
    samples = {s["seed"]: _samples(out / f"seed{s['seed']}") for s in per_seed}
    names = list(per_seed[0]["eval"]["methods"])
    methods = {}
    for name in names:
        golds = [[r["gold_reward"] for r in samples[s][name]] for s in seeds]
        base = [[r["gold_reward"] for r in samples[s]["sft"]] for s in seeds]
        wins = [[1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(g, b0)] for g, b0 in zip(golds, base)]
        evs = [ps["eval"]["methods"][name] for ps in per_seed]
        flat = [x for g in golds for x in g]
        m = {
            "gold_reward": sum(flat) / len(flat),
            "gold_reward_ci": list(hierarchical_ci(golds)),
            "gold_reward_per_seed": [sum(g) / len(g) for g in golds],
            "win_rate_vs_sft": sum(x for w in wins for x in w) / len(flat),
            "win_rate_vs_sft_ci": list(hierarchical_ci(wins, seed=1)),
            "kl_to_sft": sum(e["kl_to_sft"] for e in evs) / len(evs),
            "kl_to_sft_per_seed": [e["kl_to_sft"] for e in evs],
            "rm_score": sum(e.get("rm_score", float("nan")) for e in evs) / len(evs),
        }
        parts = [e["gold_parts"] for e in evs if e.get("gold_parts")]
        if parts:
            m["gold_parts"] = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
        methods[name] = m

    # Paired differences (same seed, same prompt), for the paper's claims.
    def diff(a: str, b: str) -> dict:
        if a not in methods or b not in methods:
            return {}
        d = [[x["gold_reward"] - y["gold_reward"] for x, y in zip(samples[s][a], samples[s][b])] for s in seeds]
        flat_d = [x for v in d for x in v]
        return {"mean": sum(flat_d) / len(flat_d), "ci": list(hierarchical_ci(d, seed=2))}

    comparisons = {f"{a} - {b}": diff(a, b) for a, b in (
        ("rto", "ppo"), ("ppo", "sft"), ("rto", "sft"), ("ppo", "dpo"), ("dpo", "sft"), ("rto", "dpo"), ("rs", "rto"),
        ("semi", "ppo"), ("rto", "semi"), ("ddpo", "ppo"), ("rto-reinforce++", "reinforce++"), ("ppo+ens", "ppo"),
        ("rto+ens", "rto"), ("rto+ens", "ppo+ens"), ("rto-gold", "ppo-gold"), ("ppo-dense-gold", "ppo-gold"))}
    eff = data_limited(per_seed, methods, cfg)
    if eff:
        comparisons[f"rto@{eff['fractions'][0]:g} - ppo@1"] = diff(f"rto@{eff['fractions'][0]:g}", "ppo@1")
    comparisons = {k: v for k, v in comparisons.items() if v}
    selection = {name: {"best_iteration_per_seed": [(ps.get("selection", {}).get(name) or {}).get("best_iteration")
                                                    for ps in per_seed],
                        "divergence_seeds": sum(bool((ps.get("divergence") or {}).get(name)) for ps in per_seed)}
                 for name in names if name not in ("sft", "dpo")}

    # Training curves (dev prompts), averaged over seeds point by point.
    curves = {}
    for name in names:
        if name in ("sft", "dpo") or "@" in name:
            continue
        per = [json.loads((Path(ps["runs"][name]) / "metrics.json").read_text())["curve"] for ps in per_seed]
        n = min(len(c) for c in per)
        curves[name] = [{"prompts_seen": per[0][i]["prompts_seen"],
                         **{k: sum(c[i][k] for c in per) / len(per) for k in ("gold_reward", "kl_to_ref")
                            if all(k in c[i] for c in per)}} for i in range(n)]
    refs = {}
    for key in ("sft", "dpo"):
        vals = [ps["reference_lines"][key] for ps in per_seed if key in ps.get("reference_lines", {})]
        if vals:
            refs[key] = sum(vals) / len(vals)
    rm_acc = [ps["rm_accuracy"] for ps in per_seed if ps.get("rm_accuracy") is not None]
    return {
        "task": cfg.task, "preset": cfg.preset, "seeds": seeds, "n_test_prompts": len(samples[seeds[0]]["sft"]),
        "methods": methods, "comparisons": comparisons, "data_efficiency": eff, "selection": selection, "curves": curves,
        "reference_lines": refs,
        "rm_accuracy": sum(rm_acc) / len(rm_acc) if rm_acc else None, "rm_accuracy_per_seed": rm_acc,
        "dpo_gold_reward": methods.get("dpo", {}).get("gold_reward"),
        "token_alignment": {str(ps["seed"]): ps.get("token_alignment", {}) for ps in per_seed},
    }


def data_limited(per_seed: list[dict], methods: dict, cfg) -> dict:
    """The data-limited sweep (each prompt seen once): PPO's and RTO's test gold reward per pool size,
    and the data ratio - the whole pool over the fewest prompts with which RTO reaches PPO's
    whole-pool score (its mean, and the lower end of its 95% interval)."""
    pools = per_seed[0].get("limited_pool") or []
    if not pools or any(f"{m}@{p['fraction']:g}" not in methods for p in pools for m in ("ppo", "rto")):
        return {}
    eff = {"fractions": [p["fraction"] for p in pools], "prompts": [p["prompts"] for p in pools],
           "iterations": [p["iterations"] for p in pools]}
    for m in ("ppo", "rto"):
        eff[m] = [{k: methods[f"{m}@{p['fraction']:g}"][k] for k in ("gold_reward", "gold_reward_ci")} for p in pools]
    full = eff["ppo"][-1]
    for key, target in (("ratio", full["gold_reward"]), ("ratio_at_ci_low", full["gold_reward_ci"][0])):
        reaching = [n for n, r in zip(eff["prompts"], eff["rto"]) if r["gold_reward"] >= target]
        eff[key] = eff["prompts"][-1] / min(reaching) if reaching else None
    eff["ratio_is_lower_bound"] = eff["ratio_at_ci_low"] is not None and eff["ratio_at_ci_low"] == eff["prompts"][-1] / eff["prompts"][0]
    eff["definition"] = ("PPO's whole pool / the fewest prompts with which RTO's mean test gold reward reaches PPO's "
                         "whole-pool mean (ratio) or the lower end of its 95% interval (ratio_at_ci_low); every "
                         "prompt seen once")
    return eff


def _ratio_text(eff: dict) -> str:
    def one(r):
        return "RTO never reached it" if r is None else f"{r:g}"

    return f"{one(eff['ratio'])} (at PPO's mean), {one(eff['ratio_at_ci_low'])} (at its 95% lower end)"


def summary_table(results: dict) -> str:
    rows = [("method", "gold reward [95% CI]", "win vs sft [95% CI]", "KL to sft", "RM score")]
    for name, m in results["methods"].items():
        lo, hi = m["gold_reward_ci"]
        wlo, whi = m["win_rate_vs_sft_ci"]
        rows.append((name, f"{m['gold_reward']:.3f} [{lo:.3f}, {hi:.3f}]",
                     f"{m['win_rate_vs_sft']:.3f} [{wlo:.3f}, {whi:.3f}]", f"{m['kl_to_sft']:.2f}",
                     f"{m['rm_score']:.3f}"))
    lines = format_table(rows)
    eff = results["data_efficiency"]
    lines.append("")
    if eff:
        lines.append("data ratio, each prompt seen once (PPO's whole pool / RTO's prompts to match it): " + _ratio_text(eff))
    if results.get("rm_accuracy") is not None:
        lines.append(f"RM held-out accuracy against the gold order: {results['rm_accuracy']:.3f}")
    return "\n".join(lines)


# --- figures ----------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figures(results: dict, per_seed: list[dict], out: Path, cfg) -> list[Path]:
    plt = _plt()
    paths = []

    # 1. gold reward vs RL prompts seen
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name, pts in results["curves"].items():
        pts = [p for p in pts if "gold_reward" in p]
        style = "--" if "gold" in name else "-"
        ax.plot([p["prompts_seen"] for p in pts], [p["gold_reward"] for p in pts], style, marker="o", ms=2, label=name)
    for name, value in results["reference_lines"].items():
        ax.axhline(value, color="grey" if name == "sft" else "black", ls=":" if name == "dpo" else "--", label=name)
    ax.set(xlabel="RL prompts seen", ylabel="gold reward (dev, mean over seeds)",
           title=f"{results['task']}: gold reward over training ({len(results['seeds'])} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, out / "curves.png", plt))

    # 2. gold reward vs RL prompts, each seen once (the data-limited sweep)
    eff = results["data_efficiency"]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for m in ("ppo", "rto") if eff else ():
        ys = [r["gold_reward"] for r in eff[m]]
        err = [[y - r["gold_reward_ci"][0] for y, r in zip(ys, eff[m])], [r["gold_reward_ci"][1] - y for y, r in zip(ys, eff[m])]]
        ax.errorbar(eff["prompts"], ys, yerr=err, marker="o", capsize=3, label=m)
    if eff:
        lo, hi = eff["ppo"][-1]["gold_reward_ci"]
        ax.axhspan(lo, hi, color="C0", alpha=0.15, label="PPO, whole pool (95% CI)")
        ax.set_xscale("log", base=2)
    ax.set(xlabel="RL prompts, each seen once", ylabel="gold reward (test)", title="data-limited sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "data_efficiency.png", plt))

    # 3. gold reward vs sqrt(KL to SFT), one point per dev checkpoint per seed
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    names = [n for n in results["curves"]]
    for i, name in enumerate(names):
        xs, ys = [], []
        for ps in per_seed:
            curve = json.loads((Path(ps["runs"][name]) / "metrics.json").read_text())["curve"]
            for p in curve:
                if "gold_reward" in p and "kl_to_ref" in p:
                    xs.append(math.sqrt(max(p["kl_to_ref"], 0.0)))
                    ys.append(p["gold_reward"])
        ax.scatter(xs, ys, s=8, alpha=0.6, label=name, color=f"C{i % 10}")
    ax.set(xlabel="sqrt(KL to SFT) (nats^0.5, dev samples)", ylabel="gold reward (dev)",
           title="reward vs divergence, one point per checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, out / "gold_vs_kl.png", plt))

    # 4. win rates with intervals
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    ms = [n for n in results["methods"] if n != "sft" and "@" not in n]
    vals = [results["methods"][n]["win_rate_vs_sft"] for n in ms]
    cis = [results["methods"][n]["win_rate_vs_sft_ci"] for n in ms]
    ax.bar(range(len(ms)), vals, yerr=[[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]],
           capsize=3, color=[f"C{i % 10}" for i in range(len(ms))])
    ax.axhline(0.5, color="grey", ls="--")
    ax.set_xticks(range(len(ms)), ms, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="win rate vs SFT (gold reward, 95% CI)", ylim=(0, 1), title="win rate against SFT")
    fig.tight_layout()
    paths.append(_save(fig, out / "win_rates.png", plt))

    # 5. token heat-map: DPO log-ratio beside the true per-token gold reward
    align = next((a for a in results["token_alignment"].values() if a.get("examples")), None)
    if align:
        ex = align["examples"]
        fig, axes = plt.subplots(len(ex), 1, figsize=(11, 1.5 * len(ex) + 0.6), dpi=120, squeeze=False)
        for ax, e in zip(axes[:, 0], ex):
            data = torch.tensor([e["dpo_log_ratio"], e["gold"]])
            lim = float(data[0].abs().max()) or 1.0
            ax.imshow(data[:1].numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", extent=(0, len(e["tokens"]), 1, 2))
            ax.imshow(data[1:].numpy(), cmap="Greens", vmin=0, vmax=max(float(data[1].max()), 1e-6), aspect="auto",
                      extent=(0, len(e["tokens"]), 0, 1))
            ax.set_xlim(0, len(e["tokens"]))
            ax.set_ylim(0, 2)
            for t, tok in enumerate(e["tokens"]):
                ax.text(t + 0.5, 1.5, f"{e['dpo_log_ratio'][t]:.1f}", ha="center", va="center", fontsize=6)
                ax.text(t + 0.5, 0.5, f"{e['gold'][t]:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks([t + 0.5 for t in range(len(e["tokens"]))], e["tokens"], fontsize=6)
            ax.set_yticks([0.5, 1.5], ["gold", "DPO log-ratio"], fontsize=7)
        fig.suptitle(f"DPO log-ratio vs gold token reward on SFT samples; Pearson r = "
                     f"{align['pearson_all_tokens']:.2f} (all tokens), {align['pearson_before_last_token']:.2f} "
                     f"(all but the last)", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out / "token_heatmap.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _ci(m: dict, key: str = "gold_reward") -> str:
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def results_markdown(results: dict, command: str) -> str:
    """The tables of a reproduction as Markdown (the claims paragraph is written by a person)."""
    ms = results["methods"]
    lines = [f"Command: `{command}`", "",
             f"Machine: {results.get('machine', '?')}. Wall time: {results.get('wall_time_s', 0) / 60:.0f} min. "
             f"Seeds: {results['seeds']}; {results['n_test_prompts']} test prompts per seed, one sample each. "
             "Intervals: 95% hierarchical bootstrap over seeds and prompts.", ""]
    lines += ["| method | gold reward [95% CI] | " + " | ".join(f"gold:{k}" for k in next(
        (m["gold_parts"] for m in ms.values() if m.get("gold_parts")), {})) + " | win vs SFT [95% CI] | KL to SFT | RM score |"]
    parts = list(next((m["gold_parts"] for m in ms.values() if m.get("gold_parts")), {}))
    lines.append("|" + "---|" * (5 + len(parts)))
    for name, m in ms.items():
        if "@" in name:
            continue
        p = " | ".join(f"{m.get('gold_parts', {}).get(k, float('nan')):.3f}" for k in parts)
        lines.append(f"| {name} | {_ci(m)} | {p} | {_ci(m, 'win_rate_vs_sft')} | {m['kl_to_sft']:.2f} | {m['rm_score']:.3f} |")
    lines += ["", "Paired differences in gold reward (same seed, same prompt):", "",
              "| comparison | mean [95% CI] |", "|---|---|"]
    for k, v in results["comparisons"].items():
        lines.append(f"| {k} | {v['mean']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}] |")
    eff = results["data_efficiency"]
    if eff:
        lines += ["", "Data-limited sweep (each RL prompt seen once; test gold reward):", "",
                  "| RL prompts (iterations) | " + " | ".join(f"{n} ({i})" for n, i in zip(eff["prompts"], eff["iterations"]))
                  + " |", "|---|" + "---|" * len(eff["prompts"])]
        for m in ("ppo", "rto"):
            lines.append(f"| {m} | " + " | ".join(_ci(r) for r in eff[m]) + " |")
        lines += ["", f"Data ratio ({eff['definition']}): {_ratio_text(eff)}."]
    sel = results.get("selection") or {}
    if sel:
        lines += ["", "Dev selection: the iteration each seed's result was chosen at, and on how many seeds the "
                      "proxy/gold divergence fired:", "", "| method | selected iteration per seed | divergence |",
                  "|---|---|---|"]
        lines += [f"| {n} | {', '.join('-' if i is None else str(i) for i in v['best_iteration_per_seed'])} | "
                  f"{v['divergence_seeds']} of {len(v['best_iteration_per_seed'])} |" for n, v in sel.items()]
    tuning = results.get("tuning", {})
    for seed, grids in tuning.get("grids", {}).items():
        score = "dev_score" if "dev_score" in grids["ppo_grid"][0] else "dev_gold"  # older results: final dev gold
        lines += ["", f"Tuning on the dev split (seed {seed}; {grids.get('criterion', 'final dev gold reward')}; "
                      f"the grid's runs drew RL seed {grids.get('rl_seed', '?')} and only chose the settings, the "
                      "reported runs are fresh):", "", "| actor/critic lr | KL coef | dev score |", "|---|---|---|"]
        lines += [f"| {r['actor_lr']:g} | {r['kl_coef']:g} | {r[score]:.3f} |" for r in grids["ppo_grid"]]
        lines += ["", "| RTO beta1 | dpo_clip | dev score |", "|---|---|---|"]
        lines += [f"| {r['beta1']:g} | {r['dpo_clip']:g} | {r[score]:.3f} |" for r in grids["rto_grid"]]
    if tuning.get("chosen"):
        lines += ["", "Chosen: " + ", ".join(f"{k} = {v:g}" for k, v in tuning["chosen"].items()) + "."]
    if results.get("rm_accuracy") is not None:
        lines += ["", f"RM held-out accuracy against the gold order: {results['rm_accuracy']:.3f} "
                      f"(per seed: {', '.join(f'{a:.3f}' for a in results['rm_accuracy_per_seed'])})."]
    align = [a for a in results.get("token_alignment", {}).values() if a]
    if align:
        lines += [f"Pearson correlation of the DPO log-ratio with the true per-token gold reward on SFT samples: "
                  f"{sum(a['pearson_all_tokens'] for a in align) / len(align):.3f} over all tokens, "
                  f"{sum(a['pearson_before_last_token'] for a in align) / len(align):.3f} over all but the last "
                  f"(the last token also carries the sequence-level part)."]
    return "\n".join(lines) + "\n"
