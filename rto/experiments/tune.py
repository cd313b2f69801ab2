"""`rto tune`: choose the RL settings (and the DPO baseline's) for a task on its dev split, and
write them as a preset file - the grids of rto.experiments.tuning, run on the task's own models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from rto.experiments.pipeline import Pipeline
from rto.experiments.pipeline_config import PipelineConfig
from rto.experiments.tuning import TuneGrid, tune_dpo, tune_settings, write_preset
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
    pipe = Pipeline(PipelineConfig(methods=["sft", "dpo", "ppo", "rto"], **{k: getattr(cfg, k) for k in shared}))
    pipe.out.mkdir(parents=True, exist_ok=True)
    pipe.offline(needs_rm=True, needs_dpo=True)
    grid = TuneGrid(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TuneGrid)})
    record = tune_settings(pipe, grid, cfg.select_by)
    dpo = tune_dpo(pipe, grid, cfg.select_by)
    path = write_preset(pipe.out / "preset.yaml", pipe.task.name, pipe.base_preset, cfg.seed, record, dpo)
    chosen = ", ".join(f"{k} {v:g}" for k, v in record["chosen"].items())
    dpo_chosen = ", ".join(f"{k} {v:g}" for k, v in dpo["chosen"].items())
    print(
        f"[rto] tune: chose {chosen} ({record['budget']['ppo_runs']} PPO runs, {record['budget']['rto_runs']} RTO "
        f"runs, {record['seconds']:.0f} s); the DPO policy: {dpo_chosen} ({dpo['runs']} runs, {dpo['seconds']:.0f} s); "
        f"preset: {path}"
    )
    return {**record, "dpo_policy": dpo}
