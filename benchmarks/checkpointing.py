#!/usr/bin/env python
"""What `rto ppo --gradient-checkpointing` saves and costs in the update: memory held for the
backward pass and time per update, with and without it, on the same rollouts.

    python benchmarks/checkpointing.py --out docs/results/checkpointing_cpu.json       # CPU, ~3 minutes
    python benchmarks/checkpointing.py --out FILE.json --device cuda --model qwen2.5-1.5b --response-len 512

Memory: the peak over the update of the bytes autograd holds for backward (activations and
other saved tensors, each counted while it is alive; the models' own weights, which autograd
also references, left out) - exact and the same on any device; on a GPU also the allocator's
peak during the update. Time: the update (scoring excluded), both settings alternating over
--rounds on the same rollout (after --warmup untimed rounds), medians. The model is a random
Llama shape (benchmarks/gpu_step.py's `build`: every response runs to its full length).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_step import MODELS, build  # noqa: E402


class HeldBytes:
    """Bytes autograd holds for backward right now, and the peak, through saved-tensor hooks."""

    def __init__(self, skip_storages: set[int]):
        self.now = self.peak = 0
        self.skip = skip_storages

    def pack(self, tensor):
        return _Held(self, tensor)

    @staticmethod
    def unpack(held):
        return held.tensor


class _Held:
    def __init__(self, meter: HeldBytes, tensor):
        self.tensor, self.meter = tensor, meter
        shared = tensor.untyped_storage().data_ptr() in meter.skip
        self.bytes = 0 if shared else tensor.numel() * tensor.element_size()
        meter.now += self.bytes
        meter.peak = max(meter.peak, meter.now)

    def __del__(self):
        self.meter.now -= self.bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", choices=sorted(MODELS), default="cpu-medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed first rounds")
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    args = parser.parse_args()

    import torch

    from rto.io.config import build as build_cfg
    from rto.rl.trainer import PPOStageConfig, PPOTrainer

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.model, args.prompts)
        trainers = {}
        for name, on in (("plain", False), ("checkpointed", True)):
            cfg = build_cfg(
                PPOStageConfig,
                dict(
                    policy=str(root / "policy"),
                    reward_model=str(root / "rm"),
                    dpo_model=str(root / "dpo"),
                    prompts=str(root / "prompts.jsonl"),
                    out=str(root / f"out-{name}"),
                    reward="rto",
                    beta1=0.1,
                    rollout_batch_size=args.prompts,
                    mini_batch_size=args.prompts,
                    micro_batch_size=args.micro_batch,
                    max_new_tokens=args.response_len,
                    actor_lr=1e-6,
                    critic_lr=1e-6,
                    eval_every=0,
                    device=args.device,
                    threads=args.threads,
                    gradient_checkpointing=on,
                ),
                "benchmark",
            )
            trainers[name] = PPOTrainer(cfg)
        plain = trainers["plain"]
        torch.manual_seed(0)
        exp = plain.make_experience(plain._next_prompts())
        assert int(exp.batch.response_mask.sum()) == args.prompts * args.response_len
        rows: dict[str, list[dict]] = {name: [] for name in trainers}
        for r in range(args.warmup + args.rounds):
            for name in list(trainers) if r % 2 == 0 else list(trainers)[::-1]:
                trainer = trainers[name]
                weights = {
                    p.untyped_storage().data_ptr()
                    for m in (*trainer.models.trained_modules(), *trainer.models.frozen())
                    for p in m.parameters()
                }
                meter = HeldBytes(weights)
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync()
                start = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                    trainer.train_on(exp)
                sync()
                row = {"update_s": time.perf_counter() - start, "held_for_backward_mb": meter.peak / 2**20}
                if args.device == "cuda":
                    row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
                if r >= args.warmup:
                    rows[name].append(row)
                print(name, "warm-up" if r < args.warmup else "", json.dumps(row), flush=True)
    out = {
        name: {key: statistics.median(row[key] for row in found) for key in found[0]} for name, found in rows.items()
    }
    result = {
        "model": args.model,
        "arch": MODELS[args.model],
        "device": args.device,
        "prompts": args.prompts,
        "micro_batch": args.micro_batch,
        "response_len": args.response_len,
        "rounds": args.rounds,
        "settings": out,
        "held_ratio": out["checkpointed"]["held_for_backward_mb"] / out["plain"]["held_for_backward_mb"],
        "time_ratio": out["checkpointed"]["update_s"] / out["plain"]["update_s"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
