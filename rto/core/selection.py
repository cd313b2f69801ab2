"""Choosing the result of an RL run on the dev split, and seeing over-optimisation.

Pure functions and a small state machine over the dev evaluation points the trainer logs
(dicts with "iteration", the criterion, "kl_to_ref", the proxy "rm_score"; no models, no I/O):
- `Selection`: best-of-evaluations on a dev criterion (a gold or held-out score, never the
  training RM's), early stopping after `patience` evaluations without improvement, and a KL
  budget to the reference that ends the run when a point exceeds it (such a point is never
  selected). Its state goes into checkpoints, so a resumed run selects exactly as an
  uninterrupted one.
- `divergence`: the first evaluation where the proxy (the training RM's score) is still above
  its value at the criterion's best while the criterion has fallen clearly below that best -
  Gao et al. (2022)'s proxy/gold divergence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Selection:
    metric: str  # the dev criterion, a key of the evaluation points (higher is better)
    patience: int = 0  # evaluations without a new best before the run stops (0: never stops early)
    kl_budget: float | None = None  # stop once the dev KL to the reference exceeds this (nats per response)
    min_delta: float = 0.0  # an improvement smaller than this is not a new best
    best: float = -math.inf
    best_iteration: int = -1
    since_best: int = 0
    stop_reason: str = ""

    def observe(self, point: dict) -> bool:
        """Take one evaluation point; True when it is the new best (its weights are the result)."""
        if self.metric not in point:
            raise KeyError(f"the evaluation has no {self.metric!r} to select by (it has {', '.join(point)})")
        kl = point.get("kl_to_ref")
        if self.kl_budget is not None and kl is not None and kl > self.kl_budget:
            self.stop_reason = (
                f"dev KL to the reference {kl:.3g} exceeds the budget {self.kl_budget:g} at "
                f"iteration {point['iteration']}"
            )
            return False
        value = float(point[self.metric])
        if value > self.best + self.min_delta or self.best_iteration < 0:
            self.best, self.best_iteration, self.since_best = value, int(point["iteration"]), 0
            return True
        self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            self.stop_reason = (
                f"{self.metric} has not improved on {self.best:.4g} (iteration {self.best_iteration}) "
                f"for {self.since_best} evaluations (patience {self.patience})"
            )
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.stop_reason)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def divergence(
    curve: list[dict], proxy: str = "rm_score", true: str = "gold_reward", tolerance: float | str = "se"
) -> dict | None:
    """The first point where `true` has fallen more than `tolerance` below its best so far while
    `proxy` is above its value at that best: {"metric": true, "iteration", "true_best_iteration",
    true, true + "_at_best", proxy, proxy + "_at_best"}, or None.

    tolerance "se": twice the point's standard error of `true` (key `true + "_se"`), else 0."""
    best_i = None
    for i, point in enumerate(curve):
        if true not in point or proxy not in point:
            continue
        if best_i is None or point[true] > curve[best_i][true]:
            best_i = i
            continue
        tol = 2.0 * point.get(f"{true}_se", 0.0) if tolerance == "se" else float(tolerance)
        best = curve[best_i]
        if point[true] < best[true] - tol and point[proxy] > best[proxy]:
            return {
                "metric": true,
                "iteration": point["iteration"],
                "true_best_iteration": best["iteration"],
                f"{true}": point[true],
                f"{true}_at_best": best[true],
                f"{proxy}": point[proxy],
                f"{proxy}_at_best": best[proxy],
            }
    return None
