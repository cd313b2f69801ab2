#!/usr/bin/env python
"""Memory and time of `rto ppo --reward rto` in one process, and in several replicated or sharded (FSDP2).

    python benchmarks/sharded_step.py --out docs/results/sharded_cpu.json            # CPU, ~5 minutes
    python benchmarks/sharded_step.py --out FILE.json --device cuda --processes 8     # one node's GPUs

Layouts: one process (the whole global batch), N processes replicated (--shard none), N
processes sharded (--shard full, frozen models sharded too). Per process: bytes of the trained
weights with their Adam states and of the frozen models (what each process holds of them, read
from its tensors), and peak memory (CPU: resident set; GPU: the allocator's peak). Per
iteration: rollout, scoring + update, whole. Rollout cost of sharding: the same generation
again with the policy left sharded, so each decoding step gathers every layer
("per-token gather"), against ours, gathered once for the whole rollout.

The model is a random Llama shape (benchmarks/gpu_step.py's `build`: EOS outside the vocabulary,
so every response runs to its full length and every process takes the same steps). Threads: one
process gets every core, N processes share them equally. Layouts alternate over `--rounds`;
medians over iterations and rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_step import MODELS, build  # noqa: E402

LAYOUTS = ("one", "replicated", "sharded")


def child(args) -> None:
    import torch

    from rto.io.config import build as build_cfg
    from rto.lm.rollout import Sampling, encode_prompts, generate
    from rto.rl.trainer import PPOStageConfig, PPOTrainer
    from rto.runtime.sharding import resident_bytes

    root = Path(args.root)
    n = args.prompts
    cfg = build_cfg(
        PPOStageConfig,
        dict(
            policy=str(root / "policy"),
            reward_model=str(root / "rm"),
            dpo_model=str(root / "dpo"),
            prompts=str(root / "prompts.jsonl"),
            out=str(root / f"out-{args.child}"),
            reward="rto",
            beta1=0.1,
            iterations=1000,
            rollout_batch_size=n,
            mini_batch_size=n // 2,
            ppo_epochs=1,
            max_new_tokens=args.response_len,
            actor_lr=1e-6,
            critic_lr=1e-6,
            eval_every=0,
            device=args.device,
            threads=args.threads,
            shard="full" if args.child == "sharded" else "none",
        ),
        "benchmark",
    )
    trainer = PPOTrainer(cfg)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = []
    for _ in range(args.warmup + args.reps):
        prompts = trainer._next_prompts()
        sync()
        t0 = time.perf_counter()
        exp = trainer.make_experience(prompts)
        sync()
        t1 = time.perf_counter()
        trainer.train_on(exp)
        sync()
        t2 = time.perf_counter()
        with torch.no_grad(), trainer.models.autocast():  # the rollout again, the policy left sharded
            ids, mask = encode_prompts(trainer.tokenizer, prompts, cfg.max_prompt_len)
            generate(
                trainer.models.policy,
                trainer.tokenizer,
                ids.to(trainer.device),
                mask.to(trainer.device),
                Sampling(cfg.max_new_tokens),
                record_logprobs=True,
            )
        sync()
        t3 = time.perf_counter()
        start = time.perf_counter()
        with torch.no_grad():
            trainer.experience.rollout(prompts)
        sync()
        rows.append(
            {
                "iteration_s": t2 - t0,
                "experience_s": t1 - t0,
                "update_s": t2 - t1,
                "rollout_gathered_s": time.perf_counter() - start,
                "rollout_per_token_gather_s": t3 - t2,
            }
        )
        assert int(exp.batch.response_mask.sum()) == len(prompts) * args.response_len
    opts = [net.opt for net in trainer.trained]
    mine = {
        "bytes_trained": resident_bytes(trainer.models.trained_modules(), opts),
        "bytes_frozen": resident_bytes(trainer.models.frozen()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "times": rows[args.warmup :],
    }
    if args.device == "cuda":
        mine["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    everyone = [mine]
    if trainer.dist.active:
        import torch.distributed as dist

        everyone = [None] * trainer.dist.world
        dist.all_gather_object(everyone, mine)
    if trainer.dist.is_main:
        print(json.dumps({"layout": trainer.layout.describe(), "processes": everyone}))


def run_layout(layout: str, root: Path, args) -> dict:
    procs = 1 if layout == "one" else args.processes
    cores = os.cpu_count() or 1
    threads = max(1, cores // procs)
    common = [
        "--child",
        layout,
        "--root",
        str(root),
        "--prompts",
        str(args.prompts),
        "--response-len",
        str(args.response_len),
        "--reps",
        str(args.reps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--threads",
        str(threads),
        "--out",
        "-",
    ]
    if procs == 1:
        cmd = [sys.executable, __file__, *common]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(procs),
            "--master_port",
            str(29400 + os.getpid() % 500),
            __file__,
            *common,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RTO_PROGRESS": "0"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{layout} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    times = [row for run in runs for row in run["processes"][0]["times"]]
    first = runs[0]["processes"]
    out = {"layout": runs[0]["layout"], "processes": len(first)}
    for key in times[0]:
        out[key] = statistics.median(r[key] for r in times)
    for key in ("bytes_trained", "bytes_frozen", "peak_rss_mb", "peak_gpu_mb"):
        if key in first[0]:
            out[f"{key}_per_process"] = max(p[key] for p in first)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", choices=sorted(MODELS), default="cpu-medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16, help="the global rollout")
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    runs: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.model, args.prompts)
        for r in range(args.rounds):
            for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
                runs[layout].append(run_layout(layout, root, args))
                print(layout, json.dumps(summarise(runs[layout])), flush=True)
    rows = {layout: summarise(found) for layout, found in runs.items()}
    one = rows["one"]
    for row in rows.values():
        row["trained_vs_one"] = row["bytes_trained_per_process"] / one["bytes_trained_per_process"]
        row["frozen_vs_one"] = row["bytes_frozen_per_process"] / one["bytes_frozen_per_process"]
    result = {
        "model": args.model,
        "arch": MODELS[args.model],
        "device": args.device,
        "prompts": args.prompts,
        "response_len": args.response_len,
        "rounds": args.rounds,
        "layouts": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
