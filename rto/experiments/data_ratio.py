"""The data-limited sweep of `rto reproduce`, and the data ratio measured from it.

The paper's data-efficiency claim: RTO reaches PPO's score with a fraction of PPO's prompts. The
sweep trains PPO and RTO on the first 1/32 ... 1/1 of one prompt pool, each prompt seen once.
The ratio is measured per seed (the unit of replication), against that seed's own PPO on the
whole pool: the pool size at which RTO's test gold reward reaches PPO's is interpolated linearly
in log(pool size) between the two sweep points around the crossing, taking the crossing after
which RTO's curve stays at or above the target (a noisy early point above it does not count).
The ratio is the whole pool over that size; over seeds, its geometric mean with a 95% t
interval on log(ratio).

A seed whose RTO is at or above the target at the smallest pool has a ratio of at least the
sweep's ceiling (whole pool / smallest pool), not a measurement: it is censored, and with any
censored seed the summary is a lower bound, printed ">= X". A seed whose RTO never reaches the
target (its ratio is below 1) leaves the ratio unmeasured.
"""

from __future__ import annotations

import math

from rto.experiments.seed_stats import t_interval

REACHES_AT_SMALLEST = "at the smallest pool"
NEVER = "never"


def crossing(prompts: list[int], values: list[float], target: float) -> tuple[float | None, str]:
    """(the pool size at which `values` reach `target` for good, interpolated on log size; how it
    is censored: "" measured, REACHES_AT_SMALLEST (the size is at most prompts[0]), NEVER)."""
    first = next((i for i in range(len(values)) if all(v >= target for v in values[i:])), None)
    if first is None:
        return None, NEVER
    if first == 0:
        return float(prompts[0]), REACHES_AT_SMALLEST
    lo, hi = values[first - 1], values[first]
    t = (target - lo) / (hi - lo)  # hi >= target > lo, so 0 < t <= 1
    log_n = math.log(prompts[first - 1]) + t * (math.log(prompts[first]) - math.log(prompts[first - 1]))
    return math.exp(log_n), ""


def measured_ratio(prompts: list[int], rto_per_seed: list[list[float]], ppo_full_per_seed: list[float]) -> dict:
    """Per seed, RTO's curve (`rto_per_seed[s][i]` at `prompts[i]`) against that seed's PPO on the
    whole pool; the ratio per seed and its summary over seeds."""
    ceiling = prompts[-1] / prompts[0]
    per_seed, censored = [], []
    for curve, target in zip(rto_per_seed, ppo_full_per_seed):
        n, how = crossing(prompts, curve, target)
        per_seed.append(None if n is None else prompts[-1] / n)
        censored.append(how)
    out = {
        "ratio_per_seed": per_seed,
        "censored_per_seed": censored,
        "ceiling": ceiling,
        "seeds_at_ceiling": censored.count(REACHES_AT_SMALLEST),
        "seeds_never": censored.count(NEVER),
    }
    if out["seeds_never"] or not per_seed:
        out.update(geometric_mean=None, ci=[math.nan, math.nan], is_lower_bound=False)
        return out
    logs = [math.log(r) for r in per_seed]
    lo, hi = t_interval(logs)
    out.update(
        geometric_mean=math.exp(sum(logs) / len(logs)),
        ci=[math.exp(lo), math.exp(hi)],
        is_lower_bound=out["seeds_at_ceiling"] > 0,
    )
    return out


def ratio_text(ratio: dict) -> str:
    """One line: the measured ratio with its interval, or a bound, and why."""
    n = len(ratio["ratio_per_seed"])
    if ratio["seeds_never"]:
        return (
            f"not measured: RTO never reached its seed's PPO on {ratio['seeds_never']} of {n} seeds "
            f"(a ratio below 1 there)"
        )
    gm = ratio["geometric_mean"]
    if ratio["is_lower_bound"]:
        return (
            f">= {gm:.3g} ({ratio['seeds_at_ceiling']} of {n} seeds reached their PPO at the smallest pool, "
            f"so their ratio is at least the sweep's ceiling {ratio['ceiling']:.3g}, counted as the ceiling)"
        )
    lo, hi = ratio["ci"]
    ci = "[n/a: 1 seed]" if math.isnan(lo) else f"[{lo:.3g}, {hi:.3g}]"
    return f"{gm:.3g} {ci} (geometric mean over {n} seeds, interpolated on log pool size)"


def data_limited(per_seed: list[dict], methods: dict) -> dict:
    """The sweep's table (PPO's and RTO's test gold reward per pool size) and the measured ratio."""
    pools = per_seed[0].get("limited_pool") or []
    if not pools or any(f"{m}@{p['fraction']:g}" not in methods for p in pools for m in ("ppo", "rto")):
        return {}
    eff = {
        "fractions": [p["fraction"] for p in pools],
        "prompts": [p["prompts"] for p in pools],
        "iterations": [p["iterations"] for p in pools],
    }
    for m in ("ppo", "rto"):
        eff[m] = [{k: methods[f"{m}@{p['fraction']:g}"][k] for k in ("gold_reward", "gold_reward_ci")} for p in pools]
    rto = [[methods[f"rto@{p['fraction']:g}"]["gold_reward_per_seed"][s] for p in pools] for s in range(len(per_seed))]
    ppo_full = methods[f"ppo@{pools[-1]['fraction']:g}"]["gold_reward_per_seed"]
    eff["ratio"] = measured_ratio(eff["prompts"], rto, ppo_full)
    eff["definition"] = (
        "per seed, PPO's whole pool / the pool size at which RTO's test gold reward reaches that "
        "seed's PPO on the whole pool for good (interpolated on log pool size); every prompt seen once"
    )
    return eff


def claim_fraction(eff: dict, wanted: float = 0.125) -> float:
    """The sweep fraction the "RTO with 1/8 of the data" claim is judged at: 1/8 where the sweep
    has it (the paper's figure), else the nearest on a log scale."""
    return min(eff["fractions"], key=lambda f: abs(math.log(f / wanted)))
