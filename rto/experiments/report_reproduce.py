"""Aggregating `rto reproduce` over seeds, and its figures.

The seed is the unit of replication (each trains its own SFT model, RM, DPO model and RL runs):
every interval is a 95% Student-t interval over the per-seed means, and every paired difference
one over the per-seed differences (same seed, same test prompts) - rto.experiments.seed_stats, where the
verdict rules are too. The per-seed means are in per_seed.json, so the report can be rebuilt
from it alone (`rto reproduce --report-only`). The old hierarchical bootstrap stays below only
as the baseline of the coverage simulation (benchmarks/ci_coverage.py): at 3 seeds it is about
the range of the seeds and covers less than it says.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rto.experiments.data_ratio import claim_fraction, data_limited, ratio_text
from rto.experiments.seed_stats import (
    LEVEL,
    MARGIN_FRACTION,
    MIN_SEEDS,
    at_least_verdict,
    beats_verdict,
    margin_for,
    t_interval,
)
from rto.experiments.tuning import DPO_POLICY

# The gold reward's achievable range per built-in task, from each task's definition (its
# docstring and gold_reward): keyed in [0, 2], ordered in (-inf, 1] with 0 for a response with
# nothing right, count in [0, 1]. The non-inferiority margin is MARGIN_FRACTION of it. A task not
# listed has no margin, so its "at or above" claims cannot hold.
GOLD_RANGE = {"keyed": 2.0, "ordered": 1.0, "count": 1.0}


def hierarchical_ci(values_by_seed: list[list[float]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The old interval (until issue 21): resample seeds, then prompts within each. Not used by the
    reports any more; kept as the baseline that benchmarks/ci_coverage.py measures."""
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


def _cap(ci: tuple[float, float], top: float | None) -> list[float]:
    """A mean gold reward cannot pass the task's best score, so the t interval is cut there (that
    never drops the true value, so coverage stays what it was)."""
    return [min(x, top) for x in ci] if top is not None else list(ci)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


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
    from rto.lm.models import load_causal_lm, load_tokenizer
    from rto.lm.rollout import encode_responses
    from rto.lm.scoring import response_logits, token_logprobs

    rows = _samples(seed_dir)["sft"][:n_prompts]
    tok = load_tokenizer(seed_dir / "sft")
    sft, dpo = load_causal_lm(seed_dir / "sft"), load_causal_lm(seed_dir / "dpo")
    batch = encode_responses(tok, [r["prompt"] for r in rows], [r["response"] for r in rows])
    ratio = token_logprobs(response_logits(dpo, batch), batch.response_ids) - token_logprobs(
        response_logits(sft, batch), batch.response_ids
    )
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
    return {
        "pearson_all_tokens": pearson(xs, ys),
        "pearson_before_last_token": pearson(xs_inner, ys_inner),
        "n_tokens": len(xs),
        "examples": examples,
    }


