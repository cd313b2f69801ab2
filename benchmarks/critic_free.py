#!/usr/bin/env python
"""What a critic costs: per-process memory of trained weights with their Adam states, and the
iteration time, for PPO and RTO (GAE, a critic) against GRPO and RLOO (no critic), each with the
sparse reward and with RTO's dense one.

    python benchmarks/critic_free.py [--config small|large] [--rounds 3] [--out JSON]

Same models, prompts and work as step_throughput.py (a random Llama shape, 64 responses of 24
tokens per rollout, 4 mini-batches, one epoch): every method samples the same number of responses
per rollout (GRPO and RLOO: 16 prompts x 4). Each method runs in its own process, the order
rotating from round to round (this machine's speed drifts); times are the median whole
iteration of each method over rounds (a warm-up iteration per run dropped). Memory is counted,
not sampled: the bytes of the trained modules' parameters and their optimizers' states after an
update (rto.runtime.sharding.resident_bytes), and of the frozen models.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step_throughput import CONFIGS, WORK, build_models, run_child, work_settings  # noqa: E402

# method: (reward, estimator, responses per prompt)
METHODS = {
    "ppo": ("sparse", "gae", 1),
    "rto": ("rto", "gae", 1),
    "grpo": ("sparse", "grpo", 4),
    "rto-grpo": ("rto", "grpo", 4),
    "rloo": ("sparse", "rloo", 4),
    "rto-rloo": ("rto", "rloo", 4),
}


def child(root: Path, method: str, iterations: int) -> dict:
    import torch

    from rto.io.config import build
    from rto.rl.trainer import PPOStageConfig, PPOTrainer
    from rto.runtime.sharding import resident_bytes

    torch.set_num_threads(os.cpu_count() or 1)
    reward, estimator, k = METHODS[method]
    n = WORK["prompts"]
    settings = work_settings(
        root,
        n,
        out=tempfile.mkdtemp(prefix=f"{method}-", dir=root),
        reward=reward,
        estimator=estimator,
        num_generations=k,
        iterations=iterations,
    )
    cfg = build(PPOStageConfig, settings, "benchmark")
    trainer = PPOTrainer(cfg)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        exp = trainer.make_experience(trainer._next_prompts())
        assert int(exp.batch.response_mask.sum()) == n * WORK["response_len"]  # the same work for every method
        trainer.train_on(exp)
        times.append(time.perf_counter() - t0)
    return {
        "times": times[1:],
        "bytes_trained": resident_bytes(trainer.models.trained_modules(), [net.opt for net in trainer.trained]),
        "bytes_frozen": resident_bytes(trainer.models.frozen()),
        "critic": trainer.models.critic is not None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=CONFIGS, default="small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=3, help="per run, the first a warm-up")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "results" / "critic_free.json"))
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "METHOD", "ITERATIONS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], int(args.child[2]))))
        return
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_models(root, CONFIGS[args.config])
        names = list(METHODS)
        for r in range(args.rounds):
            for method in names[r % len(names) :] + names[: r % len(names)]:  # the order rotates
                out = run_child([str(Path(__file__).resolve()), "--child", str(root), method, str(args.iterations)])
                runs[method].append(out)
                print(method, f"round {r}", json.dumps({k: v for k, v in out.items() if k != "times"}), flush=True)
    ppo = runs["ppo"][0]
    rows = {}
    for method, found in runs.items():
        times = [t for run in found for t in run["times"]]
        first = found[0]
        assert all(run["bytes_trained"] == first["bytes_trained"] for run in found)  # counted, not sampled
        rows[method] = {
            "reward": METHODS[method][0],
            "estimator": METHODS[method][1],
            "responses_per_prompt": METHODS[method][2],
            "critic": first["critic"],
            "bytes_trained": first["bytes_trained"],
            "bytes_frozen": first["bytes_frozen"],
            "trained_vs_ppo": first["bytes_trained"] / ppo["bytes_trained"],
            "iteration_s_median": statistics.median(times),
            "iteration_s_min": min(times),
            "iteration_s_max": max(times),
            "iterations_timed": len(times),
        }
    for row in rows.values():
        row["time_vs_ppo"] = row["iteration_s_median"] / rows["ppo"]["iteration_s_median"]
    result = {
        "what": "per-process bytes of trained weights + Adam states and of frozen models, and whole-iteration "
        "time (experience + update), PPO/RTO with a critic against GRPO/RLOO without, equal responses per rollout",
        "config": args.config,
        "arch": CONFIGS[args.config],
        "work": WORK,
        "rounds": args.rounds,
        "threads": os.cpu_count(),
        "methods": rows,
        "command": f"python benchmarks/critic_free.py --config {args.config} --rounds {args.rounds}",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
