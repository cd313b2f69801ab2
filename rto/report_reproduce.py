"""Aggregating `rto reproduce` over seeds, and its figures.

Intervals are 95% hierarchical bootstraps: resample seeds, then prompts within each
resampled seed, so both sources of variation are in the interval.
"""

from __future__ import annotations

import json
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


def _verdict(ci: list[float], better: str, worse: str, tie: str = "ties") -> str:
    return better if ci[0] > 0 else worse if ci[1] < 0 else tie


def claims(results: dict) -> list[dict]:
    """The paper's claims on this task, each with a verdict from the paired 95% intervals:
    {"claim", "verdict", "evidence"}; a claim whose runs are missing is "not tested"."""
    comp, ms, out = results["comparisons"], results["methods"], []

    def paired(name: str, claim: str, better: str, worse: str, tie: str = "ties") -> None:
        c = comp.get(name)
        out.append({"claim": claim, "verdict": _verdict(c["ci"], better, worse, tie) if c else "not tested",
                    "evidence": f"{name}: {c['mean']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" if c else ""})

    paired("rto - ppo", "RTO beats PPO", "holds (RTO beats PPO)", "fails (RTO loses to PPO)", "fails (a tie)")
    paired("rto - dpo", "RTO beats the DPO policy", "holds", "fails (RTO loses to DPO)", "fails (a tie)")
    paired("ppo - dpo", "PPO beats the DPO policy", "holds", "fails (PPO loses to DPO)", "fails (a tie)")
    for m in ("ppo", "rto"):
        paired(f"{m} - sft", f"{m.upper()} (dev-selected) ends at or above SFT", "holds (above)", "fails (below)",
               "holds (a tie)")
    eff = results.get("data_efficiency") or {}
    if eff:
        f0 = eff["fractions"][0]
        c = comp.get(f"rto@{f0:g} - ppo@1")
        out.append({"claim": f"RTO with 1/{1 / f0:g} of the prompts reaches PPO with all of them (each seen once)",
                    "verdict": _verdict(c["ci"], "holds (above)", "fails", "holds (a tie)") if c else "not tested",
                    "evidence": (f"rto@{f0:g} - ppo@1: {c['mean']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]; "
                                 f"data ratio {_ratio_text(eff)}") if c else ""})
    for m in ("ppo", "rto"):
        if f"{m}+ens" in ms:
            paired(f"{m}+ens - {m}", f"an RM ensemble helps {m.upper()}", "holds", "fails (it hurts)", "fails (no change)")
    return out


def _ratio_text(eff: dict) -> str:
    def one(r):
        return "RTO never reached it" if r is None else f"{r:.3g}"

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
    lines += ["", "The paper's claims on this task (verdicts from the paired 95% intervals):", "",
              "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['verdict']} | {c['evidence']} |" for c in claims(results)]
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


def cross_task_markdown(results_by_task: dict[str, dict]) -> str:
    """One table of the paper's claims over tasks: the verdict per task, the evidence below it."""
    tasks = list(results_by_task)
    rows: dict[str, dict[str, dict]] = {}
    for task, results in results_by_task.items():
        for c in claims(results):
            key = c["claim"].split(" with 1/")[0] + (" with 1/8 of the prompts ..." if " with 1/" in c["claim"] else "")
            rows.setdefault(key, {})[task] = c
    lines = ["| claim | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for claim, by_task in rows.items():
        cells = [f"{by_task[t]['verdict']}<br>{by_task[t]['evidence']}" if t in by_task else "not tested" for t in tasks]
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m rto.report_reproduce DIR [DIR ...]: the cross-task claims table
    import sys

    found = {}
    for d in sys.argv[1:]:
        r = json.loads((Path(d) / "results.json").read_text())
        found[r["task"]] = r
    print(cross_task_markdown(found))
