#!/usr/bin/env python
"""TRL 1.12's PPOTrainer, as shipped, on the benchmark's models: prints per-iteration times as JSON.

Run by step_throughput.py (and gpu_step.py) inside benchmarks/.venv-trl112; it imports nothing
from rto (from step_throughput only its stdlib-and-torch helpers). Work matches ours: 64 prompts
per rollout, one PPO epoch over 4 mini-batches of 16, one optimiser step per mini-batch (TRL's
rollout is per-device batch x gradient accumulation, its mini-batch that / num_mini_batches: so
per-device batch 64, accumulation 1, 4 mini-batches), 24 response tokens with no stop token (all
settable, for gpu_step.py). The optimiser step count is read back from AdamW's state and the
rollout count from TRL's log history; the child fails if either differs from the plan.

Timed region: whole iterations - the interval between consecutive `on_step_end` callbacks, i.e.
TRL's entire loop body (rollout, scoring, update, metrics, `gc.collect`) - the same region as
our side's. On CPU the child also measures the fp32 matrix-multiply rate, in this process,
before and after its run: step_throughput.py computes TRL's floor with it.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_throughput import matmul_rate, optimiser_steps  # noqa: E402


class Clock(TrainerCallback):
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--response-len", type=int, default=24)
    p.add_argument("--mini-batches", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    cuda = a.device == "cuda"
    torch.set_num_threads(os.cpu_count() or 1)
    rates = [] if cuda else [matmul_rate(1.0)]
    root = a.root
    tok = AutoTokenizer.from_pretrained(f"{root}/policy")
    prompts = [json.loads(line)["prompt"] for line in open(f"{root}/prompts.jsonl")]
    dataset = Dataset.from_dict({"input_ids": [tok(x)["input_ids"] for x in prompts]})
    iterations = a.reps + a.warmup
    with tempfile.TemporaryDirectory() as out:
        # Rollout = per-device batch x accumulation = a.prompts; each of the a.mini_batches
        # mini-batches is one micro-batch and one optimiser step, as on our side.
        args = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=a.prompts,
            gradient_accumulation_steps=1,
            num_mini_batches=a.mini_batches,
            num_ppo_epochs=1,
            local_rollout_forward_batch_size=a.prompts,
            response_length=a.response_len,
            stop_token=None,
            total_episodes=a.prompts * iterations,
            learning_rate=a.lr,
            kl_coef=a.kl_coef,
            temperature=1.0,
            num_sample_generations=0,
            report_to="none",
            save_strategy="no",
            bf16=a.bf16,
            gradient_checkpointing=False,
            use_cpu=not cuda,
            disable_tqdm=True,
            seed=0,
            logging_steps=1000,
        )
        clock = Clock(cuda)
        trainer = PPOTrainer(
            args=args,
            processing_class=tok,
            model=AutoModelForCausalLM.from_pretrained(f"{root}/policy"),
            ref_model=AutoModelForCausalLM.from_pretrained(f"{root}/policy"),
            reward_model=AutoModelForSequenceClassification.from_pretrained(f"{root}/rm", num_labels=1),
            value_model=AutoModelForSequenceClassification.from_pretrained(f"{root}/rm", num_labels=1),
            train_dataset=dataset,
            callbacks=[clock],
        )
        assert args.local_batch_size == a.prompts and args.local_mini_batch_size == a.prompts // a.mini_batches, (
            args.local_batch_size,
            args.local_mini_batch_size,
        )
        clock.marks = [time.perf_counter()]
        trainer.train()
        steps = optimiser_steps(trainer.optimizer)
        logged = [h for h in trainer.state.log_history if "episode" in h]
    # From TRL's own records: one logged update per rollout of a.prompts episodes, no EOS
    # sampled, and mini_batches optimiser steps per rollout.
    assert len(logged) == iterations and logged[-1]["episode"] == a.prompts * iterations, logged[-1:]
    assert all(h["val/num_eos_tokens"] == 0 for h in logged)
    assert steps == a.mini_batches * iterations, f"TRL took {steps} optimiser steps in {iterations} iterations"
    times = [b - a_ for a_, b in zip(clock.marks, clock.marks[1:])]
    assert len(times) == iterations
    out = {
        "times": times[a.warmup :],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimiser_steps": steps,
        "iterations": iterations,
        "steps_per_iteration": steps / iterations,
    }
    if not cuda:
        rates.append(matmul_rate(1.0))
        out["matmul_flops"] = max(rates)
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()