def aggregate(per_seed: list[dict], out: Path, cfg, previous: dict | None = None) -> dict:
    """results.json from the seeds' records alone (their evaluations hold each method's per-seed
    means over the same test prompts); the training curves come from the run directories, or from
    `previous` (the committed results.json) where those are gone."""
    seeds = [s["seed"] for s in per_seed]
    evals = [ps["eval"]["methods"] for ps in per_seed]
    names = list(evals[0])
    methods = {}
    for name in names:
        evs = [e[name] for e in evals]
        golds = [e["gold_reward"] for e in evs]
        wins = [e["win_rate_vs_sft"] for e in evs]
        m = {
            "gold_reward": _mean(golds),
            "gold_reward_ci": _cap(t_interval(golds), GOLD_RANGE.get(cfg.task)),
            "gold_reward_per_seed": golds,
            "win_rate_vs_sft": _mean(wins),
            # SFT against itself is 0.5 on every prompt by definition: no interval to draw. A win rate
            # lies in [0, 1], so the t interval is cut there (that never drops the true value).
            "win_rate_vs_sft_ci": [0.5, 0.5] if name == "sft" else [min(max(x, 0.0), 1.0) for x in t_interval(wins)],
            "kl_to_sft": _mean([e["kl_to_sft"] for e in evs]),
            "kl_to_sft_per_seed": [e["kl_to_sft"] for e in evs],
            "rm_score": _mean([e.get("rm_score", float("nan")) for e in evs]),
        }
        parts = [e["gold_parts"] for e in evs if e.get("gold_parts")]
        if parts:
            m["gold_parts"] = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
        methods[name] = m

    # Paired differences: on one seed, the mean over the same test prompts of A - B is
    # mean(A) - mean(B); the interval is over the seeds' differences.
    def diff(a: str, b: str) -> dict:
        if a not in methods or b not in methods:
            return {}
        d = [x - y for x, y in zip(methods[a]["gold_reward_per_seed"], methods[b]["gold_reward_per_seed"])]
        return {"mean": _mean(d), "ci": list(t_interval(d)), "per_seed": d}

    comparisons = {
        f"{a} - {b}": diff(a, b)
        for a, b in (
            ("rto", "ppo"),
            ("ppo", "sft"),
            ("rto", "sft"),
            ("ppo", "dpo"),
            ("dpo", "sft"),
            ("rto", "dpo"),
            ("rs", "rto"),
            ("semi", "ppo"),
            ("rto", "semi"),
            ("ddpo", "ppo"),
            ("rto-reinforce++", "reinforce++"),
            ("rto-grpo", "grpo"),  # the critic-free families: does RTO's token reward help them?
            ("rto-rloo", "rloo"),
            ("grpo", "ppo"),
            ("rloo", "ppo"),
            ("rto-grpo", "rto"),
            ("rto-rloo", "rto"),
            ("ppo+ens", "ppo"),
            ("rto+ens", "rto"),
            ("rto+ens", "ppo+ens"),
            ("rto-gold", "ppo-gold"),
            ("ppo-dense-gold", "ppo-gold"),
        )
    }
    for a, b in (("rto", DPO_POLICY), ("ppo", DPO_POLICY), (DPO_POLICY, "sft"), (DPO_POLICY, "dpo")):
        comparisons[f"{a} - {b}"] = diff(a, b)
    eff = data_limited(per_seed, methods)
    if eff:
        f = claim_fraction(eff)
        comparisons[f"rto@{f:g} - ppo@1"] = diff(f"rto@{f:g}", "ppo@1")
    comparisons = {k: v for k, v in comparisons.items() if v}
    selection = {
        name: {
            "best_iteration_per_seed": [
                (ps.get("selection", {}).get(name) or {}).get("best_iteration") for ps in per_seed
            ],
            "divergence_seeds": sum(bool((ps.get("divergence") or {}).get(name)) for ps in per_seed),
        }
        for name in names
        if name not in ("sft", "dpo", DPO_POLICY)
    }
    dpo_selection = [(ps.get("selection", {}).get(DPO_POLICY) or {}).get("best_epoch") for ps in per_seed]

    # Training curves (dev prompts), averaged over seeds point by point.
    curves = {}
    for name in names:
        if name in ("sft", "dpo", DPO_POLICY) or "@" in name:  # no RL curve
            continue
        files = [Path(ps["runs"][name]) / "metrics.json" for ps in per_seed if name in ps.get("runs", {})]
        if len(files) < len(per_seed) or not all(f.is_file() for f in files):  # runs gone: the committed curves
            if name in (previous or {}).get("curves", {}):
                curves[name] = previous["curves"][name]
            continue
        per = [json.loads(f.read_text())["curve"] for f in files]
        n = min(len(c) for c in per)
        curves[name] = [
            {
                "prompts_seen": per[0][i]["prompts_seen"],
                **{
                    k: sum(c[i][k] for c in per) / len(per)
                    for k in ("gold_reward", "kl_to_ref")
                    if all(k in c[i] for c in per)
                },
            }
            for i in range(n)
        ]
    refs = {}
    for key in ("sft", "dpo"):
        vals = [ps["reference_lines"][key] for ps in per_seed if key in ps.get("reference_lines", {})]
        if vals:
            refs[key] = sum(vals) / len(vals)
    rm_acc = [ps["rm_accuracy"] for ps in per_seed if ps.get("rm_accuracy") is not None]
    return {
        "task": cfg.task,
        "preset": cfg.preset,
        "seeds": seeds,
        "n_test_prompts": per_seed[0]["eval"]["n_prompts"],
        "intervals": f"{LEVEL:.0%} Student t over seeds (n - 1 df) on the per-seed means or paired differences",
        "verdict_rules": verdict_rules(cfg.task),
        "methods": methods,
        "comparisons": comparisons,
        "data_efficiency": eff,
        "selection": selection,
        "curves": curves,
        "reference_lines": refs,
        "rm_accuracy": sum(rm_acc) / len(rm_acc) if rm_acc else None,
        "rm_accuracy_per_seed": rm_acc,
        "dpo_gold_reward": methods.get("dpo", {}).get("gold_reward"),
        "dpo_policy_best_epoch_per_seed": dpo_selection,
        "token_alignment": {str(ps["seed"]): ps.get("token_alignment", {}) for ps in per_seed},
    }


