"""`rto pipeline`: data -> SFT -> pairs -> (RM, DPO) -> (PPO, RTO, ...) -> eval -> report.

Every stage gets a resolved config written to OUT/configs/<stage>.yaml, so any
stage can be re-run alone with `rto <stage> --config OUT/configs/<stage>.yaml`.
Independent stages (RM and DPO; the RL methods) run as parallel processes when
`jobs` > 1, each with its own thread count, so they do not oversubscribe cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rto import STAGES
from rto.core.rewards import PLACEMENTS
from rto.experiments.pipeline_config import HELDOUT_RM, RL_METHODS, PipelineConfig
from rto.experiments.pipeline_summary import heldout_pairs_file, last_differs, summarise
from rto.experiments.stage_runner import StageRunner
from rto.experiments.tuning import (
    DPO_POLICY,
    DPO_POLICY_SECTION,
    METHOD_SECTION,
    dpo_policy_job,
    is_preset_file,
    read_preset,
    tune_pipeline,
)
from rto.io.config import build
from rto.io.errors import UserError


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for p in parts:
        out.update(p or {})
    return out


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        from rto.tasks import TUNED, load_task, tuned_preset_file

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.task = load_task(cfg.task)
        presets = getattr(self.task, "presets", {}) or {}
        self.preset_record: dict = {}  # what a preset file says of how its settings were chosen
        if cfg.preset == TUNED and tuned_preset_file(self.task):
            self.preset, self.preset_record = read_preset(tuned_preset_file(self.task), self.task)
        elif is_preset_file(cfg.preset):
            self.preset, self.preset_record = read_preset(cfg.preset, self.task)
        elif cfg.preset not in presets:
            raise UserError(
                f"pipeline: task {cfg.task!r} has no preset {cfg.preset!r} (has: {', '.join(presets) or 'none'}); "
                "a preset file from `rto tune` ends in .yaml"
            )
        else:
            self.preset = {section: dict(values) for section, values in presets[cfg.preset].items()}
        self.cores = os.cpu_count() or 1
        self.runner = StageRunner(self.out, cfg.resume, cfg.jobs)  # runs stages, here or as processes

    # --- configs -------------------------------------------------------------------------
    def stage_config(self, stage: str, section: str, wiring: dict, extra: dict | None = None):
        """preset <- user's section <- extra <- wiring (paths the pipeline decides)."""
        cls = STAGES[stage].config_class()
        values = _merge(self.preset.get(section, {}), getattr(self.cfg, section, {}), extra, wiring)
        return build(cls, values, f"pipeline {section}")

    def threads_for(self, parallel: int) -> int:
        """Threads per process: the config's, else cores / processes, capped by OMP_NUM_THREADS if set."""
        if self.cfg.threads:
            return self.cfg.threads
        cap = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or self.cores
        return max(1, min(cap, self.cores // max(1, parallel)))

    # --- the pipeline ----------------------------------------------------------------------
    def needs(self, methods: list[str]) -> tuple[bool, bool]:
        """(needs an RM, needs a DPO model) for these methods."""
        rl = [m for m in methods if m in RL_METHODS]
        needs_dpo = "dpo" in methods or any(
            PLACEMENTS[self.rl_settings(m).get("reward", "sparse")].uses_dpo for m in rl
        )
        return bool(rl), needs_dpo

    def rl_settings(self, method: str, extra: dict | None = None) -> dict:
        cfg = self.cfg
        return _merge(
            self.preset.get("ppo", {}),
            cfg.ppo,
            RL_METHODS[method],
            self.preset.get(METHOD_SECTION, {}).get(method, {}),  # a tuned preset's per-method choice
            cfg.method_overrides.get(method, {}),
            extra,
        )

    def job(self, name: str, stage: str, extra: dict | None = None, **wiring) -> tuple[str, str, object]:
        """(name, stage, config): the stage's settings with what the pipeline wires in (paths, seeds,
        threads) on top; `extra` goes under the user's settings."""
        values = {k: str(v) if isinstance(v, Path) else v for k, v in wiring.items()}
        return name, stage, self.stage_config(stage, stage, values, extra)

    def offline(self, needs_rm: bool, needs_dpo: bool) -> None:
        """data -> SFT -> pairs -> (RM, DPO): everything the RL methods share."""
        cfg, out, d = self.cfg, self.out, self.out / "data"
        one, two = self.threads_for(1), self.threads_for(min(cfg.jobs, 2))  # alone, or two side by side
        sft = out / "sft"
        self.runner.run_one(*self.job("data", "data", out=d, task=cfg.task, seed=cfg.seed))
        self.runner.run_one(
            *self.job("sft", "sft", data=d / "sft.jsonl", out=sft, task=cfg.task, seed=cfg.seed, threads=one)
        )
        if needs_rm or needs_dpo:
            wiring = dict(model=sft, out=d, task=cfg.task, seed=cfg.seed, threads=one)
            self.runner.run_one(*self.job("pairs", "pairs", self.judge_pairs(), **wiring))
        offline = []

        def rm_job(name: str, data: Path, seed: int, eval_data: str) -> tuple[str, str, object]:
            """A reward model trained as the training RM is: on `data`, from the SFT model."""
            return self.job(
                name, "rm", model=sft, data=data, out=out / name, eval_data=eval_data, seed=seed, threads=two
            )

        if needs_rm:
            heldout = str(heldout_pairs_file(out) or "")  # the pairs the summary scores the DPO model on, too
            offline.append(rm_job("rm", d / "prefs.jsonl", cfg.seed, heldout))
            for i in range(2, cfg.rm_ensemble + 1):  # more members, same settings, each on a resample
                resample = _bootstrap(d / "prefs.jsonl", d / f"prefs_boot{i}.jsonl", cfg.seed, i)
                offline.append(rm_job(f"rm_{i}", resample, cfg.seed + 1000 * i, heldout))
            if self.cfg.judge == HELDOUT_RM:  # trained exactly as the training RM, on other pairs
                offline.append(rm_job("judge_rm", d / "prefs_judge.jsonl", cfg.seed + 1, heldout))
        if needs_dpo:
            offline.append(
                self.job("dpo", "dpo", model=sft, data=d / "prefs.jsonl", out=out / "dpo", seed=cfg.seed, threads=two)
            )
        self.runner.run_group(offline)

    @property
    def base_preset(self) -> str:
        """The name of the task's preset underneath (a preset file names its own base)."""
        return self.preset_record.get("base", self.cfg.preset)

    def judge_pairs(self) -> dict:
        """With --judge heldout-rm: the pairs stage also writes the judge's pairs (as many as the RM's)."""
        if self.cfg.judge != HELDOUT_RM or "n_judge_pairs" in _merge(self.preset.get("pairs"), self.cfg.pairs):
            return {}
        n_pairs = _merge(self.preset.get("pairs"), self.cfg.pairs).get("n_pairs")
        return {"n_judge_pairs": n_pairs or STAGES["pairs"].config_class()().n_pairs}

    @property
    def judge_spec(self) -> str:
        """What `rto ppo --judge` and `rto eval --judge` get: a path or module:function, or ""."""
        if self.cfg.judge == HELDOUT_RM:  # trained with the RM: absent where no method needs one
            return str(self.out / "judge_rm") if (self.out / "judge_rm").is_dir() else ""
        return self.cfg.judge

    def selection_settings(self, method: str) -> dict:
        """--select-by (gold reward or judge) where the pipeline selects and the method's settings allow it."""
        settings = self.rl_settings(method)
        if not self.cfg.select or "select_by" in settings or not settings.get("eval_every", 10):
            return {}
        return {"select_by": self.cfg.select_by}

    def rl_job(
        self, name: str, method: str, extra: dict | None = None, prompts: Path | None = None, threads: int = 1
    ) -> tuple[str, str, object]:
        """An `rto ppo` job for `method` (a key of RL_METHODS), written to OUT/name."""
        cfg, out, d = self.cfg, self.out, self.out / "data"
        wiring = {
            "policy": str(out / "sft"),
            "prompts": str(prompts or d / "rl_prompts.jsonl"),
            "out": str(out / name),
            "reward_model": str(out / "rm"),
            "dpo_model": str(out / "dpo") if (out / "dpo").is_dir() else "",
            "eval_prompts": str(d / "dev_prompts.jsonl"),
            "task": cfg.task,
            "seed": cfg.seed,
            "threads": threads,
            "judge": self.judge_spec,
        }
        # The RM ensemble is a setting, not wiring: `extra` may switch it off for one run.
        ensemble = {"reward_model_ensemble": [str(out / f"rm_{i}") for i in range(2, cfg.rm_ensemble + 1)]}
        values = _merge(ensemble, self.rl_settings(method, extra), wiring)
        return name, "ppo", build(STAGES["ppo"].config_class(), values, f"pipeline {name}")

    def evaluate(self, models: dict[str, Path], out_file: Path, with_rm: bool) -> dict:
        import json

        cfg = self.cfg
        eval_cfg = self.stage_config(
            "eval",
            "eval",
            {
                "models": [f"{name}={path}" for name, path in models.items()],
                "prompts": str(self.out / "data" / "test_prompts.jsonl"),
                "out": str(out_file),
                "task": cfg.task,
                "baseline": "sft",
                "reward_model": str(self.out / "rm") if with_rm else "",
                "seed": cfg.seed,
                "judge": self.judge_spec,
                "threads": self.threads_for(1),
            },
        )
        self.runner.run_one("eval", "eval", eval_cfg)
        return json.loads(Path(out_file).read_text())

    def run(self) -> dict:
        cfg, out = self.cfg, self.out
        start = time.time()
        out.mkdir(parents=True, exist_ok=True)
        needs_rm, needs_dpo = self.needs(cfg.methods)
        self.offline(needs_rm, needs_dpo or (cfg.tune and needs_rm))  # the RTO grid needs the DPO model
        rl_methods = [m for m in cfg.methods if m in RL_METHODS]
        if cfg.tune and rl_methods:
            tune_pipeline(self)
        rl_threads = self.threads_for(min(cfg.jobs, len(rl_methods) or 1))
        rl_jobs = [self.rl_job(m, m, self.selection_settings(m), threads=rl_threads) for m in rl_methods]
        # A DPO baseline tuned as RTO is (rto tune's DPO grid: --tune, or a preset file's dpo_policy).
        dpo_policy = (
            [dpo_policy_job(self, DPO_POLICY, self.preset[DPO_POLICY_SECTION], rl_threads, cfg.seed)]
            if "dpo" in cfg.methods and self.preset.get(DPO_POLICY_SECTION)
            else []
        )
        self.runner.run_group(rl_jobs + dpo_policy)
        paths = {"sft": out / "sft", "dpo": out / "dpo"} | {m: out / m / "policy" for m in rl_methods}
        models = {m: paths[m] for m in cfg.methods} | {name: out / name for name, _, _ in dpo_policy}
        models |= {f"{m}@last": out / m / "policy_last" for m in rl_methods if last_differs(out / m)}
        self.evaluate(models, out / "eval.json", needs_rm)
        return summarise(self, start, rl_jobs)


def run(cfg: PipelineConfig) -> dict:
    from rto.runtime.distributed import refuse_launcher

    refuse_launcher("pipeline")
    return Pipeline(cfg).run()


def _bootstrap(source: Path, target: Path, seed: int, member: int) -> Path:
    """A resample of `source`'s rows with replacement, as many as it has, seeded by the member;
    rewritten only when it changes, so a resumed pipeline does not retrain that member."""
    import random

    rows = source.read_text().splitlines()
    rng = random.Random(f"bootstrap/{seed}/{member}")
    text = "\n".join(rows[rng.randrange(len(rows))] for _ in rows) + "\n"
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)
    return target
