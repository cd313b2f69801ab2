#!/usr/bin/env python
"""Kill a PPO/RTO run with SIGKILL at many random points, resume each, compare with an uninterrupted run.

    python benchmarks/kill_resume.py --points 20 [--seed 0] [--out FILE.json]

Each kill point: start `rto ppo --save-every 1`, wait a random time (uniform over the run's
length, so kills land in rollouts, updates, evaluation and saves alike), SIGKILL, then
`--resume auto` until it finishes. Passes when the final policy and critic weights are bitwise
equal to the uninterrupted run's and so is every logged metric except wall-clock times.
Every few points also kill inside a save on purpose (RTO_FAULT_KILL_IN_SAVE).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ITERATIONS = 8


def build_models(root: Path) -> dict:
    import torch

    from rto.io.data import write_jsonl
    from rto.lm.models import RM_STATS_FILE, build_causal_lm, load_score_model, save_model
    from rto.tasks import load_task

    task = load_task("keyed")
    tok = task.tokenizer()
    policy = build_causal_lm(
        tok,
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
        ),
        seed=0,
    )
    save_model(policy, tok, root / "policy")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(policy, tok, root / "dpo")
    rm = load_score_model(root / "policy")
    save_model(rm, tok, root / "rm", extra_files={RM_STATS_FILE: {"mean": 0.0, "std": 1.0}})
    write_jsonl(root / "prompts.jsonl", ({"prompt": p} for p in task.prompts("train", 64, seed=0)))
    write_jsonl(root / "dev.jsonl", ({"prompt": p} for p in task.prompts("dev", 16, seed=0)))
    return {k: str(root / k) for k in ("policy", "dpo", "rm")}


def args_for(d: dict, root: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rto.cli",
        "ppo",
        "--policy",
        d["policy"],
        "--reward-model",
        d["rm"],
        "--dpo-model",
        d["dpo"],
        "--prompts",
        str(root / "prompts.jsonl"),
        "--eval-prompts",
        str(root / "dev.jsonl"),
        "--task",
        "keyed",
        "--eval-every",
        "3",
        "--n-eval",
        "16",
        "--out",
        str(out),
        "--reward",
        "rto",
        "--beta1",
        "0.1",
        "--iterations",
        str(ITERATIONS),
        "--rollout-batch-size",
        "16",
        "--mini-batch-size",
        "8",
        "--max-new-tokens",
        "8",
        "--actor-lr",
        "1e-3",
        "--critic-lr",
        "1e-3",
        "--threads",
        "1",
        "--save-every",
        "1",
        "--keep-last",
        "2",
        "--seed",
        "5",
    ]


def outcome(out: Path) -> tuple:
    from safetensors.torch import load_file

    log = [
        {k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "tokens_per_s"}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    weights = {}
    for part in ("policy", "critic"):
        w = load_file(str(out / part / "model.safetensors"))
        weights.update({f"{part}.{k}": v for k, v in w.items()})
    curve = json.loads((out / "metrics.json").read_text())["curve"]
    return log, weights, curve


def same(a: tuple, b: tuple) -> bool:
    return (
        a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys() and all((a[1][k] == b[1][k]).all() for k in a[1])
    )


def wait_for(path: Path, proc: subprocess.Popen) -> float:
    while not path.exists() and proc.poll() is None:
        time.sleep(0.01)
    return time.time()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    a = p.parse_args()
    env = dict(os.environ, RTO_PROGRESS="0", OMP_NUM_THREADS="1")
    rng = random.Random(a.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        d = build_models(root)
        start = time.time()
        proc = subprocess.Popen(
            args_for(d, root, root / "reference"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        startup_s = wait_for(root / "reference" / "metrics.jsonl", proc) - start
        if proc.wait() != 0:
            sys.exit("the reference run failed")
        train_s = time.time() - start - startup_s
        reference = outcome(root / "reference")
        for i in range(a.points):
            out = root / f"point{i}"
            in_save = i % 5 == 4
            point_env = dict(env, RTO_FAULT_KILL_IN_SAVE=str(rng.randint(1, ITERATIONS - 1))) if in_save else env
            proc = subprocess.Popen(
                args_for(d, root, out), env=point_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            # Uniform over the training part (model loading excluded), a little past its end too.
            delay = rng.uniform(0.0, 1.05) * train_s
            if not in_save:
                wait_for(out / "metrics.jsonl", proc)
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = proc.returncode == -signal.SIGKILL
            checkpoints = (
                sorted(x.name for x in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
            )
            resumed = subprocess.run(
                [*args_for(d, root, out), "--resume", "auto"], env=env, capture_output=True, text=True
            )
            ok = resumed.returncode == 0 and same(reference, outcome(out))
            results.append(
                {
                    "point": i,
                    "killed": killed,
                    "in_save": in_save,
                    "delay_s": None if in_save else delay,
                    "checkpoints_at_kill": checkpoints,
                    "exact": ok,
                }
            )
            print(json.dumps(results[-1]), flush=True)
    summary = {
        "points": len(results),
        "killed": sum(r["killed"] for r in results),
        "killed_in_save": sum(r["in_save"] and r["killed"] for r in results),
        "exact": sum(r["exact"] for r in results),
        "results": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=2))
    sys.exit(0 if summary["exact"] == summary["points"] else 1)


if __name__ == "__main__":
    main()