def verdict_rules(task: str) -> dict:
    """The rules every claim is judged by, fixed before any result (see rto.experiments.seed_stats)."""
    rng = GOLD_RANGE.get(task)
    return {
        "level": LEVEL,
        "min_seeds": MIN_SEEDS,
        "gold_range": rng,
        "margin": margin_for(rng),
        "margin_rule": (
            f"{MARGIN_FRACTION:g} x the gold reward's achievable range ({rng:g})"
            if rng is not None
            else "none: the task's gold range is not known, so no non-inferiority claim can hold"
        ),
        "beats": "holds when the interval of A - B is above 0; fails (loses) below 0; fails (a tie within "
        "the margin) inside (-margin, +margin); else inconclusive",
        "at_or_above": "non-inferiority: holds when the interval's lower end is above -margin; fails when "
        "the whole interval is below -margin; else inconclusive",
        "too_few_seeds": f"fewer than {MIN_SEEDS} seeds: inconclusive",
        "boundaries": "a bound that touches a threshold does not clear it",
    }


def interval_text(ci: list[float], fmt: str = ".3f") -> str:
    lo, hi = ci
    return "[n/a: 1 seed]" if math.isnan(lo) or math.isnan(hi) else f"[{lo:{fmt}}, {hi:{fmt}}]"


def claims(results: dict) -> list[dict]:
    """The claims on this task, each with a verdict by the rules of verdict_rules(): {"claim",
    "kind", "verdict", "evidence", "group"}; a claim whose runs are missing is "not tested". group
    "paper": a claim the paper makes (RTO vs PPO, RTO vs DPO, data efficiency); "tool": a check of
    the tool's own (ending at or above SFT, PPO vs DPO, RM ensembles); "critic-free": RTO's reward
    with GRPO and RLOO."""
    comp, ms, out = results["comparisons"], results["methods"], []
    n = len(results["seeds"])
    margin = verdict_rules(results["task"])["margin"]

    def paired(name: str, claim: str, kind: str, extra: str = "", loses: str = "", group: str = "tool") -> None:
        c = comp.get(name)
        judge = beats_verdict if kind == "beats" else at_least_verdict
        verdict = judge(c["ci"], n, margin) if c else "not tested"
        if loses:  # "fails (loses)" said of what loses to what
            verdict = verdict.replace("(loses)", f"({loses})")
        out.append(
            {
                "claim": claim,
                "kind": kind,
                "verdict": verdict,
                "group": group,
                "evidence": (f"{name}: {c['mean']:+.3f} {interval_text(c['ci'], '+.3f')}" + extra) if c else "",
            }
        )

    paired("rto - ppo", "RTO beats PPO", "beats", loses="RTO loses to PPO", group="paper")
    # The DPO baseline is the tuned, dev-selected DPO policy where the runs have it (older runs: the
    # preset's DPO, RTO's reward model, with no tuning and its last epoch).
    dpo = DPO_POLICY if DPO_POLICY in ms else "dpo"
    which = "the tuned DPO policy" if dpo == DPO_POLICY else "the DPO policy (untuned)"
    paired(f"rto - {dpo}", f"RTO beats {which}", "beats", loses="RTO loses to DPO", group="paper")
    paired(f"ppo - {dpo}", f"PPO beats {which}", "beats", loses="PPO loses to DPO")
    for m in ("ppo", "rto"):
        paired(f"{m} - sft", f"{m.upper()} (dev-selected) ends at or above SFT", "at or above")
    eff = results.get("data_efficiency") or {}
    if eff:
        f0 = claim_fraction(eff)
        paired(
            f"rto@{f0:g} - ppo@1",
            f"RTO with 1/{1 / f0:g} of the prompts reaches PPO with all of them (each seen once)",
            "at or above",
            f"; data ratio {ratio_text(eff['ratio'])}",
            group="paper",
        )
    for m in ("grpo", "rloo"):  # group "critic-free": the same rules, on the critic-free families
        if m in ms and f"rto-{m}" in ms:
            name = m.upper()
            paired(
                f"rto-{m} - {m}",
                f"RTO's token reward helps {name}",
                "beats",
                loses=f"it hurts {name}",
                group="critic-free",
            )
            paired(
                f"rto-{m} - rto",
                f"RTO-{name} (no critic) is at or above RTO (PPO's critic)",
                "at or above",
                group="critic-free",
            )
    for m in ("ppo", "rto"):
        if f"{m}+ens" in ms:
            paired(f"{m}+ens - {m}", f"an RM ensemble helps {m.upper()}", "beats", loses="it hurts")
    return out
