#!/usr/bin/env python
"""Time one PPO/RTO iteration (rollout + scoring + optimisation): ours against TRL 1.12's PPOTrainer.

    python benchmarks/step_throughput.py --out FILE.json [--configs small,large] [--reps 5] [--skip-trl]

Same work on both sides: the same random Llama-style models (policy, reference, RM/critic, and
a DPO model for RTO), the same 64 prompts per rollout, 24 response tokens every time (the EOS id
lies outside the model's vocabulary, so no response ends early), one PPO epoch over 4
mini-batches. Each side runs in its own process (one at a time, all cores), so peak resident
memory is its own. TRL 1.12 - the last TRL with PPO - lives in its own virtual environment,
created once in benchmarks/.venv-trl112 (TRL 1.12 cannot live beside the TRL the project uses).

Also timed: RTO in the LoRA shared-base mode (`--lora-r 16`: policy, critic and DPO model are
adapters on one frozen base, the reference is the base), with its own peak memory.

The floor: floating-point operations of the iteration (2 x params x tokens per forward-only
pass - generation, reference, DPO model, RM, critic - and 6 x per trained forward+backward,
policy and critic) divided by the fp32 matrix-multiply rate measured here.
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
TRL_VENV = HERE / ".venv-trl112"
CONFIGS = {
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "large": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1376),
}
WORK = dict(prompts=64, response_len=24, mini_batches=4, ppo_epochs=1, lr=1e-5, kl_coef=0.05)


# --- shared set-up: models and prompts in a temporary directory --------------------------
def build_models(root: Path, arch: dict) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    symbols = [f"s{i}" for i in range(32)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<sep>", "<unk>", *symbols, "<eos>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=["<sep>"])
    # The model's vocabulary stops before <eos>: it can never end a response early.
    config = LlamaConfig(vocab_size=len(vocab) - 1, max_position_embeddings=128, tie_word_embeddings=True,
                         pad_token_id=0, eos_token_id=vocab["<eos>"], bos_token_id=None, **arch)
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
    rm.config.pad_token_id = 0
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    build_dpo_adapter(root)
    import random

    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as fh:
        for _ in range(WORK["prompts"] * 4):
            fh.write(json.dumps({"prompt": " ".join(rng.sample(symbols, 8)) + " <sep>"}) + "\n")


def build_dpo_adapter(root: Path) -> None:
    """A LoRA adapter on the policy (random B), standing in for `rto dpo --lora-r` in the shared mode."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rto.lora import lora_config

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


def matmul_rate(seconds: float = 2.0) -> float:
    """Best fp32 matrix-multiply rate (FLOP/s) over a few sizes, on this machine, now."""
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


def floor_seconds(params: int, dense: bool, rate: float) -> float:
    """The iteration's necessary arithmetic: generation (one forward over every token, the KV
    cache never recomputing the prompt), one forward each for the reference, RM and critic (and
    the DPO model for RTO) - the sampled tokens' log-probs come out of generation itself, as
    TRL's do - and forward + backward of policy and critic per PPO epoch."""
    tokens = WORK["prompts"] * (9 + WORK["response_len"])
    forward_only = 1 + 3 + (1 if dense else 0)
    trained = 2 * WORK["ppo_epochs"]
    return (2 * params * tokens * forward_only + 6 * params * tokens * trained) / rate


