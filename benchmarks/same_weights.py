#!/usr/bin/env python
"""Do two commits train the same weights? For refactors that must not change behaviour.

    python benchmarks/same_weights.py REV_A REV_B [--work DIR] [--iterations 4]

Checks out both commits (git worktrees under --work), builds the keyed smoke pipeline's inputs
(SFT, RM, DPO models and prompts) once with REV_A's code, then runs a short `rto ppo` for PPO
(`--reward sparse`) and RTO (`--reward rto`) with each commit's code on those same inputs - one
process, one thread, the preset's default settings, dev evaluation on - and compares the saved
policy and critic files byte for byte (sha256). Exit code 0 when every file is identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(cmd: list[str], code: Path, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(code), "RTO_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        if subprocess.run(cmd, cwd=code, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"failed: {' '.join(cmd)} (log: {log})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev_a")
    ap.add_argument("rev_b")
    ap.add_argument("--work", default="")
    ap.add_argument("--iterations", type=int, default=4)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="same_weights_"))
    codes = {}
    for rev in (args.rev_a, args.rev_b):
        code = work / f"code_{rev}"
        if not code.exists():
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(code), rev],
                check=True,
                capture_output=True,
            )
        codes[rev] = code
    pipe = work / "inputs"
    if not (pipe / "configs" / "rto.done").is_file():
        sh(
            [
                sys.executable,
                "-m",
                "rto.cli",
                "pipeline",
                "--task",
                "keyed",
                "--preset",
                "smoke",
                "--jobs",
                "1",
                "--threads",
                "1",
                "--out",
                str(pipe),
            ],
            codes[args.rev_a],
            work / "inputs.log",
        )
    digests = {}
    for rev, code in codes.items():
        for method in ("ppo", "rto"):
            out = work / f"run_{rev}" / method
            sh(
                [
                    sys.executable,
                    "-m",
                    "rto.cli",
                    "ppo",
                    "--config",
                    str(pipe / "configs" / f"{method}.yaml"),
                    "--out",
                    str(out),
                    "--iterations",
                    str(args.iterations),
                    "--threads",
                    "1",
                    "--eval-every",
                    "2",
                ],
                code,
                work / f"run_{rev}_{method}.log",
            )
            for model in ("policy", "critic"):
                f = out / model / "model.safetensors"
                digests[(rev, method, model)] = hashlib.sha256(f.read_bytes()).hexdigest()
    same = True
    for method in ("ppo", "rto"):
        for model in ("policy", "critic"):
            a, b = digests[(args.rev_a, method, model)], digests[(args.rev_b, method, model)]
            same &= a == b
            print(f"{method:4s} {model:7s} {a[:16]} {b[:16]} {'identical' if a == b else 'DIFFERENT'}")
    print(f"work directory: {work}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
