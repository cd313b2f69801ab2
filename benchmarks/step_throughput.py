#!/usr/bin/env python
"""Time whole PPO/RTO iterations (rollout + scoring + optimisation): ours against TRL 1.12's PPOTrainer.

    python benchmarks/step_throughput.py [--out FILE.json] [--configs small,large] [--reps 5] [--rounds 2] [--skip-trl]

Same work on both sides: the same random Llama-style models (policy, reference, RM/critic, and
a DPO model for RTO), the same 64 prompts of 9 tokens per rollout, 24 response tokens every time,
one PPO epoch over 4 mini-batches of 16, i.e. 4 optimiser steps per rollout on both sides (TRL:
per-device batch 64, gradient accumulation 1, 4 mini-batches; each child reads the count back
from its AdamW state and refuses to report if it is not 4 per iteration). TRL 1.12 - the last TRL
with PPO - lives in its own virtual environment, created once in benchmarks/.venv-trl112 (TRL 1.12
cannot live beside the TRL the project uses).

The tokenizer's EOS and pad ids both lie outside the model's vocabulary: neither can be sampled,
so no response ends early on our side and none is cut short on TRL's (TRL ends a response at its
first pad). They are never fed to a model either: every prompt has 9 tokens and every response
24, so no batch holds padding (each child checks this; an out-of-vocabulary id fed to an
embedding would stop the run with an index error rather than be computed with silently).

Timed region, the same on both sides: whole iterations of each trainer's own loop, as shipped -
sampling, scoring, rewards and advantages, the PPO update, and the loop's bookkeeping (metrics,
logging, scheduler). Ours: the interval between the starts of consecutive rollouts of
`PPOTrainer.train()`; TRL's: between consecutive `on_step_end` callbacks of `PPOTrainer.train()`.
Each is a steady-state iteration period; a warm-up iteration per child is dropped.

Each side runs in its own process (one at a time, all cores), so peak resident memory is its
own. Rounds alternate the order of the sides (round 0: ours PPO, ours RTO, ours RTO-LoRA, TRL;
round 1 the reverse; ...), so a machine whose speed drifts slows both alike; each side's times
are pooled over the rounds before taking the median.

Also timed: RTO in the LoRA shared-base mode (`--lora-r 16`: policy, critic and DPO model are
adapters on one frozen base, the reference is the base), with its own peak memory.

The floor (`iteration_flops`, which says how it counts): the matrix-multiply arithmetic one
iteration needs, divided by the best fp32 matrix-multiply rate measured inside the very process
of the side it bounds (before and after its timed loop, the best over the rounds).
docs/performance.md's tables are written from the committed JSON by docs/tables.py (its sources:
docs/tables_performance.py, formatting with benchmarks/throughput_doc.py).
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
from throughput_doc import TARGETS, targets, write_doc  # noqa: E402,F401 (the targets live with the page's tables)

TRL_VENV = HERE / ".venv-trl112"
CONFIGS = {
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "large": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1376),
}
WORK = dict(prompts=64, response_len=24, mini_batches=4, ppo_epochs=1, lr=1e-5, kl_coef=0.05)
SYMBOLS = 32
PROMPT_LEN = 9  # 8 symbols + <sep>
# Model ids: <sep>, <unk>, the symbols. Tokenizer ids past the model's vocabulary: <eos>, <pad>.
MODEL_VOCAB = 2 + SYMBOLS
TIMED_REGION = (
    "whole iterations of each trainer's own train() loop (rollout, scoring, rewards/advantages, "
    "PPO update, loop bookkeeping): ours between consecutive rollout starts, TRL between "
    "consecutive on_step_end callbacks; one warm-up iteration per child dropped"
)


# --- shared set-up: models and prompts in a temporary directory --------------------------
def build_models(root: Path, arch: dict) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    symbols = [f"s{i}" for i in range(SYMBOLS)]
    vocab = {t: i for i, t in enumerate(["<sep>", "<unk>", *symbols, "<eos>", "<pad>"])}
    assert vocab["<eos>"] == MODEL_VOCAB and vocab["<pad>"] == MODEL_VOCAB + 1
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<sep>"],
    )
    # The model's vocabulary stops before <eos> and <pad>: a response can neither end early (ours
    # stops at EOS) nor be cut at a sampled pad (TRL's sequence length is "up to the first pad").
    # The config names no pad id (an embedding's padding_idx must lie inside its table); neither
    # side needs one: both read the RM's score from the backbone at positions they compute.
    config = LlamaConfig(
        vocab_size=MODEL_VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=None,
        eos_token_id=vocab["<eos>"],
        bos_token_id=None,
        **arch,
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    for name, model in (("policy", policy), ("dpo", None)):
        if model is None:
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(0.02 * torch.randn_like(p))
            model = policy
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rm = AutoModelForSequenceClassification.from_pretrained(root / "policy", num_labels=1)
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    build_dpo_adapter(root)
    import random

    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as fh:
        for _ in range(WORK["prompts"] * 4):
            fh.write(json.dumps({"prompt": " ".join(rng.sample(symbols, PROMPT_LEN - 1)) + " <sep>"}) + "\n")


def build_dpo_adapter(root: Path) -> None:
    """A LoRA adapter on the policy (random B), standing in for `rto dpo --lora-r` in the shared mode."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rto.lm.lora import lora_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "policy"), lora_config(16, 32, "all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.save_pretrained(root / "dpo_lora")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "dpo_lora" / name).write_text((root / "policy" / name).read_text())


