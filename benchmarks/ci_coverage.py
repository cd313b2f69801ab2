"""Coverage of the 95% intervals of `rto reproduce` at 3, 5 and 10 seeds, by simulation (issue 21).

    python benchmarks/ci_coverage.py [--out docs/results/ci_coverage.json] [--reps 8000] [--old-reps 150]

Model of one paired comparison (A - B on the same test prompts): value of prompt p on seed s =
mu + u_s + e_sp, with a between-seed effect u_s ~ N(0, tau^2) (each seed trains its own models)
and prompt noise e_sp ~ N(0, sigma^2), 512 prompts per seed as in the real runs. tau and sigma
are estimated from the committed docs/results/previous-protocol/<task>/per_seed.json (the runs
before issue 21's rerun, which the simulation was built on): sigma from each seed's
prompt-bootstrap interval of each method's mean (the two methods' prompt noise taken as
independent, an upper bound: on the same prompts they are positively correlated), tau from the
spread of the per-seed differences less the prompt part. Three settings: the median over every
(task, claim) pair; the pair where prompt noise is largest against the seed spread (the most
favourable case for the old method, whose prompt resampling is what it adds); and the pair where
it is smallest (seeds dominate, the least favourable).

Coverage = how often the interval holds mu. The new method (rto.experiments.seed_stats.seed_interval, a t
interval on the per-seed means) runs on `reps` data sets; the old one (the real
rto.experiments.report_reproduce.hierarchical_ci, 2,000 bootstrap draws, about 0.1-0.2 s a call) on the first
`old_reps` of the same data sets, which is enough to place it (binomial SE 2-4%).
Runs in 3-7 minutes on 2 shared cores (196 s for the committed JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rto.experiments.report_reproduce import hierarchical_ci  # noqa: E402
from rto.experiments.seed_stats import seed_interval  # noqa: E402

TASKS = ("keyed", "ordered", "count")
CLAIM_PAIRS = (
    ("rto", "ppo"),
    ("rto", "dpo"),
    ("ppo", "dpo"),
    ("ppo", "sft"),
    ("rto", "sft"),
    ("rto@0.125", "ppo@1"),
    ("ppo+ens", "ppo"),
    ("rto+ens", "rto"),
)
N_PROMPTS = 512
SEED_COUNTS = (3, 5, 10)


def estimate(per_seed: list[dict], a: str, b: str) -> dict:
    """tau (between-seed SD of the paired difference) and sigma (its prompt SD) from one task's seeds."""
    ms = [ps["eval"]["methods"] for ps in per_seed]
    n = per_seed[0]["eval"]["n_prompts"]
    diffs = [m[a]["gold_reward"] - m[b]["gold_reward"] for m in ms]
    # a prompt-bootstrap 95% interval is about mean +- 1.96 SE
    se2 = [sum(((m[k]["gold_reward_ci"][1] - m[k]["gold_reward_ci"][0]) / (2 * 1.96)) ** 2 for k in (a, b)) for m in ms]
    prompt_var_of_mean = statistics.fmean(se2)
    tau2 = max(0.0, statistics.variance(diffs) - prompt_var_of_mean)
    return {"tau": math.sqrt(tau2), "sigma": math.sqrt(prompt_var_of_mean * n), "seeds": len(diffs)}


SOURCE = "docs/results/previous-protocol"  # the per-seed records the simulation's settings come from


def real_run_settings(root: Path = ROOT) -> dict:
    pairs = {}
    for task in TASKS:
        per_seed = json.loads((root / SOURCE / task / "per_seed.json").read_text())
        for a, b in CLAIM_PAIRS:
            pairs[f"{task}: {a} - {b}"] = estimate(per_seed, a, b)
    taus, sigmas = [p["tau"] for p in pairs.values()], [p["sigma"] for p in pairs.values()]
    # prompt SE of a seed's mean against tau: largest where the old method's prompt draws matter most
    ratio = {k: p["sigma"] / math.sqrt(N_PROMPTS) / max(p["tau"], 1e-9) for k, p in pairs.items()}
    prompt_heavy, seed_heavy = max(ratio, key=ratio.get), min(ratio, key=ratio.get)
    return {
        "per_comparison": pairs,
        "settings": {
            "median": {"tau": statistics.median(taus), "sigma": statistics.median(sigmas)},
            f"prompt-noise-heavy ({prompt_heavy})": {k: pairs[prompt_heavy][k] for k in ("tau", "sigma")},
            f"seed-spread-heavy ({seed_heavy})": {k: pairs[seed_heavy][k] for k in ("tau", "sigma")},
        },
    }