# --- the children: one side, timed ------------------------------------------------------
def child_ours(root: Path, reward: str, reps: int, warmup: int) -> dict:
    import torch

    from rto.config import build
    from rto.stages.ppo import PPOStageConfig, PPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    n = WORK["prompts"]
    lora = reward == "rto-lora"
    cfg = build(PPOStageConfig, dict(
        policy=str(root / "policy"), reward_model=str(root / "rm"), dpo_model=str(root / ("dpo_lora" if lora else "dpo")),
        lora_r=16 if lora else 0, lora_alpha=32,
        prompts=str(root / "prompts.jsonl"), out=str(root / f"ours-{reward}"), reward="rto" if lora else reward, beta1=0.1,
        iterations=reps + warmup, rollout_batch_size=n, mini_batch_size=n // WORK["mini_batches"],
        ppo_epochs=WORK["ppo_epochs"], max_new_tokens=WORK["response_len"], actor_lr=WORK["lr"],
        critic_lr=WORK["lr"], kl_coef=WORK["kl_coef"], eval_every=0, threads=os.cpu_count() or 1), "benchmark")
    trainer = PPOTrainer(cfg)
    times = []
    for i in range(reps + warmup):
        start = time.perf_counter()
        exp = trainer.make_experience(trainer._next_prompts())
        trainer.train_on(exp)
        times.append(time.perf_counter() - start)
        assert int(exp["batch"].response_mask.sum()) == n * WORK["response_len"]
    return {"times": times[warmup:], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(args: list[str], python: str = sys.executable) -> dict:
    proc = subprocess.run([python, *args], capture_output=True, text=True)
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
    subprocess.run([*pip, "torch==2.13.0", "trl==1.12.0", "transformers==5.23.0", "accelerate==1.15.0",
                    "datasets==5.2.0"], check=True)
    (TRL_VENV / ".installed").touch()
    return str(python)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", default="small,large")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="alternate ours and TRL this many times")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--child", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--reward", default="sparse", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "ours":
        print(json.dumps(child_ours(Path(args.root), args.reward, args.reps, args.warmup)))
        return

    results = {"machine": f"{os.cpu_count()} CPU cores", "work": WORK, "reps": args.reps, "rounds": args.rounds,
               "configs": {}}
    trl_python = None if args.skip_trl else ensure_trl_venv()
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            build_models(root, CONFIGS[name])
            params = count_params(root / "policy")
            common = ["--root", str(root), "--reps", str(args.reps), "--warmup", str(args.warmup)]
            # Rounds alternate the sides, so a machine whose speed drifts (a shared VM) slows both
            # alike; each side's times are pooled over the rounds before taking the median.
            ours = {r: {"times": [], "peak_rss_mb": 0.0} for r in ("sparse", "rto", "rto-lora")}
            trl = {"times": [], "peak_rss_mb": 0.0} if trl_python else None
            rate = 0.0
            for _ in range(args.rounds):
                rate = max(rate, matmul_rate())
                for r in ours:
                    got = run_child([__file__, "--child", "ours", "--reward", r, *common, "--out", "-"])
                    ours[r]["times"] += got["times"]
                    ours[r]["peak_rss_mb"] = max(ours[r]["peak_rss_mb"], got["peak_rss_mb"])
                if trl is not None:
                    got = run_child([str(HERE / "trl_ppo_child.py"), *common, "--lr", str(WORK["lr"]),
                                     "--kl-coef", str(WORK["kl_coef"])], python=trl_python)
                    trl["times"] += got["times"]
                    trl["peak_rss_mb"] = max(trl["peak_rss_mb"], got["peak_rss_mb"])
            row = {"params": params,
                   "ours_ppo_s": statistics.median(ours["sparse"]["times"]),
                   "ours_rto_s": statistics.median(ours["rto"]["times"]),
                   "floor_ppo_s": floor_seconds(params, False, rate),
                   "floor_rto_s": floor_seconds(params, True, rate),
                   "matmul_gflops": rate / 1e9,
                   "ours_peak_rss_mb": max(ours[r]["peak_rss_mb"] for r in ("sparse", "rto")),
                   "ours_lora_rto_s": statistics.median(ours["rto-lora"]["times"]),
                   "ours_lora_peak_rss_mb": ours["rto-lora"]["peak_rss_mb"]}
            row["rto_overhead"] = row["ours_rto_s"] / row["ours_ppo_s"]
            row["ours_vs_floor"] = row["ours_rto_s"] / row["floor_rto_s"]
            if trl is not None:
                row["trl_ppo_s"] = statistics.median(trl["times"])
                row["trl_peak_rss_mb"] = trl["peak_rss_mb"]
                row["speedup_vs_trl"] = row["trl_ppo_s"] / row["ours_ppo_s"]
            results["configs"][name] = row
            print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
