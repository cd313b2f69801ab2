#!/usr/bin/env python
"""TRL 1.12's PPOTrainer, as shipped, on the benchmark's models: prints per-iteration times as JSON.

Run by step_throughput.py inside benchmarks/.venv-trl112; it imports nothing from rto.
Work matches ours: 64 prompts per rollout (4 x 16 with gradient accumulation), 4 mini-batches,
one PPO epoch, 24 response tokens with no stop token (all settable, for gpu_step.py).
"""

import argparse
import json
import os
import resource
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,  # noqa: E402
                          TrainerCallback)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402


class Clock(TrainerCallback):
    def __init__(self):
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
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
    root = a.root
    tok = AutoTokenizer.from_pretrained(f"{root}/policy")
    prompts = [json.loads(line)["prompt"] for line in open(f"{root}/prompts.jsonl")]
    dataset = Dataset.from_dict({"input_ids": [tok(x)["input_ids"] for x in prompts]})
    iterations = a.reps + a.warmup
    with tempfile.TemporaryDirectory() as out:
        mini = a.prompts // a.mini_batches
        args = PPOConfig(
            output_dir=out, per_device_train_batch_size=mini, gradient_accumulation_steps=a.mini_batches,
            num_mini_batches=a.mini_batches, num_ppo_epochs=1, local_rollout_forward_batch_size=a.prompts,
            response_length=a.response_len, stop_token=None, total_episodes=a.prompts * iterations,
            learning_rate=a.lr, kl_coef=a.kl_coef, temperature=1.0, num_sample_generations=0, report_to="none",
            save_strategy="no", bf16=a.bf16, gradient_checkpointing=False, use_cpu=not cuda, disable_tqdm=True,
            seed=0, logging_steps=1000,
        )
        clock = Clock()
        trainer = PPOTrainer(
            args=args, processing_class=tok,
            model=AutoModelForCausalLM.from_pretrained(f"{root}/policy"),
            ref_model=AutoModelForCausalLM.from_pretrained(f"{root}/policy"),
            reward_model=AutoModelForSequenceClassification.from_pretrained(f"{root}/rm", num_labels=1),
            value_model=AutoModelForSequenceClassification.from_pretrained(f"{root}/rm", num_labels=1),
            train_dataset=dataset, callbacks=[clock],
        )
        clock.marks = [time.perf_counter()]
        trainer.train()
    times = [b - a_ for a_, b in zip(clock.marks, clock.marks[1:])]
    out = {"times": times[a.warmup:], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()
