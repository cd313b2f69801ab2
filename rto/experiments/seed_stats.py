"""Seed-level intervals and the verdict rules of `rto reproduce` (issue 21), in pure Python.

The seed is the unit of replication: every seed trains its own SFT model, preference set, RM, DPO
model and RL runs, so the seeds are the independent replicates (the prompts of one seed share its
models). The old interval (`rto.experiments.report_reproduce.hierarchical_ci`) resamples seeds, then prompts:
at 3 seeds it is about the range of the seeds and covers the true mean 77% of the time where the
seeds carry the variance, and it counts prompt noise twice where the prompts do (98-100%)
(benchmarks/ci_coverage.py, docs/results/ci_coverage.json). Here the interval is a Student-t
interval on the per-seed means (or per-seed paired differences: the mean over the same test
prompts of A - B is mean(A) - mean(B)), which has its stated coverage at any number of seeds >= 2
when the per-seed values are about normal - a mean of 512 prompts is, by the central limit
theorem, plus a between-seed effect.

No numpy or scipy: this module is imported by the report code and its tests, scipy is not a
dependency of the project, and the t quantile is a few lines (the regularized incomplete beta
function by its continued fraction, then bisection; tests/test_seed_intervals.py checks it
against published table values).
"""

from __future__ import annotations

import math
from functools import lru_cache

LEVEL = 0.95
# Fewer seeds than this and a claim is "inconclusive (too few seeds)": with 2 seeds the t interval
# has 1 degree of freedom (t = 12.7) and a sample SD from two numbers, so it decides nothing useful.
MIN_SEEDS = 3
# The non-inferiority margin of a task: this fraction of its gold reward's achievable range. Fixed
# from the task's definition alone (never from results): 2% of the scale is below every gap by
# which the paper ranks methods (the smallest, PPO over DPO on AlpacaEval 2, is 2.07 points of
# 100), so "within the margin" cannot hide a difference of the size the paper reports.
MARGIN_FRACTION = 0.02


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use the symmetry otherwise
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=256)  # the report asks for the same few df again and again
def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t (bisection on t_cdf: 200 halvings reach double precision)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval for the mean of `values` (one number per seed); (nan, nan) below 2 values."""
    n = len(values)
    if n < 2:
        return (float("nan"), float("nan"))
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return (mean - half, mean + half)


def seed_interval(values_by_seed: list[list[float]], level: float = LEVEL) -> tuple[float, float]:
    """The t interval over seeds of prompt-level values: each seed's mean is one observation."""
    return t_interval([sum(v) / len(v) for v in values_by_seed if v], level)


def margin_for(gold_range: float | None) -> float | None:
    return None if gold_range is None else MARGIN_FRACTION * gold_range


# The verdicts, stated before the data. A bound that touches a threshold does not clear it.
def beats_verdict(ci: list[float], n_seeds: int, margin: float | None) -> str:
    """ "A beats B": the interval of A - B above 0. Below 0: A loses. Inside (-margin, +margin)
    around 0: a tie within the margin (the claim fails). Otherwise too wide to decide."""
    lo, hi = ci
    if n_seeds < MIN_SEEDS or math.isnan(lo) or math.isnan(hi):
        return "inconclusive (too few seeds)"
    if lo > 0:
        return "holds"
    if hi < 0:
        return "fails (loses)"
    if margin is not None and lo > -margin and hi < margin:
        return "fails (a tie within the margin)"
    return "inconclusive"


def at_least_verdict(ci: list[float], n_seeds: int, margin: float | None) -> str:
    """ "A is at or above B" / "A reaches B": non-inferiority of A - B with margin m. Holds when the
    interval's lower end is above -m (said apart: above B, or below B by less than m); fails when
    the whole interval is below -m; otherwise inconclusive. Without a margin it cannot hold."""
    lo, hi = ci
    if n_seeds < MIN_SEEDS or math.isnan(lo) or math.isnan(hi):
        return "inconclusive (too few seeds)"
    if margin is None:
        return "holds (above)" if lo > 0 else "fails (below)" if hi < 0 else "inconclusive (no margin stated)"
    if lo > 0:
        return "holds (above)"
    if lo > -margin:
        return "holds (below, by less than the margin)" if hi < 0 else "holds (within the margin)"
    if hi < -margin:
        return "fails (below by more than the margin)"
    return "inconclusive"
