"""`rto tune`: choose the RL settings (and the DPO baseline's) for a task on its dev split, and
write them as a preset file - the grids of rto.experiments.tuning, run on the task's own models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from rto.experiments.pipeline import Pipeline
from rto.experiments.pipeline_config import PipelineConfig
from rto.experiments.tuning import (
    DPO_POLICY_SECTION,
    FAMILIES,
    TuneGrid,
    is_preset_file,
    tune_dpo,
    tune_families,
    write_preset,
)
from rto.io.config import opt, require


@dataclass
class TuneConfig(TuneGrid):
    out: str = opt("", "output directory: the tuning runs, OUT/preset.yaml")
    task: str = opt("keyed", "task name or pkg.module:Class")
    preset: str = opt("default", "the task's base preset (stage settings other than the tuned ones)")
    seed: int = opt(0, "seed of the SFT/RM/DPO models tuned on", ge=0)
    jobs: int = opt(2, "tuning runs at once as processes", ge=1)
    threads: int = opt(0, "torch threads per process (0: cores / jobs)", ge=0)
    select_by: Literal["gold_reward", "judge_score"] = opt("gold_reward", "the dev criterion")
    judge: str = opt("", "held-out judge (as rto pipeline --judge)")
    resume: bool = opt(True, "skip stages and runs that finished before with the same settings")

    def validate(self):
        require(self, "tune", "out")
        self.check_budget()


def run(cfg: TuneConfig) -> dict:
    from rto.runtime.distributed import refuse_launcher

    refuse_launcher("tune")
    shared = ("out", "task", "preset", "seed", "jobs", "threads", "resume", "select_by", "judge")  # same meaning
    methods = [m for f in cfg.families for m in FAMILIES[f]]
    pipe = Pipeline(PipelineConfig(methods=["sft", "dpo", *methods], **{k: getattr(cfg, k) for k in shared}))
    pipe.out.mkdir(parents=True, exist_ok=True)
    pipe.offline(needs_rm=True, needs_dpo=True)
    grid = TuneGrid(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TuneGrid)})
    record, others = tune_families(pipe, grid, cfg.select_by)
    # The DPO baseline is tuned with the PPO family (RTO's first comparison), or where the preset has none.
    needs_dpo = record is not None or DPO_POLICY_SECTION not in pipe.preset
    dpo = tune_dpo(pipe, grid, cfg.select_by) if needs_dpo else None
    carried = pipe.preset_record if is_preset_file(cfg.preset) else None  # a tuned file: its choices stay
    path = write_preset(
        pipe.out / "preset.yaml", pipe.task.name, pipe.base_preset, cfg.seed, record, dpo, others, carried
    )
    lines = []
    for family, rec in (({"ppo": record} if record else {}) | others).items():
        budget = ", ".join(
            f"{v} {k.removesuffix('_runs').upper()} runs" for k, v in rec["budget"].items() if k.endswith("_runs")
        )
        chosen = ", ".join(f"{k} {v:g}" for k, v in rec["chosen"].items())
        lines.append(f"{family}: {chosen} ({budget}, {rec['seconds']:.0f} s)")
    if dpo:
        dpo_chosen = ", ".join(f"{k} {v:g}" for k, v in dpo["chosen"].items())
        lines.append(f"the DPO policy: {dpo_chosen} ({dpo['runs']} runs, {dpo['seconds']:.0f} s)")
    print(f"[rto] tune: chose {'; '.join(lines)}; preset: {path}")
    return {**(record or {}), "families": others, **({"dpo_policy": dpo} if dpo else {})}