def count_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


# --- the floor ------------------------------------------------------------------------------
def matmul_rate(seconds: float = 2.0) -> float:
    """Best fp32 matrix-multiply rate (FLOP/s) over a few sizes, in this process, now."""
    import torch

    best = 0.0
    for n in (256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def iteration_flops(
    arch: dict, vocab: int, batch: int, prompt_len: int, response_len: int, dense: bool, ppo_epochs: int = 1
) -> dict[str, float]:
    """Matrix-multiply FLOPs of one iteration, pass by pass. Generation processes P + R - 1 tokens
    per sequence (prefill, then every sampled token but the last) with the LM head at R positions;
    each scoring pass (reference, DPO model for RTO, RM, critic) and each trained pass (policy,
    critic) processes all P + R tokens, the LM head only at the R + 1 positions `logits_to_keep`
    computes, the value/RM heads only at the positions read.

    Per token, a forward costs 2 x (the layers' linear weights) + attention's 4 x layers x hidden
    x context; the LM head (2 x hidden x vocab) and a scalar head (2 x hidden) only at the
    positions whose output is computed. Backward = 2 x forward."""
    d, n_layers, f = arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    d_kv = d * arch.get("num_key_value_heads", heads) // heads
    linear = n_layers * (2 * d * d + 2 * d * d_kv + 3 * d * f)  # q, o; k, v; gate, up, down
    P, R = prompt_len, response_len

    def forward(tokens: int, lm_positions: int = 0, head_positions: int = 0) -> float:
        context = tokens * (tokens + 1) // 2  # causal: token i (from 1) attends to i tokens
        return (
            2 * linear * tokens + 4 * n_layers * d * context + 2 * d * vocab * lm_positions + 2 * d * head_positions
        ) * batch

    T = P + R
    passes = {
        # the prefill's P tokens, then R - 1 single-token steps (the last sampled token is never
        # fed back): the same causal context sum as one pass over P + R - 1 tokens.
        "generation": forward(P + R - 1, lm_positions=R),
        "reference": forward(T, lm_positions=R + 1),
        "reward_model": forward(T, head_positions=1),
        "critic": forward(T, head_positions=R),
        "policy_train": 3 * ppo_epochs * forward(T, lm_positions=R + 1),
        "critic_train": 3 * ppo_epochs * forward(T, head_positions=R),
    }
    if dense:
        passes["dpo_model"] = forward(T, lm_positions=R + 1)
    passes["total"] = sum(passes.values())
    return passes


def floor_seconds(flops: float, rate: float) -> float:
    return flops / rate


def optimiser_steps(opt) -> int:
    """Optimiser steps taken, read from AdamW's per-parameter state (every trained parameter
    holds the same count); accelerate's wrapper is looked through."""
    opt = getattr(opt, "optimizer", opt)
    counts = {int(s["step"]) for s in opt.state.values() if "step" in s}
    if len(counts) > 1:
        raise RuntimeError(f"parameters disagree on the optimiser step count: {sorted(counts)}")
    return counts.pop() if counts else 0


# --- the children: one side, timed ------------------------------------------------------
def work_settings(root: Path, n: int, **settings) -> dict:
    """`rto ppo` settings for WORK on the models and prompts under `root` (`settings` on top)."""
    return dict(
        policy=str(root / "policy"),
        reward_model=str(root / "rm"),
        dpo_model=str(root / "dpo"),
        prompts=str(root / "prompts.jsonl"),
        beta1=0.1,
        rollout_batch_size=n,
        mini_batch_size=n // WORK["mini_batches"],
        ppo_epochs=WORK["ppo_epochs"],
        max_new_tokens=WORK["response_len"],
        actor_lr=WORK["lr"],
        critic_lr=WORK["lr"],
        kl_coef=WORK["kl_coef"],
        eval_every=0,
        threads=os.cpu_count() or 1,
        **settings,
    )


def child_ours(root: Path, reward: str, reps: int, warmup: int) -> dict:
    import torch

    from rto.io.config import build
    from rto.rl.trainer import PPOStageConfig, PPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    rates = [matmul_rate(1.0)]
    n = WORK["prompts"]
    lora = reward == "rto-lora"
    iterations = warmup + reps + 1  # marks at the start of each rollout: one more than the periods timed
    settings = work_settings(
        root,
        n,
        lora_r=16 if lora else 0,
        lora_alpha=32,
        out=tempfile.mkdtemp(prefix=f"ours-{reward}-", dir=root),  # fresh each round
        reward="rto" if lora else reward,
        iterations=iterations,
    )
    settings["dpo_model"] = str(root / ("dpo_lora" if lora else "dpo"))
    cfg = build(PPOStageConfig, settings, "benchmark")
    trainer = PPOTrainer(cfg)
    marks: list[float] = []
    make_experience = trainer.make_experience

    def marked(prompts):
        marks.append(time.perf_counter())
        exp = make_experience(prompts)
        batch = exp.batch
        # No padding anywhere: every prompt PROMPT_LEN tokens, every response full length.
        assert batch.prompt_ids.shape[1] == PROMPT_LEN and bool(batch.prompt_mask.all())
        assert int(batch.response_mask.sum()) == n * WORK["response_len"]
        return exp

    trainer.make_experience = marked  # the instance attribute shadows the method inside train()
    trainer.train()
    assert len(marks) == iterations, f"timed {len(marks)} rollouts of {iterations}: the hook missed train()'s loop"
    times = [b - a for a, b in zip(marks, marks[1:])]
    steps = optimiser_steps(trainer.trained[0].opt)
    rates.append(matmul_rate(1.0))
    # For reference only: the narrower region the trainer logs itself (experience + update).
    inner = [h["time/rollout_s"] + h["time/train_s"] for h in trainer.state.history if "time/train_s" in h]
    return {
        "times": times[warmup:],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "matmul_flops": max(rates),
        "optimiser_steps": steps,
        "iterations": iterations,
        "steps_per_iteration": steps / iterations,
        "experience_update_times": inner[warmup:-1],
    }


def run_child(args: list[str], python: str | list[str] = sys.executable) -> dict:
    """`python` may be a launcher command (torchrun's) as a list."""
    proc = subprocess.run([*([python] if isinstance(python, str) else python), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_trl_venv() -> str:
    python = TRL_VENV / "bin" / "python"
    if (TRL_VENV / ".installed").is_file():
        return str(python)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    links = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
    pip = [str(python), "-m", "pip", "install", "-q", *links]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run(
        [*pip, "torch==2.13.0", "trl==1.12.0", "transformers==5.23.0", "accelerate==1.15.0", "datasets==5.2.0"],
        check=True,
    )
    (TRL_VENV / ".installed").touch()
    return str(python)


# --- the parent: rounds, pooling, the row -----------------------------------------------
OURS = ("sparse", "rto", "rto-lora")


def round_order(round_index: int, with_trl: bool) -> list[str]:
    """The sides in the order they run in this round: forwards in even rounds, reversed in odd."""
    sides = [*OURS, *(["trl"] if with_trl else [])]
    return sides if round_index % 2 == 0 else sides[::-1]


def pool(runs: list[dict]) -> dict:
    """One side's children over the rounds: times pooled, the best matmul rate, the peak memory."""
    return {
        "times": [t for r in runs for t in r["times"]],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "matmul_flops": max(r["matmul_flops"] for r in runs),
        "steps_per_iteration": sorted({r["steps_per_iteration"] for r in runs}),
        "experience_update_times": [t for r in runs for t in r.get("experience_update_times", [])],
    }


def summarise(params: int, flops_ppo: float, flops_rto: float, ours: dict[str, dict], trl: dict | None) -> dict:
    """The row for one model: medians, each side's floor at its own measured rate, the ratios.
    `ours[reward]` and `trl` are `pool`ed children."""
    want = WORK["mini_batches"] * WORK["ppo_epochs"]
    sides = {f"ours_{'ppo' if r == 'sparse' else r}": ours[r] for r in OURS}
    if trl is not None:
        sides["trl_ppo"] = trl
    for name, side in sides.items():
        if side["steps_per_iteration"] != [want]:
            raise RuntimeError(f"{name}: {side['steps_per_iteration']} optimiser steps per iteration, expected {want}")
    med = {name: statistics.median(side["times"]) for name, side in sides.items()}
    row = {
        "params": params,
        "timed_region": TIMED_REGION,
        "optimiser_steps_per_iteration": want,
        "ours_ppo_s": med["ours_ppo"],
        "ours_rto_s": med["ours_rto"],
        "floor_flops_ppo": flops_ppo,
        "floor_flops_rto": flops_rto,
        # each side's floor at the rate measured in that side's own processes
        "floor_ppo_s": floor_seconds(flops_ppo, ours["sparse"]["matmul_flops"]),
        "floor_rto_s": floor_seconds(flops_rto, ours["rto"]["matmul_flops"]),
        "matmul_gflops": {name: side["matmul_flops"] / 1e9 for name, side in sides.items()},
        "ours_peak_rss_mb": max(ours[r]["peak_rss_mb"] for r in ("sparse", "rto")),
        "ours_lora_rto_s": med["ours_rto-lora"],
        "ours_lora_peak_rss_mb": ours["rto-lora"]["peak_rss_mb"],
        "iterations_timed": {name: len(side["times"]) for name, side in sides.items()},
    }
    for r in OURS:  # the narrower region, for reference: how much of ours is loop bookkeeping
        inner = ours[r].get("experience_update_times")
        if inner:
            row[f"ours_{'ppo' if r == 'sparse' else r}_experience_update_s"] = statistics.median(inner)
    row["rto_overhead"] = row["ours_rto_s"] / row["ours_ppo_s"]
    row["ours_ppo_vs_floor"] = row["ours_ppo_s"] / row["floor_ppo_s"]
    row["ours_vs_floor"] = row["ours_rto_s"] / row["floor_rto_s"]
    if trl is not None:
        row["trl_ppo_s"] = med["trl_ppo"]
        row["trl_peak_rss_mb"] = trl["peak_rss_mb"]
        row["trl_floor_ppo_s"] = floor_seconds(flops_ppo, trl["matmul_flops"])
        row["trl_ppo_vs_floor"] = row["trl_ppo_s"] / row["trl_floor_ppo_s"]
        row["speedup_vs_trl"] = row["trl_ppo_s"] / row["ours_ppo_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=str(HERE.parent / "docs" / "results" / "step_throughput.json"),
        help="the JSON to write (default: the one docs/performance.md is built from)",
    )
    parser.add_argument("--configs", default="small,large")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="run every side this many times, alternating the order")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument(
        "--write-doc",
        action="store_true",
        help="only rewrite the pages' tables from the committed JSON (python docs/tables.py)",
    )
    parser.add_argument("--child", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--reward", default="sparse", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_doc:
        write_doc()
        return
    if args.child == "ours":
        print(json.dumps(child_ours(Path(args.root), args.reward, args.reps, args.warmup)))
        return

    results = {
        "machine": f"{os.cpu_count()} CPU cores",
        "work": {**WORK, "prompt_len": PROMPT_LEN},
        "reps": args.reps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "timed_region": TIMED_REGION,
        "configs": {},
    }
    trl_python = None if args.skip_trl else ensure_trl_venv()
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            build_models(root, CONFIGS[name])
            params = count_params(root / "policy")
            common = ["--root", str(root), "--reps", str(args.reps), "--warmup", str(args.warmup)]
            runs: dict[str, list[dict]] = {side: [] for side in round_order(0, trl_python is not None)}
            orders = []
            for i in range(args.rounds):
                order = round_order(i, trl_python is not None)
                orders.append(order)
                for side in order:
                    if side == "trl":
                        got = run_child(
                            [
                                str(HERE / "trl_ppo_child.py"),
                                *common,
                                "--lr",
                                str(WORK["lr"]),
                                "--kl-coef",
                                str(WORK["kl_coef"]),
                                "--prompts",
                                str(WORK["prompts"]),
                                "--response-len",
                                str(WORK["response_len"]),
                                "--mini-batches",
                                str(WORK["mini_batches"]),
                            ],
                            python=trl_python,
                        )
                    else:
                        got = run_child([__file__, "--child", "ours", "--reward", side, *common, "--out", "-"])
                    runs[side].append(got)
            flops = {
                dense: iteration_flops(
                    CONFIGS[name],
                    MODEL_VOCAB,
                    WORK["prompts"],
                    PROMPT_LEN,
                    WORK["response_len"],
                    dense,
                    WORK["ppo_epochs"],
                )
                for dense in (False, True)
            }
            row = summarise(
                params,
                flops[False]["total"],
                flops[True]["total"],
                {r: pool(runs[r]) for r in OURS},
                pool(runs["trl"]) if trl_python else None,
            )
            row["floor_passes_rto"] = flops[True]
            row["round_orders"] = orders
            row["times"] = {side: [t for r in got for t in r["times"]] for side, got in runs.items()}
            results["configs"][name] = row
            print(
                name,
                json.dumps(
                    {
                        k: round(v, 4) if isinstance(v, float) else v
                        for k, v in row.items()
                        if k not in ("times", "floor_passes_rto", "timed_region")
                    }
                ),
                flush=True,
            )
    results["targets"] = targets(results["configs"])
    print("targets", json.dumps(results["targets"]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if Path(args.out).resolve() == (HERE.parent / "docs" / "results" / "step_throughput.json").resolve():
        write_doc()  # the page is rebuilt from the JSON it cites


if __name__ == "__main__":
    main()
