"""`rto pipeline`'s settings (`PipelineConfig`), beside the pipeline (rto/experiments/pipeline.py): the
methods it can run and the sections of stage settings it passes on, each checked when read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rto import STAGES
from rto.core.rewards import PLACEMENTS
from rto.io.config import check_some, opt
from rto.io.errors import UserError

# RL methods: overrides of the shared `ppo` settings. Every method shares the same SFT model,
# RM, DPO model, data and settings; only these differ. One per reward placement (named by the
# registry in rto.core.rewards), and the critic-free REINFORCE++ for PPO and RTO.
RL_METHODS: dict[str, dict] = {
    **{p.method: {"reward": p.name} for p in PLACEMENTS.values()},
    "reinforce++": {"reward": "sparse", "estimator": "reinforce++"},
    "rto-reinforce++": {"reward": "rto", "estimator": "reinforce++"},
    # Critic-free with groups of 4 responses per prompt (the same number of responses per rollout).
    **{
        f"{prefix}{estimator}": {"reward": reward, "estimator": estimator, "num_generations": 4}
        for estimator in ("grpo", "rloo")
        for prefix, reward in (("", "sparse"), ("rto-", "rto"))
    },
}


OFFLINE_METHODS = ("sft", "dpo")


# The config's sections of stage settings, and the stage whose settings each holds.
STAGE_SECTIONS = {
    "data": "data",
    "sft": "sft",
    "pairs": "pairs",
    "rm": "rm",
    "dpo": "dpo",
    "ppo": "ppo",
    "eval": "eval",
}


HELDOUT_RM = "heldout-rm"  # --judge: an RM the pipeline trains on pairs disjoint from the training RM's


@dataclass
class PipelineConfig:
    out: str = opt("", "output directory")
    task: str = opt("keyed", "task name or pkg.module:Class")
    preset: str = opt(
        "default",
        "the task's preset of stage settings (e.g. smoke, default; tuned: a built-in "
        "task's settings chosen by `rto tune`), or a preset file written by `rto tune` "
        "(FILE.yaml)",
    )
    tune: bool = opt(
        False,
        "choose the RL settings on the dev split first (rto tune's grids on this run's models; "
        "OUT/preset.yaml); the user's own ppo settings still win",
    )
    tune_grid: dict = opt({}, "rto tune's grids for --tune, e.g. {kl_coefs: [0.05, 0.2]} (see rto tune --help)")
    methods: list[str] = opt(["sft", "dpo", "ppo", "rto"], "methods to train and compare")
    seed: int = opt(0, "random seed", ge=0)
    jobs: int = opt(2, "independent stages run at once as processes (1: one after another)", ge=1)
    threads: int = opt(0, "torch threads per process (0: cores / jobs)", ge=0)
    resume: bool = opt(False, "skip stages that finished before with the same settings (OUT/configs/*.done)")
    select: bool = opt(
        True,
        "the RL methods' results are chosen on the dev prompts by --select-by (rto ppo "
        "--select-by, unless the ppo settings name their own); the table shows each method's "
        "last checkpoint too (METHOD@last)",
    )
    select_by: Literal["gold_reward", "judge_score"] = opt(
        "gold_reward", "the dev criterion: the task's gold reward, or the held-out judge's score (needs --judge)"
    )
    judge: str = opt(
        "",
        "held-out judge of dev and test responses, beside the gold reward (rto ppo --judge): "
        "heldout-rm (an RM trained like the training RM on other pairs: pairs.n_judge_pairs, "
        "default as many as pairs.n_pairs), a reward-model directory, or module:function",
    )
    rm_ensemble: int = opt(
        1,
        "reward models trained: N > 1 adds N - 1 more (other seeds, each on a bootstrap "
        "resample of the pairs) that rto ppo combines with the first (--reward-model-ensemble; "
        "how: ppo.ensemble_reduce)",
        ge=1,
    )
    data: dict = opt({}, "settings of `rto data`")
    sft: dict = opt({}, "settings of `rto sft`")
    pairs: dict = opt({}, "settings of `rto pairs`")
    rm: dict = opt({}, "settings of `rto rm`")
    dpo: dict = opt({}, "settings of `rto dpo`")
    ppo: dict = opt({}, "settings of `rto ppo` shared by every RL method")
    method_overrides: dict = opt({}, "per-method `rto ppo` settings, e.g. {rto: {beta1: 0.1}}")
    eval: dict = opt({}, "settings of `rto eval`")

    def validate(self):
        if not self.out:
            raise UserError("pipeline: --out is required")
        known = set(OFFLINE_METHODS) | set(RL_METHODS)
        for m in self.methods:
            if m not in known:
                raise UserError(f"pipeline: unknown method {m!r}; known: {', '.join(sorted(known))}")
        if "sft" not in self.methods:
            raise UserError("pipeline: methods must include sft (the baseline everything is compared with)")
        if self.select_by == "judge_score" and not self.judge:
            raise UserError("pipeline: --select-by judge_score needs a --judge")
        for m in self.method_overrides:
            if m not in RL_METHODS:
                raise UserError(f"pipeline: method_overrides names {m!r}, which is not an RL method")
        # Each stage section is checked against its stage's settings now, not inside a child process.
        sections = {section: getattr(self, section) for section in STAGE_SECTIONS}
        sections.update({f"method_overrides.{m}": v for m, v in self.method_overrides.items()})
        for where, values in sections.items():
            stage = STAGE_SECTIONS.get(where, "ppo")
            check_some(STAGES[stage].config_class(), values, f"pipeline: {where}")
