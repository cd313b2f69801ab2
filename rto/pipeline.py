"""`rto pipeline`: data -> SFT -> pairs -> (RM, DPO) -> (PPO, RTO, ...) -> eval -> report.

Every stage gets a resolved config written to OUT/configs/<stage>.yaml, so any
stage can be re-run alone with `rto <stage> --config OUT/configs/<stage>.yaml`.
Independent stages (RM and DPO; the RL methods) run as parallel processes when
`jobs` > 1, each with its own thread count, so they do not oversubscribe cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from rto import progress
from rto.config import build, opt, to_dict
from rto.core.rewards import PLACEMENTS
from rto.errors import UserError
from rto.pipeline_summary import heldout_pairs_file, last_differs, summarise
from rto.stages import STAGES
from rto.tuning import DPO_POLICY, DPO_POLICY_SECTION, dpo_policy_job, is_preset_file, read_preset, tune_pipeline

# RL methods: overrides of the shared `ppo` settings. Every method shares the same SFT model,
# RM, DPO model, data and settings; only these differ. One per reward placement (named by the
# registry in rto.core.rewards), and the critic-free REINFORCE++ for PPO and RTO.
RL_METHODS: dict[str, dict] = {
    **{p.method: {"reward": p.name} for p in PLACEMENTS.values()},
    "reinforce++": {"reward": "sparse", "estimator": "reinforce++"},
    "rto-reinforce++": {"reward": "rto", "estimator": "reinforce++"},
}
OFFLINE_METHODS = ("sft", "dpo")
HELDOUT_RM = "heldout-rm"  # --judge: an RM the pipeline trains on pairs disjoint from the training RM's


@dataclass
class PipelineConfig:
    out: str = opt("", "output directory")
    task: str = opt("keyed", "task name or pkg.module:Class")
    preset: str = opt("default", "the task's preset of stage settings (e.g. smoke, default; tuned: a built-in "
                                 "task's settings chosen by `rto tune`), or a preset file written by `rto tune` "
                                 "(FILE.yaml)")
    tune: bool = opt(False, "choose the RL settings on the dev split first (rto tune's grids on this run's models; "
                            "OUT/preset.yaml); the user's own ppo settings still win")
    tune_grid: dict = opt({}, "rto tune's grids for --tune, e.g. {kl_coefs: [0.05, 0.2]} (see rto tune --help)")
    methods: list[str] = opt(["sft", "dpo", "ppo", "rto"], "methods to train and compare")
    seed: int = opt(0, "random seed", ge=0)
    jobs: int = opt(2, "independent stages run at once as processes (1: one after another)", ge=1)
    threads: int = opt(0, "torch threads per process (0: cores / jobs)", ge=0)
    resume: bool = opt(False, "skip stages that finished before with the same settings (OUT/configs/*.done)")
    select: bool = opt(True, "the RL methods' results are chosen on the dev prompts by --select-by (rto ppo "
                             "--select-by, unless the ppo settings name their own); the table shows each method's "
                             "last checkpoint too (METHOD@last)")
    select_by: Literal["gold_reward", "judge_score"] = opt(
        "gold_reward", "the dev criterion: the task's gold reward, or the held-out judge's score (needs --judge)")
    judge: str = opt("", "held-out judge of dev and test responses, beside the gold reward (rto ppo --judge): "
                         "heldout-rm (an RM trained like the training RM on other pairs: pairs.n_judge_pairs, "
                         "default as many as pairs.n_pairs), a reward-model directory, or module:function")
    rm_ensemble: int = opt(1, "reward models trained: N > 1 adds N - 1 more (other seeds, each on a bootstrap "
                              "resample of the pairs) that rto ppo combines with the first (--reward-model-ensemble; "
                              "how: ppo.ensemble_reduce)", ge=1)
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
            raise UserError(f"pipeline: task {cfg.task!r} has no preset {cfg.preset!r} (has: {', '.join(presets) or 'none'}); "
                            "a preset file from `rto tune` ends in .yaml")
        else:
            self.preset = {section: dict(values) for section, values in presets[cfg.preset].items()}
        self.cores = os.cpu_count() or 1
        self.timings: dict[str, float] = {}

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

    # --- running -------------------------------------------------------------------------
    def _write_config(self, name: str, cfg) -> Path:
        path = self.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return path

    def _done_marker(self, name: str) -> Path:
        return self.out / "configs" / f"{name}.done"

    def already_done(self, name: str, cfg) -> bool:
        """With `resume`: the stage finished before with exactly this config and these inputs."""
        marker = self._done_marker(name)
        if self.cfg.resume and marker.is_file() and marker.read_text() == _marker_text(cfg):
            print(f"[rto] {name}: finished before with the same settings, skipped", file=sys.stderr, flush=True)
            return True
        marker.unlink(missing_ok=True)
        return False

    def mark_done(self, name: str, cfg) -> None:
        self._done_marker(name).write_text(_marker_text(cfg))

    def run_one(self, name: str, stage: str, cfg) -> None:
        """In this process, with the stage's own progress bar."""
        if self.already_done(name, cfg):
            return
        self._write_config(name, cfg)
        _, run = STAGES[stage].load()
        print(f"[rto] {name}: {STAGES[stage].summary}", file=sys.stderr, flush=True)
        t = time.time()
        run(cfg)
        self.timings[name] = time.time() - t
        self.mark_done(name, cfg)

    def run_group(self, jobs: list[tuple[str, str, object]]) -> None:
        """Independent stages: in parallel processes when jobs > 1, else one after another."""
        jobs = [job for job in jobs if not self.already_done(job[0], job[2])]
        if self.cfg.jobs <= 1 or len(jobs) <= 1:
            for job in jobs:
                self.run_one(*job)
            return
        from tqdm.auto import tqdm

        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        pending = list(jobs)
        running: dict[str, tuple[subprocess.Popen, tqdm, Path, float, object]] = {}
        failed: list[str] = []
        slot = 0
        while pending or running:
            while pending and len(running) < self.cfg.jobs:
                name, stage, cfg = pending.pop(0)
                cfg_path = self._write_config(name, cfg)
                prog = logs / f"{name}.progress.json"
                prog.parent.mkdir(parents=True, exist_ok=True)
                prog.unlink(missing_ok=True)
                env = dict(os.environ, RTO_PROGRESS="0", **{progress.ENV: str(prog)},
                           OMP_NUM_THREADS=str(getattr(cfg, "threads", 1) or 1))
                (logs / f"{name}.log").parent.mkdir(parents=True, exist_ok=True)
                log = open(logs / f"{name}.log", "w")
                proc = subprocess.Popen([sys.executable, "-m", "rto.cli", stage, "--config", str(cfg_path)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
                bar = tqdm(total=1, desc=f"{name:>16}", position=slot % self.cfg.jobs, leave=True,
                           dynamic_ncols=True, disable=not progress.bars_enabled())
                slot += 1
                running[name] = (proc, bar, prog, time.time(), cfg)
            time.sleep(0.5)
            for name in list(running):
                proc, bar, prog, started, cfg = running[name]
                p = progress.read(prog)
                if p and p.get("total"):
                    bar.total = p["total"]
                    bar.n = p["done"]
                    bar.refresh()
                if proc.poll() is not None:
                    bar.n = bar.total
                    bar.refresh()
                    bar.close()
                    self.timings[name] = time.time() - started
                    if progress.plain_lines_wanted():
                        print(f"[rto] pipeline: {name} {'done' if proc.returncode == 0 else 'FAILED'} in "
                              f"{self.timings[name]:.0f} s", file=sys.stderr, flush=True)
                    del running[name]
                    if proc.returncode != 0:
                        failed.append(name)
                        pending.clear()
                    else:
                        self.mark_done(name, cfg)
        if failed:
            name = failed[0]
            tail = (self.out / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise UserError(f"pipeline: stage {name} failed ({tail[0] if tail else 'no output'}); "
                            f"full log: {self.out / 'logs' / (name + '.log')}")

    # --- the pipeline ----------------------------------------------------------------------
    def needs(self, methods: list[str]) -> tuple[bool, bool]:
        """(needs an RM, needs a DPO model) for these methods."""
        rl = [m for m in methods if m in RL_METHODS]
        needs_dpo = "dpo" in methods or any(PLACEMENTS[self.rl_settings(m).get("reward", "sparse")].uses_dpo
                                            for m in rl)
        return bool(rl), needs_dpo

    def rl_settings(self, method: str, extra: dict | None = None) -> dict:
        cfg = self.cfg
        return _merge(self.preset.get("ppo", {}), cfg.ppo, RL_METHODS[method], cfg.method_overrides.get(method, {}),
                      extra)

    def offline(self, needs_rm: bool, needs_dpo: bool) -> None:
        """data -> SFT -> pairs -> (RM, DPO): everything the RL methods share."""
        cfg, out, d = self.cfg, self.out, self.out / "data"
        seq_threads = self.threads_for(1)
        self.run_one("data", "data", self.stage_config("data", "data", {"out": str(d), "task": cfg.task, "seed": cfg.seed}))
        self.run_one("sft", "sft", self.stage_config("sft", "sft", {
            "data": str(d / "sft.jsonl"), "out": str(out / "sft"), "task": cfg.task, "seed": cfg.seed,
            "threads": seq_threads}))
        if needs_rm or needs_dpo:
            self.run_one("pairs", "pairs", self.stage_config("pairs", "pairs", {
                "model": str(out / "sft"), "out": str(d), "task": cfg.task, "seed": cfg.seed, "threads": seq_threads},
                self.judge_pairs()))
        offline = []
        group_threads = self.threads_for(min(cfg.jobs, 2))
        if needs_rm:
            heldout = heldout_pairs_file(out)  # the pairs the summary scores the DPO model on, too
            offline.append(("rm", "rm", self.stage_config("rm", "rm", {
                "model": str(out / "sft"), "data": str(d / "prefs.jsonl"), "out": str(out / "rm"),
                "eval_data": str(heldout or ""),
                "seed": cfg.seed, "threads": group_threads})))
        for i in range(2, cfg.rm_ensemble + 1 if needs_rm else 0):  # more members, same settings
            offline.append((f"rm_{i}", "rm", self.stage_config("rm", "rm", {
                "model": str(out / "sft"), "data": str(_bootstrap(d / "prefs.jsonl", d / f"prefs_boot{i}.jsonl", cfg.seed, i)),
                "out": str(out / f"rm_{i}"), "eval_data": offline[0][2].eval_data, "seed": cfg.seed + 1000 * i,
                "threads": group_threads})))
        if self.cfg.judge == HELDOUT_RM and needs_rm:  # trained exactly as the training RM, on other pairs
            offline.append(("judge_rm", "rm", self.stage_config("rm", "rm", {
                "model": str(out / "sft"), "data": str(d / "prefs_judge.jsonl"), "out": str(out / "judge_rm"),
                "eval_data": offline[0][2].eval_data, "seed": cfg.seed + 1, "threads": group_threads})))
        if needs_dpo:
            offline.append(("dpo", "dpo", self.stage_config("dpo", "dpo", {
                "model": str(out / "sft"), "data": str(d / "prefs.jsonl"), "out": str(out / "dpo"),
                "seed": cfg.seed, "threads": group_threads})))
        self.run_group(offline)

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

    def rl_job(self, name: str, method: str, extra: dict | None = None, prompts: Path | None = None,
               threads: int = 1) -> tuple[str, str, object]:
        """An `rto ppo` job for `method` (a key of RL_METHODS), written to OUT/name."""
        cfg, out, d = self.cfg, self.out, self.out / "data"
        wiring = {"policy": str(out / "sft"), "prompts": str(prompts or d / "rl_prompts.jsonl"), "out": str(out / name),
                  "reward_model": str(out / "rm"),
                  "dpo_model": str(out / "dpo") if (out / "dpo").is_dir() else "",
                  "eval_prompts": str(d / "dev_prompts.jsonl"), "task": cfg.task, "seed": cfg.seed, "threads": threads,
                  "judge": self.judge_spec}
        # The RM ensemble is a setting, not wiring: `extra` may switch it off for one run.
        ensemble = {"reward_model_ensemble": [str(out / f"rm_{i}") for i in range(2, cfg.rm_ensemble + 1)]}
        values = _merge(ensemble, self.rl_settings(method, extra), wiring)
        return name, "ppo", build(STAGES["ppo"].config_class(), values, f"pipeline {name}")

    def evaluate(self, models: dict[str, Path], out_file: Path, with_rm: bool) -> dict:
        import json

        cfg = self.cfg
        eval_cfg = self.stage_config("eval", "eval", {
            "models": [f"{name}={path}" for name, path in models.items()],
            "prompts": str(self.out / "data" / "test_prompts.jsonl"), "out": str(out_file), "task": cfg.task,
            "baseline": "sft", "reward_model": str(self.out / "rm") if with_rm else "", "seed": cfg.seed,
            "judge": self.judge_spec,
            "threads": self.threads_for(1)})
        self._done_marker("eval").unlink(missing_ok=True)  # cheap, and the models may have changed
        self.run_one("eval", "eval", eval_cfg)
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
        dpo_policy = ([dpo_policy_job(self, DPO_POLICY, self.preset[DPO_POLICY_SECTION], rl_threads, cfg.seed)]
                      if "dpo" in cfg.methods and self.preset.get(DPO_POLICY_SECTION) else [])
        self.run_group(rl_jobs + dpo_policy)
        paths = {"sft": out / "sft", "dpo": out / "dpo"} | {m: out / m / "policy" for m in rl_methods}
        models = {m: paths[m] for m in cfg.methods} | {name: out / name for name, _, _ in dpo_policy}
        models |= {f"{m}@last": out / m / "policy_last" for m in rl_methods if last_differs(out / m)}
        self.evaluate(models, out / "eval.json", needs_rm)
        return summarise(self, start, rl_jobs)

def run(cfg: PipelineConfig) -> dict:
    from rto.distributed import refuse_launcher

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


def _marker_text(cfg) -> str:
    """A stage's config plus a fingerprint (size, mtime) of every input file it names: a stage
    whose inputs were rewritten since - say SFT ran again - is not skipped, even when its own
    settings, which only hold paths, are unchanged."""
    values = to_dict(cfg)
    inputs = {}
    for key, value in values.items():
        if key == "out" or not isinstance(value, str) or not value:
            continue
        path = Path(value)
        if path.is_file() or path.is_dir():
            files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
            inputs[key] = [f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                           for p in files]
    return yaml.safe_dump({"config": values, "inputs": inputs}, sort_keys=False)
