"""Running a pipeline's stages: each in this process or as child processes side by side (one
thread count each, progress bars from their progress files), a config file per stage
(OUT/configs/NAME.yaml) and, with resume, a marker of each finished stage's settings and inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rto import STAGES
from rto.io.config import to_dict
from rto.io.errors import UserError
from rto.runtime import progress


class StageRunner:
    def __init__(self, out: Path, resume: bool, jobs: int):
        self.out, self.resume, self.jobs = Path(out), resume, jobs
        self.timings: dict[str, float] = {}  # seconds per stage run, by name

    def write_config(self, name: str, cfg) -> Path:
        path = self.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return path

    def done_marker(self, name: str) -> Path:
        return self.out / "configs" / f"{name}.done"

    def already_done(self, name: str, cfg) -> bool:
        """With `resume`: the stage finished before with exactly this config and these inputs."""
        marker = self.done_marker(name)
        if self.resume and marker.is_file() and _same_run(marker.read_text(), _marker_text(cfg), cfg):
            print(f"[rto] {name}: finished before with the same settings, skipped", file=sys.stderr, flush=True)
            return True
        marker.unlink(missing_ok=True)
        return False

    def mark_done(self, name: str, cfg) -> None:
        self.done_marker(name).write_text(_marker_text(cfg))

    def run_one(self, name: str, stage: str, cfg) -> None:
        """In this process, with the stage's own progress bar."""
        if self.already_done(name, cfg):
            return
        self.write_config(name, cfg)
        _, run = STAGES[stage].load()
        print(f"[rto] {name}: {STAGES[stage].summary}", file=sys.stderr, flush=True)
        t = time.time()
        run(cfg)
        self.timings[name] = time.time() - t
        self.mark_done(name, cfg)

    def run_group(self, jobs: list[tuple[str, str, object]]) -> None:
        """Independent stages: in parallel processes when jobs > 1, else one after another."""
        jobs = [job for job in jobs if not self.already_done(job[0], job[2])]
        if self.jobs <= 1 or len(jobs) <= 1:
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
            while pending and len(running) < self.jobs:
                name, stage, cfg = pending.pop(0)
                cfg_path = self.write_config(name, cfg)
                prog = logs / f"{name}.progress.json"
                prog.parent.mkdir(parents=True, exist_ok=True)
                prog.unlink(missing_ok=True)
                env = dict(
                    os.environ,
                    RTO_PROGRESS="0",
                    **{progress.ENV: str(prog)},
                    OMP_NUM_THREADS=str(getattr(cfg, "threads", 1) or 1),
                )
                (logs / f"{name}.log").parent.mkdir(parents=True, exist_ok=True)
                log = open(logs / f"{name}.log", "w")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "rto.cli", stage, "--config", str(cfg_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                bar = tqdm(
                    total=1,
                    desc=f"{name:>16}",
                    position=slot % self.jobs,
                    leave=True,
                    dynamic_ncols=True,
                    disable=not progress.bars_enabled(),
                )
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
                        print(
                            f"[rto] pipeline: {name} {'done' if proc.returncode == 0 else 'FAILED'} in "
                            f"{self.timings[name]:.0f} s",
                            file=sys.stderr,
                            flush=True,
                        )
                    del running[name]
                    if proc.returncode != 0:
                        failed.append(name)
                        pending.clear()
                    else:
                        self.mark_done(name, cfg)
        if failed:
            name = failed[0]
            tail = (self.out / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise UserError(
                f"pipeline: stage {name} failed ({tail[0] if tail else 'no output'}); "
                f"full log: {self.out / 'logs' / (name + '.log')}"
            )


def _same_run(before: str, now: str, cfg) -> bool:
    """The marker written then and the one of now describe the same run: equal, or equal but for
    settings a later version added, at their defaults (the run did what they do by default)."""
    if before == now:
        return True
    try:
        old, new = yaml.safe_load(before), yaml.safe_load(now)
    except yaml.YAMLError:
        return False
    if not isinstance(old, dict) or old.get("inputs") != new["inputs"] or not isinstance(old.get("config"), dict):
        return False
    try:
        defaults = to_dict(type(cfg)())
    except TypeError:  # a config without defaults for everything: only an equal marker will do
        return False
    added = set(new["config"]) - set(old["config"])
    return (
        set(old["config"]) <= set(new["config"])
        and all(old["config"][k] == new["config"][k] for k in old["config"])
        and all(new["config"][k] == defaults[k] for k in added)
    )


def _marker_text(cfg) -> str:
    """A stage's config plus a fingerprint (size, mtime) of every input file it names - a path, or
    a list of paths or NAME=PATH entries (`rto eval --models`): a stage whose inputs were rewritten
    since - say SFT ran again - is not skipped, even when its own settings, which only hold paths,
    are unchanged."""
    values = to_dict(cfg)
    inputs = {}
    for key, value in values.items():
        if key == "out":
            continue
        named = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for i, item in enumerate(v for v in named if isinstance(v, str) and v):
            path = Path(item.split("=", 1)[1] if "=" in item and not Path(item).exists() else item)
            if path.is_file() or path.is_dir():
                files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
                inputs[key if isinstance(value, str) else f"{key}[{i}]"] = [
                    f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                    for p in files
                ]
    return yaml.safe_dump({"config": values, "inputs": inputs}, sort_keys=False)