def simulate(
    n_seeds: int, reps: int, tau: float, sigma: float, n_prompts: int = N_PROMPTS, mu: float = 0.1, seed: int = 0
):
    """Yield `reps` data sets: (n_seeds, n_prompts) tensors of values, true mean mu."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(reps):
        u = torch.randn(n_seeds, 1, generator=g, dtype=torch.float64) * tau
        e = torch.randn(n_seeds, n_prompts, generator=g, dtype=torch.float64) * sigma
        yield mu + u + e


def coverage(
    interval,
    n_seeds: int,
    reps: int,
    tau: float,
    sigma: float,
    n_prompts: int = N_PROMPTS,
    mu: float = 0.1,
    seed: int = 0,
) -> dict:
    """How often interval(values) -> (lo, hi) holds mu (values: a (seeds, prompts) tensor), and the
    median width of the interval."""
    hits, widths = 0, []
    for data in simulate(n_seeds, reps, tau, sigma, n_prompts, mu, seed):
        lo, hi = interval(data)
        hits += lo <= mu <= hi
        widths.append(hi - lo)
    p = hits / reps
    return {"coverage": p, "se": math.sqrt(p * (1 - p) / reps), "reps": reps, "median_width": statistics.median(widths)}


def t_method(data: torch.Tensor) -> tuple[float, float]:
    """rto.experiments.seed_stats.seed_interval (the per-seed means are taken in torch: the same numbers, faster)."""
    return seed_interval([[m] for m in data.mean(1).tolist()])


def old_method(data: torch.Tensor) -> tuple[float, float]:
    return hierarchical_ci(data.tolist())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "ci_coverage.json"))
    ap.add_argument("--reps", type=int, default=8000)
    ap.add_argument("--old-reps", type=int, default=150)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    real = real_run_settings()
    rows = []
    for name, s in real["settings"].items():
        for k in SEED_COUNTS:
            new = coverage(t_method, k, args.reps, s["tau"], s["sigma"], seed=k)
            old = coverage(old_method, k, args.old_reps, s["tau"], s["sigma"], seed=k)  # same first data sets
            rows.append({"setting": name, "seeds": k, "t_interval": new, "hierarchical_bootstrap": old})
            print(
                f"{name:60s} seeds {k:2d}: t {new['coverage']:.3f} (+-{new['se']:.3f}), "
                f"old bootstrap {old['coverage']:.3f} (+-{old['se']:.3f})",
                flush=True,
            )
    out = {
        "what": "coverage of nominal 95% intervals for the mean of a paired difference over seeds",
        "model": "prompt value = mu + u_seed + e_prompt, u ~ N(0, tau^2), e ~ N(0, sigma^2), "
        f"{N_PROMPTS} prompts per seed, mu = 0.1",
        "estimated_from": f"{SOURCE}/{{keyed,ordered,count}}/per_seed.json",
        "t_interval": "rto.experiments.seed_stats.seed_interval: Student t on the per-seed means, n - 1 df",
        "hierarchical_bootstrap": "rto.experiments.report_reproduce.hierarchical_ci: resample seeds, then prompts; "
        "2,000 draws",
        "real_runs": real,
        "rows": rows,
        "wall_time_s": round(time.time() - start, 1),
        "command": "python benchmarks/ci_coverage.py",
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} in {out['wall_time_s']} s")
    return out


if __name__ == "__main__":
    main()
