#!/usr/bin/env python
"""One PPO/RTO iteration on a real architecture: ours (PPO, RTO, RTO with LoRA shared base) vs TRL 1.12.

    python benchmarks/gpu_step.py --out FILE.json                 # CUDA: Qwen2-0.5B shape, bf16
    python benchmarks/gpu_step.py --out FILE.json --model qwen2.5-1.5b --processes 8   # sharded (FSDP2) over 8 GPUs
    python benchmarks/gpu_step.py --out FILE.json --model tiny    # anywhere (the test suite runs this)

(The vLLM rollout backend on a GPU, PASS/FAIL per point: benchmarks/gpu_vllm_check.py.)

With `--processes N` > 1 (default on CUDA: every GPU present) ours run sharded over N processes
(torchrun; `--shard full`, frozen models sharded too, bf16 compute on fp32 shards) on the same
global batch; TRL's PPO runs in one process (its PPOTrainer has no sharded path of its own here).
MFU = the iteration's matrix-multiply FLOPs (step_throughput.iteration_flops) / (time x the
GPUs' dense bf16 peak x N), where the peak is known (H100/H200: 989 TFLOP/s, A100: 312).

Nothing is downloaded: the model has Qwen2-0.5B's configuration (24 layers, hidden 896, GQA 14/2
heads, bias on q/k/v, SwiGLU 4864, vocabulary 151,936, tied embeddings) with random weights,
built as transformers' Llama class - the same computation as Qwen2's - because with model type
qwen2 transformers 5 imposes Qwen2's byte-level tokenizer on the word-level one used here.
Responses have a fixed length (the EOS id lies outside the model's vocabulary), so every side
does the same work: `--prompts` prompts of 16 tokens, `--response-len` tokens each, 4
mini-batches, one PPO epoch. Reports, per side, the median iteration time after a warm-up,
response tokens per second, and peak memory (GPU: the CUDA allocator's peak; CPU: peak resident
set). Each side runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step_throughput import build_dpo_adapter, ensure_trl_venv, iteration_flops, run_child  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}

MODELS = {
    # Qwen2-0.5B's shape (config.json of Qwen/Qwen2-0.5B), random weights.
    "qwen2-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        attention_bias=True,
    ),
    # Qwen2.5-1.5B's and -3B's shapes (their config.json), random weights: sizes that need sharding
    # for full fine-tuning of policy + critic with frozen reference, DPO model and RM.
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        attention_bias=True,
    ),
    "qwen2.5-3b": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        attention_bias=True,
    ),
    # A CPU-sized model for benchmarks/sharded_step.py (3.7 M parameters).
    "cpu-medium": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=2048,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}
PROMPT_LEN = 16


def build(root: Path, model: str, n_prompts: int) -> None:
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    arch = dict(MODELS[model])
    vocab_size = arch.pop("vocab_size")
    words = [f"w{i}" for i in range(vocab_size - 3)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", *words, "<eos>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    # The model's vocabulary stops before <eos>: no response ends early, every side does the same work.
    config = LlamaConfig(
        vocab_size=len(vocab) - 1, pad_token_id=0, eos_token_id=vocab["<eos>"], bos_token_id=None, **arch
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(root / "policy")
    _save_tokenizer(tok, root / "policy")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.save_pretrained(root / "dpo")
    _save_tokenizer(tok, root / "dpo")
    del policy
    rm = AutoModelForSequenceClassification.from_pretrained(root / "policy", num_labels=1)
    rm.config.pad_token_id = 0
    rm.save_pretrained(root / "rm")
    _save_tokenizer(tok, root / "rm")
    del rm
    build_dpo_adapter(root)
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as fh:
        for _ in range(n_prompts * 4):
            fh.write(json.dumps({"prompt": " ".join(rng.sample(words, PROMPT_LEN))}) + "\n")


def _save_tokenizer(tok, path: Path) -> None:
    tok.save_pretrained(path)


def child_ours(root: Path, mode: str, args) -> dict:
    import torch

    from rto.io.config import build as build_cfg
    from rto.rl.trainer import PPOStageConfig, PPOTrainer

    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    n = args.prompts
    reward = "sparse" if mode == "ppo" else "rto"
    lora = mode == "rto-lora"
    cfg = build_cfg(
        PPOStageConfig,
        dict(
            policy=str(root / "policy"),
            reward_model=str(root / "rm"),
            dpo_model=str(root / ("dpo_lora" if lora else "dpo")),
            prompts=str(root / "prompts.jsonl"),
            out=str(root / f"ours-{mode}"),
            reward=reward,
            beta1=0.1,
            iterations=args.reps + args.warmup,
            rollout_batch_size=n,
            mini_batch_size=n // 4,
            ppo_epochs=1,
            max_new_tokens=args.response_len,
            actor_lr=1e-6,
            critic_lr=1e-6,
            eval_every=0,
            device=args.device,
            lora_r=16 if lora else 0,
            lora_alpha=32,
            packing=args.packing,
            shard="full" if args.processes > 1 else "none",
        ),
        "benchmark",
    )
    trainer = PPOTrainer(cfg)
    times = []
    for _ in range(args.reps + args.warmup):
        if args.device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        exp = trainer.make_experience(trainer._next_prompts())
        trainer.train_on(exp)
        if args.device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert int(exp.batch.response_mask.sum()) == n // args.processes * args.response_len
    out = {"times": times[args.warmup :], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.device != "cpu":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if trainer.dist.active:  # the slowest process's times, the largest peaks
        import torch.distributed as dist

        everyone = [None] * trainer.dist.world
        dist.all_gather_object(everyone, out)
        out = {
            "times": [max(ts) for ts in zip(*(o["times"] for o in everyone))],
            **{k: max(o[k] for o in everyone) for k in out if k != "times"},
            "layout": trainer.layout.describe(),
        }
    return out if trainer.dist.is_main else None


def summarise(result: dict, response_tokens: int, flops: float | None = None, peak: float | None = None) -> dict:
    t = statistics.median(result["times"])
    row = {"step_s": t, "tokens_per_s": response_tokens / t, "peak_rss_mb": result["peak_rss_mb"]}
    for key in ("peak_gpu_mb", "layout"):
        if key in result:
            row[key] = result[key]
    if flops is not None and peak:
        row["mfu"] = flops / t / peak
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default: qwen2-0.5b on CUDA, else tiny")
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="ours over N processes, sharded (default: every GPU on CUDA, else 1)",
    )
    parser.add_argument("--child", choices=["ppo", "rto", "rto-lora"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model is None:
        args.model = "qwen2-0.5b" if args.device == "cuda" else "tiny"
    if args.processes is None:
        import torch

        args.processes = torch.cuda.device_count() if args.device == "cuda" else 1
    if args.child:
        result = child_ours(Path(args.root), args.child, args)
        if result is not None:
            print(json.dumps(result))
        return

    tokens = args.prompts * args.response_len
    results = {
        "device": _device_name(args.device),
        "model": args.model,
        "prompts": args.prompts,
        "prompt_len": PROMPT_LEN,
        "response_len": args.response_len,
        "processes": args.processes,
        "sides": {},
    }
    name = results["device"]
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if args.device == "cuda" else None
    arch = MODELS[args.model]

    def flops(dense: bool) -> float:
        return iteration_flops(arch, arch["vocab_size"], args.prompts, PROMPT_LEN, args.response_len, dense)["total"]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.model, args.prompts)
        common = [
            "--root",
            str(root),
            "--reps",
            str(args.reps),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
            "--prompts",
            str(args.prompts),
            "--response-len",
            str(args.response_len),
            "--model",
            args.model,
            "--out",
            "-",
            "--processes",
            str(args.processes),
        ] + (["--packing"] if args.packing else [])
        launcher = (
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes)]
            if args.processes > 1
            else [sys.executable]
        )
        for mode in ("ppo", "rto", "rto-lora"):
            # LoRA's FLOPs are the full model's forward plus small adapter products: counted as full.
            results["sides"][f"ours_{mode}"] = summarise(
                run_child([__file__, "--child", mode, *common], python=launcher),
                tokens,
                flops(mode != "ppo"),
                peak and peak * args.processes,
            )
            print(mode, json.dumps(results["sides"][f"ours_{mode}"]), flush=True)
        if not args.skip_trl:
            try:
                trl_python = ensure_trl_venv()
            except Exception as e:  # no network and no wheels: say so, keep our numbers
                results["trl_skipped"] = f"TRL 1.12 environment unavailable: {e}"
                trl_python = None
            if trl_python:
                trl = run_child(
                    [
                        str(HERE / "trl_ppo_child.py"),
                        "--root",
                        str(root),
                        "--reps",
                        str(args.reps),
                        "--warmup",
                        str(args.warmup),
                        "--prompts",
                        str(args.prompts),
                        "--response-len",
                        str(args.response_len),
                        "--device",
                        args.device,
                        *(["--bf16"] if args.device == "cuda" else []),
                    ],
                    python=trl_python,
                )
                results["sides"]["trl_ppo"] = summarise(trl, tokens, flops(False), peak)
                print("trl", json.dumps(results["sides"]["trl_ppo"]), flush=True)
    sides = results["sides"]
    results["rto_overhead"] = sides["ours_rto"]["step_s"] / sides["ours_ppo"]["step_s"]
    if "trl_ppo" in sides:
        results["speedup_vs_trl"] = sides["trl_ppo"]["step_s"] / sides["ours_ppo"]["step_s"]
    Path(args.out).write_text(json.dumps(results, indent=2))


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
