"""`rto reproduce`: the paper's claims on a task with a gold reward, over seeds, with intervals.

Per seed: one SFT model, preference set, RM and DPO model (`Pipeline.offline`), then
every RL method against them with the same data and the same tuned settings:
 1. tuning on the dev split: a grid of PPO (learning rate x KL coefficient), the best
    by final dev gold reward; RTO inherits PPO's choice and tunes only beta1 (its clip
    scales with it). On the first seed only, unless `tune: every-seed`. The tuning runs
    only choose: they draw their RL randomness (sampling, mini-batch order) from
    seed + TUNING_SEED_OFFSET, and are never evaluated as results. (A run is a function
    of its seed and settings on one machine, so rerunning the winner with the seed it was
    tuned on would give back the selected run itself, with its favourable draw.)
 2. the methods and ablations (PPO, RTO, RS, Semi, DDPO, DPO-term only, REINFORCE++,
    RTO with REINFORCE++), all with the tuned settings, each one fresh run with the
    seed's own RL seed - PPO and RTO included;
 3. data efficiency: PPO and RTO on the first 1/16 ... 1/2 of the RL prompt pool, with
    the same number of optimizer steps as on the whole pool;
 4. gold references: PPO and RTO with the gold score as the sparse reward, and PPO on the
    dense per-token gold reward (where the task has one);
 5. every policy evaluated on the same test prompts.
Then `DIR/results.json` and the figures (see `rto.report_reproduce`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rto.config import opt, require
from rto.data import PROMPT_FIELDS, read_jsonl, write_json, write_jsonl
from rto.pipeline import RL_METHODS, Pipeline, PipelineConfig
from rto.pipeline_summary import reference_lines
from rto.tasks import Task

METHODS = list(RL_METHODS)  # every RL method of the pipeline (one per reward placement, and REINFORCE++)
GOLD_REFERENCES = {  # name: (method, extra settings)
    "ppo-gold": ("ppo", {"rm_weight": 0.0, "custom_rewards": ["task:gold-sequence"]}),
    "rto-gold": ("rto", {"rm_weight": 0.0, "custom_rewards": ["task:gold-sequence"]}),
    "ppo-dense-gold": ("ppo", {"rm_weight": 0.0, "custom_rewards": ["task:gold"]}),
}
# Tuning runs use seed + this as their `rto ppo` seed (the SFT/RM/DPO models stay the seed's own).
TUNING_SEED_OFFSET = 10_000_019
QUICK = dict(preset="smoke", ppo_lrs=[1e-4], kl_coefs=[0.01, 0.05], rto_beta1s=[0.05, 0.3],
             fractions=[0.25, 0.5, 1.0])


@dataclass
class ReproduceConfig:
    out: str = opt("", "output directory")
    task: str = opt("keyed", "task with a gold reward")
    preset: str = opt("default", "the task's preset of stage settings")
    seeds: int = opt(5, "number of seeds", ge=1)
    first_seed: int = opt(0, "seeds are first_seed, first_seed + 1, ...", ge=0)
    quick: bool = opt(False, "a few minutes: smoke preset, 2 seeds at most, small grids (for tests)")
    jobs: int = opt(2, "RL runs at once as processes (1: in this process, one after another)", ge=1)
    threads: int = opt(0, "torch threads per process (0: cores / jobs)", ge=0)
    ppo_lrs: list[float] = opt([5e-5, 1e-4, 2e-4], "PPO grid: learning rates (policy and critic)")
    kl_coefs: list[float] = opt([0.01, 0.05, 0.2], "PPO grid: KL coefficients")
    rto_beta1s: list[float] = opt([0.05, 0.1, 0.3, 1.0], "RTO grid: beta1 values")
    dpo_clip_ratio: float = opt(1.0, "RTO's dpo_clip = beta1 x this (1: the log-ratio is clipped at +-1)", gt=0)
    fractions: list[float] = opt([0.0625, 0.125, 0.25, 0.5, 1.0], "data-efficiency fractions of the RL prompt pool")
    tune: Literal["first-seed", "every-seed"] = opt("first-seed", "tune on the first seed only, or on each")
    gold_references: bool = opt(True, "also run the gold-reward reference points")
    resume: bool = opt(True, "skip runs that finished before with the same settings")
    report_only: bool = opt(False, "only rebuild results.json, results.md and the figures from OUT/per_seed.json")
    ppo: dict = opt({}, "extra `rto ppo` settings for every RL run")

    def validate(self):
        require(self, "reproduce", "out")
        if self.quick:
            for key, value in QUICK.items():
                setattr(self, key, value)
            self.seeds = min(self.seeds, 2)
            self.jobs = 1
        for f in self.fractions:
            if not 0 < f <= 1:
                from rto.errors import UserError

                raise UserError(f"reproduce: fractions must be in (0, 1], got {f}")
        if 1.0 not in self.fractions:
            self.fractions = [*self.fractions, 1.0]
        self.fractions = sorted(self.fractions)


def _final_dev_gold(run_dir: Path) -> float:
    curve = json.loads((run_dir / "metrics.json").read_text())["curve"]
    return curve[-1].get("gold_reward", curve[-1].get("rm_score", float("nan")))


def _subset_prompts(d: Path, fraction: float) -> Path:
    rows = read_jsonl(d / "rl_prompts.jsonl", PROMPT_FIELDS)
    n = max(1, round(len(rows) * fraction))
    path = d / f"rl_prompts_{n}.jsonl"
    write_jsonl(path, rows[:n])
    return path


class Reproduction:
    def __init__(self, cfg: ReproduceConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.tuning: dict = {}
        self.chosen: dict = {}

    def pipeline(self, seed: int) -> Pipeline:
        cfg = self.cfg
        pcfg = PipelineConfig(out=str(self.out / f"seed{seed}"), task=cfg.task, preset=cfg.preset,
                              methods=["sft", "dpo", *METHODS], seed=seed, jobs=cfg.jobs, threads=cfg.threads,
                              ppo=dict(cfg.ppo), resume=cfg.resume)
        return Pipeline(pcfg)

    def rl_threads(self, pipe: Pipeline, n: int) -> int:
        return pipe.threads_for(min(self.cfg.jobs, n))

    def tuning_job(self, pipe: Pipeline, name: str, method: str, extra: dict, threads: int):
        """A tuning run: the final runs' settings, but its own RL seed (see TUNING_SEED_OFFSET)."""
        name, stage, cfg = pipe.rl_job(name, method, extra, threads=threads)
        return name, stage, dataclasses.replace(cfg, seed=pipe.cfg.seed + TUNING_SEED_OFFSET)

    def tune(self, pipe: Pipeline) -> None:
        """The PPO grid, then RTO's beta1 grid on PPO's choice; sets `self.chosen`. The runs
        only choose the settings: `run_seed` trains the final PPO and RTO afresh."""
        cfg = self.cfg
        grid = [(lr, kl) for lr in cfg.ppo_lrs for kl in cfg.kl_coefs]
        t = self.rl_threads(pipe, len(grid))
        jobs = [self.tuning_job(pipe, f"tune/ppo_lr{lr:g}_kl{kl:g}", "ppo",
                                {"actor_lr": lr, "critic_lr": lr, "kl_coef": kl}, threads=t) for lr, kl in grid]
        pipe.run_group(jobs)
        ppo_rows = [{"actor_lr": lr, "critic_lr": lr, "kl_coef": kl, "dev_gold": _final_dev_gold(pipe.out / name)}
                    for (lr, kl), (name, _, _) in zip(grid, jobs)]
        best_ppo = max(range(len(grid)), key=lambda i: ppo_rows[i]["dev_gold"])
        ppo_choice = {k: ppo_rows[best_ppo][k] for k in ("actor_lr", "critic_lr", "kl_coef")}
        t = self.rl_threads(pipe, len(cfg.rto_beta1s))
        rjobs = [self.tuning_job(pipe, f"tune/rto_b{b:g}", "rto",
                                 {**ppo_choice, "beta1": b, "dpo_clip": b * cfg.dpo_clip_ratio}, threads=t)
                 for b in cfg.rto_beta1s]
        pipe.run_group(rjobs)
        rto_rows = [{"beta1": b, "dpo_clip": b * cfg.dpo_clip_ratio, "dev_gold": _final_dev_gold(pipe.out / name)}
                    for b, (name, _, _) in zip(cfg.rto_beta1s, rjobs)]
        best_rto = max(range(len(rto_rows)), key=lambda i: rto_rows[i]["dev_gold"])
        self.tuning[str(pipe.cfg.seed)] = {"ppo_grid": ppo_rows, "rto_grid": rto_rows,
                                           "rl_seed": pipe.cfg.seed + TUNING_SEED_OFFSET}
        self.chosen = {**ppo_choice, "beta1": rto_rows[best_rto]["beta1"], "dpo_clip": rto_rows[best_rto]["dpo_clip"]}

    def run_seed(self, seed: int, tune: bool) -> dict:
        cfg = self.cfg
        pipe = self.pipeline(seed)
        pipe.out.mkdir(parents=True, exist_ok=True)
        pipe.offline(needs_rm=True, needs_dpo=True)
        if tune:
            self.tune(pipe)
        settings = dict(self.chosen)
        runs: dict[str, Path] = {}
        specs: list[tuple[str, str, dict, Path | None]] = [(m, m, settings, None) for m in METHODS]
        d = pipe.out / "data"
        for f in cfg.fractions:
            if f < 1.0:
                subset = _subset_prompts(d, f)
                specs += [(f"{m}@{f:g}", m, settings, subset) for m in ("ppo", "rto")]
        has_gold = type(pipe.task).gold_token_rewards is not Task.gold_token_rewards
        if cfg.gold_references:
            specs += [(name, method, {**settings, **extra}, None) for name, (method, extra) in GOLD_REFERENCES.items()
                      if name != "ppo-dense-gold" or has_gold]
        t = self.rl_threads(pipe, len(specs))
        jobs = [pipe.rl_job(name, method, extra, prompts=prompts, threads=t) for name, method, extra, prompts in specs]
        pipe.run_group(jobs)
        for name, _, _ in jobs:
            runs[name] = pipe.out / name
        models = {"sft": pipe.out / "sft", "dpo": pipe.out / "dpo"} | {n: p / "policy" for n, p in runs.items()}
        ev = pipe.evaluate(models, pipe.out / "eval.json", with_rm=True)
        refs = reference_lines(pipe, jobs[0][2])
        rm = json.loads((pipe.out / "rm" / "metrics.json").read_text())
        from rto.report_reproduce import token_alignment

        return {"seed": seed, "runs": {n: str(p) for n, p in runs.items()}, "eval": ev, "reference_lines": refs,
                "rm_accuracy": rm.get("eval_accuracy"), "settings": settings,
                "prompt_pool": len(read_jsonl(d / "rl_prompts.jsonl", PROMPT_FIELDS)),
                "token_alignment": token_alignment(pipe.out, pipe.task) if has_gold else {}}

    def run(self) -> dict:
        from rto.report_reproduce import aggregate, write_figures

        cfg = self.cfg
        start = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        seeds = [cfg.first_seed + i for i in range(cfg.seeds)]
        if cfg.report_only:
            per_seed = json.loads((self.out / "per_seed.json").read_text())
            previous = json.loads((self.out / "results.json").read_text()) if (self.out / "results.json").is_file() else {}
            self.tuning = previous.get("tuning", {}).get("grids", {})
            self.chosen = previous.get("tuning", {}).get("chosen", {})
            start -= previous.get("wall_time_s", 0.0)
        else:
            per_seed = []
            for i, seed in enumerate(seeds):
                print(f"[rto] reproduce: seed {seed} ({i + 1} of {len(seeds)})", flush=True)
                per_seed.append(self.run_seed(seed, tune=i == 0 or cfg.tune == "every-seed"))
                write_json(self.out / "per_seed.json", per_seed)
        results = aggregate(per_seed, self.out, cfg)
        results["tuning"] = {"grids": self.tuning, "chosen": self.chosen, "protocol": cfg.tune}
        results["wall_time_s"] = time.time() - start
        results["machine"] = _machine()
        write_json(self.out / "results.json", results)
        write_figures(results, per_seed, self.out, cfg)
        from rto.report_reproduce import results_markdown

        command = f"rto reproduce --task {cfg.task} --seeds {cfg.seeds}" + (" --quick" if cfg.quick else "")
        (self.out / "results.md").write_text(results_markdown(results, command))
        from rto.report_reproduce import summary_table

        print(summary_table(results))
        print(f"results: {self.out / 'results.json'}")
        return results


def _machine() -> str:
    import os
    import platform

    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " + (
        f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU")


def run(cfg: ReproduceConfig) -> dict:
    from rto.distributed import refuse_launcher

    refuse_launcher("reproduce")
    return Reproduction(cfg).run()


__all__ = ["ReproduceConfig", "run", "METHODS", "GOLD_REFERENCES", "RL_METHODS", "TUNING_SEED_OFFSET"]
