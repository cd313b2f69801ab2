#!/usr/bin/env python
"""Where one PPO/RTO iteration spends its time, phase by phase (the profile in docs/performance.md).

    python benchmarks/profile_step.py [--config small|large] [--reward rto|sparse] [--threads N] [--packing]
                                      [--out JSON]

Same models and work as step_throughput.py. Times, per iteration (median over --reps after a
warm-up): generation, the scoring passes (reference and DPO log-probs, RM score, critic values),
the rest of make_experience (rewards, advantages), and the PPO update, split into forward,
backward and optimiser.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import step_throughput as st  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(st.CONFIGS), default="small")
    p.add_argument("--reward", default="rto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--out", help="also write the medians as JSON (docs/results/profile_CONFIG.json: the page's table)")
    a = p.parse_args()
    import warnings

    import torch

    # The optimizer's step is wrapped for timing, which the LR scheduler notices and warns about.
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step()` has been overridden")

    import rto.lm.rollout as rollout
    import rto.rl.experience as experience_module
    import rto.rl.trainer as ppo_module
    from rto.io.config import build

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        root = Path(tmp)
        st.build_models(root, st.CONFIGS[a.config])
        n = st.WORK["prompts"]
        cfg = build(
            ppo_module.PPOStageConfig,
            dict(
                policy=str(root / "policy"),
                reward_model=str(root / "rm"),
                dpo_model=str(root / "dpo"),
                prompts=str(root / "prompts.jsonl"),
                out=str(root / "out"),
                reward=a.reward,
                beta1=0.1,
                iterations=a.reps + 1,
                rollout_batch_size=n,
                mini_batch_size=n // st.WORK["mini_batches"],
                ppo_epochs=st.WORK["ppo_epochs"],
                max_new_tokens=st.WORK["response_len"],
                eval_every=0,
                threads=a.threads,
                packing=a.packing,
            ),
            "profile",
        )
        trainer = ppo_module.PPOTrainer(cfg)
    spent: dict[str, float] = defaultdict(float)

    def timed(fn, name):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - t
            return out

        return wrapper

    # Scoring passes and generation are module functions, called under the names the experience
    # maker and the trainer imported (rto.rl.experience's, rto.rl.trainer's); the update is timed
    # around its calls.
    for name in ("generate", "response_logits", "token_values", "sequence_scores"):
        for module in (experience_module, ppo_module):
            if hasattr(module, name):
                setattr(module, name, timed(getattr(rollout, name), name))
    torch.Tensor.backward = timed(torch.Tensor.backward, "train: backward")
    for net in trainer.trained:
        net.opt.step = timed(net.opt.step, "train: optimizer")
    rows = []
    for i in range(a.reps + 1):
        spent.clear()
        t0 = time.perf_counter()
        exp = trainer.make_experience(trainer._next_prompts())
        t1 = time.perf_counter()
        scoring = dict(spent)
        spent.clear()
        trainer.train_on(exp)
        t2 = time.perf_counter()
        train = dict(spent)
        row = {
            "generate": scoring.get("generate", 0.0),
            "scoring: log-prob passes (ref, DPO)": scoring.get("response_logits", 0.0),
            "scoring: RM + critic passes": scoring.get("sequence_scores", 0.0) + scoring.get("token_values", 0.0),
        }
        row["rewards, advantages, rest"] = (t1 - t0) - sum(row.values())
        fwd = train.get("response_logits", 0.0) + train.get("token_values", 0.0)
        row["train: forward"] = fwd
        row["train: backward"] = train.get("train: backward", 0.0)
        row["train: optimizer"] = train.get("train: optimizer", 0.0)
        row["train: rest"] = (t2 - t1) - fwd - row["train: backward"] - row["train: optimizer"]
        row["total"] = t2 - t0
        if i:
            rows.append(row)
    print(
        f"{a.config} model, --reward {a.reward}, threads {torch.get_num_threads()}, packing {a.packing}: "
        f"median of {a.reps} iterations"
    )
    total = statistics.median(r["total"] for r in rows)
    medians = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    for key, v in medians.items():
        print(f"  {key:<38} {v:8.3f} s  {100 * v / total:5.1f}%")
    if a.out:
        import json

        Path(a.out).write_text(
            json.dumps(
                {
                    "config": a.config,
                    "reward": a.reward,
                    "threads": torch.get_num_threads(),
                    "packing": a.packing,
                    "reps": a.reps,
                    "median_s": medians,
                    "iterations": rows,
                },
                indent=2,
            )
        )
        from throughput_doc import write_doc

        results = HERE.parent / "docs" / "results"
        found = {c: results / f"profile_{c}.json" for c in st.CONFIGS}
        if Path(a.out).resolve() in found.values() and all(f.is_file() for f in found.values()):  # the page's table
            write_doc()


if __name__ == "__main__":
    main()
