#!/usr/bin/env python
"""The vLLM rollout backend (rto/rl/vllm.py) on a real GPU with the real vLLM 0.33: PASS/FAIL per point.

    integrations/vllm/check                                   # once, on the GPU machine: builds its .venv
    integrations/vllm/.venv/bin/python benchmarks/gpu_vllm_check.py [--out FILE.json]

Needs vllm==0.33.0 with its CUDA torch (integrations/vllm/requirements.txt, as the check above
installs it) and one or more CUDA GPUs; installs and downloads nothing. Tiny random models (Llama
layout, a 64-word vocabulary), built in a temp dir; each case runs in its own process (one vLLM
engine per process, as in `rto ppo`), about a minute each (vLLM compiles and captures CUDA graphs):
- main: the engine on the run's GPU (cuda:1 where there are two: vLLM's one-process executor would
  take cuda:0), the RNG states and current device as they were, a rollout whose responses end
  only at the tokenizer's EOS although generation_config.json lists a second EOS id, the weight
  sync (another model's weights in: vLLM's log-probs then match that model's, not the directory's;
  fp32 weights into the bf16 engine without a dtype warning), one-line errors for a bad weight
  and a temperature above 2;
- lora: a LoRA adapter folder as the policy (what `rto sft --lora-r` writes): the engine starts
  from its base and samples from the merged policy from the first rollout on;
- fp32: a run without bf16 (GPUs without it): an fp32 engine starts, samples and syncs;
- ppo: `rto ppo --generation-backend vllm` for two iterations; the engine then holds the updated policy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
VOCAB = ["<pad>", "<unk>", *(f"w{i}" for i in range(60)), "<alt>", "<eos>"]
EOS, ALT = VOCAB.index("<eos>"), VOCAB.index("<alt>")
MAX_NEW, MAX_PROMPT = 48, 16


def build(root: Path) -> None:
    """Model A (the directory vLLM reads), model B (A perturbed: what the sync sends), a LoRA
    adapter on A, and a generation_config.json with two EOS ids, as instruct models have."""
    import torch
    from peft import get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rto.lm.lora import lora_config

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=EOS,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    a = LlamaForCausalLM(config)
    for name, model in (("a", a), ("b", None)):
        if model is None:
            model = LlamaForCausalLM(config)
            model.load_state_dict(a.state_dict())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.3 * torch.randn_like(p))  # far from A: its log-probs differ clearly
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        (root / name / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, ALT]}))
    peft_model = get_peft_model(a, lora_config(8, 16.0, "all-linear"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    cfg_file = root / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": str(root / "a")}))


def _cfg(policy: Path, **kw):
    values = dict(
        policy=str(policy),
        max_new_tokens=MAX_NEW,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        vllm_gpu_memory_utilization=0.25,
        seed=7,
        max_prompt_len=MAX_PROMPT,
    )
    values.update(kw)
    from rto.lm.rollout import Sampling

    # The run's rollout sampling, as PPOStageConfig.sampling gives it.
    values["sampling"] = Sampling(values["max_new_tokens"], values["temperature"], values["top_k"], values["top_p"])
    return types.SimpleNamespace(**values)


def _prompts(tok, n: int, device):
    import random

    import torch

    rng = random.Random(1)
    texts = [" ".join(rng.choice(VOCAB[2:62]) for _ in range(rng.randint(3, MAX_PROMPT))) for _ in range(n)]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), torch.Generator().manual_seed(0)


def _logprob_gap(rollout, model, ids, mask) -> float:
    """Mean |vLLM's log-prob - `model`'s| of the tokens vLLM samples (16 per prompt)."""
    import torch

    params = [
        rollout.SamplingParams(**{**rollout.sampling, "max_tokens": 16, "ignore_eos": True}, logprobs=0, seed=i)
        for i in range(len(ids))
    ]
    prompts = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
    gaps = []
    for prompt, out in zip(prompts, rollout.llm.generate(prompts, params, use_tqdm=False)):
        sample = out.outputs[0]
        tokens = list(sample.token_ids)
        ours = [lp[t].logprob for lp, t in zip(sample.logprobs, tokens)]
        seq = torch.tensor(prompt["prompt_token_ids"] + tokens, device=ids.device)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0].float(), -1)
        n = len(prompt["prompt_token_ids"])
        theirs = [logp[n - 1 + i, t].item() for i, t in enumerate(tokens)]
        gaps += [abs(x - y) for x, y in zip(ours, theirs)]
    return sum(gaps) / len(gaps)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _device(index: int = 0):
    import torch

    return torch.device("cuda", index)


def _current_device():
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _engine_device(rollout) -> str:
    def where(worker):
        return str(next(worker.model_runner.get_model().parameters()).device)

    return rollout.llm.collective_rpc(where)[0]


def case_main(root: Path, report) -> None:
    import torch

    from rto.io.errors import UserError
    from rto.lm.models import load_causal_lm, load_tokenizer
    from rto.lm.rollout import Sampling
    from rto.rl.vllm import VLLMRollout, check_sampling, sampling_settings

    index = 1 if torch.cuda.device_count() > 1 else 0
    device = _device(index)
    tok = load_tokenizer(root / "a")
    models = types.SimpleNamespace(policy_root=load_causal_lm(root / "a").to(device), shared=None, bf16=True)
    torch.manual_seed(123)
    rng, current = torch.get_rng_state(), _current_device()
    start = time.time()
    rollout = VLLMRollout.for_run(_cfg(root / "a"), tok, device, types.SimpleNamespace(world=1, local_world=1), models)
    report("engine start", True, f"{time.time() - start:.0f}s (dtype {rollout.llm.llm_engine.model_config.dtype})")
    report(
        "engine on the run's GPU",
        _engine_device(rollout) == str(device),
        f"engine on {_engine_device(rollout)}, run on {device}" + ("" if index else " (one GPU: cuda:N>0 not tried)"),
    )
    report(
        "RNG states and current device kept",
        torch.equal(torch.get_rng_state(), rng) and _current_device() == current,
        "",
    )

    ids, mask, _ = _prompts(tok, 64, device)
    torch.manual_seed(5)
    batch = rollout.generate(ids, mask)
    lengths = batch.response_mask.sum(-1).tolist()
    last = [int(row[n - 1]) for row, n in zip(batch.response_ids, lengths)]
    bad = [(n, t) for n, t in zip(lengths, last) if t != EOS and n != MAX_NEW]
    alt_inside = int(((batch.response_ids == ALT) & (batch.response_mask > 0)).sum())
    report(
        "responses stop only at the tokenizer's EOS",
        not bad and alt_inside > 0,
        f"{sum(t == EOS for t in last)} ended at EOS, {sum(n == MAX_NEW for n in lengths)} at the limit, "
        f"{alt_inside} generation-config EOS ids sampled inside responses, wrong stops: {bad[:4]}",
    )
    torch.manual_seed(5)
    report("same seeds, same responses", torch.equal(rollout.generate(ids, mask).response_ids, batch.response_ids), "")

    b = load_causal_lm(root / "b").to(device)
    before_b = _logprob_gap(rollout, b, ids[:16], mask[:16])
    caught = _Warnings()
    logging.getLogger("vllm").addHandler(caught)
    start = time.time()
    rollout.sync_from(types.SimpleNamespace(policy_root=b, shared=None))
    took = time.time() - start
    logging.getLogger("vllm").removeHandler(caught)
    after_b, after_a = (_logprob_gap(rollout, m, ids[:16], mask[:16]) for m in (b, models.policy_root))
    # bf16 engine vs the fp32 model: a small gap; models A and B are nats apart.
    report(
        "weight sync: vLLM samples from the synced weights",
        after_b < 0.2 * min(after_a, before_b),
        f"mean |log-prob gap| to the synced model {before_b:.3f} -> {after_b:.3f}, to the directory's {after_a:.3f}; "
        f"sync {took:.2f}s",
    )
    warned = [m for m in caught.messages if "dtype" in m]
    report("weight sync: no dtype warning (fp32 cast to bf16 before sending)", not warned, "; ".join(warned[:2]))

    for name, weights, want in (
        ("a shape mismatch", [("model.norm.weight", torch.zeros(3, device=device))], "AssertionError"),
        ("an unknown name", [("model.layers.0.nope.weight", torch.zeros(1, device=device))], ""),
    ):
        try:
            rollout.sync_weights(weights)
            report(f"weight sync: {name} is a one-line error", False, "no error")
        except UserError as e:
            report(f"weight sync: {name} is a one-line error", want in str(e) and "\n" not in str(e), str(e)[:160])
        except Exception as e:  # noqa: BLE001 - the point is what escapes
            report(f"weight sync: {name} is a one-line error", False, f"{type(e).__name__} escaped: {str(e)[:160]}")
    try:
        check_sampling(sys.modules["vllm"], sampling_settings(Sampling(MAX_NEW, 2.5, 0, 1.0), EOS))
        report("temperature 2.5 refused at the start", False, "accepted")
    except UserError as e:
        report("temperature 2.5 refused at the start", True, str(e)[:120])


def case_lora(root: Path, report) -> None:
    from rto.lm.models import load_causal_lm, load_tokenizer
    from rto.rl.vllm import VLLMRollout

    device = _device()
    tok = load_tokenizer(root / "adapter")
    merged = load_causal_lm(root / "adapter").to(device)  # rto's loading: the adapter merged into its base
    base = load_causal_lm(root / "a").to(device)
    models = types.SimpleNamespace(policy_root=merged, shared=None, bf16=True)
    rollout = VLLMRollout.for_run(
        _cfg(root / "adapter"), tok, device, types.SimpleNamespace(world=1, local_world=1), models
    )
    started = rollout.llm.llm_engine.model_config.model
    report("LoRA policy: engine starts from the adapter's base", Path(started) == root / "a", f"model {started}")
    ids, mask, _ = _prompts(tok, 16, device)
    to_merged, to_base = _logprob_gap(rollout, merged, ids, mask), _logprob_gap(rollout, base, ids, mask)
    report(
        "LoRA policy: the first rollout samples the merged policy",
        to_merged < 0.2 * to_base,
        f"mean |log-prob gap| to merged {to_merged:.3f}, to base {to_base:.3f}",
    )


def case_fp32(root: Path, report) -> None:
    import torch

    from rto.lm.models import load_causal_lm, load_tokenizer
    from rto.rl.vllm import VLLMRollout

    device = _device()
    tok = load_tokenizer(root / "a")
    b = load_causal_lm(root / "b").to(device)
    models = types.SimpleNamespace(policy_root=b, shared=None, bf16=False)
    rollout = VLLMRollout.for_run(_cfg(root / "a"), tok, device, types.SimpleNamespace(world=1, local_world=1), models)
    dtype = rollout.llm.llm_engine.model_config.dtype
    ids, mask, _ = _prompts(tok, 16, device)
    batch = rollout.generate(ids, mask)
    gap, gap_a = (
        _logprob_gap(rollout, b, ids, mask),
        _logprob_gap(rollout, load_causal_lm(root / "a").to(device), ids, mask),
    )
    report(
        "fp32 run: fp32 engine starts, samples, syncs",
        dtype == torch.float32 and batch.response_mask.sum() > 0 and gap < 0.2 * gap_a,
        f"dtype {dtype}, mean |log-prob gap| to the synced model {gap:.4f}, to A {gap_a:.3f}",
    )


def case_ppo(root: Path, report) -> None:
    """`rto ppo --generation-backend vllm` itself: two iterations; the engine holds the updated policy."""
    import torch

    from rto.io.config import build as build_cfg
    from rto.lm.models import RM_STATS_FILE, load_score_model, load_tokenizer, save_model
    from rto.rl.trainer import PPOStageConfig, PPOTrainer

    tok = load_tokenizer(root / "a")
    save_model(load_score_model(root / "a"), tok, root / "rm", extra_files={RM_STATS_FILE: {"mean": 0.0, "std": 1.0}})
    ids, mask, _ = _prompts(tok, 8, "cpu")
    with open(root / "prompts.jsonl", "w") as fh:
        for row, m in zip(ids, mask):
            fh.write(json.dumps({"prompt": tok.decode(row[m.bool()])}) + "\n")
    cfg = build_cfg(
        PPOStageConfig,
        dict(
            policy=str(root / "a"),
            reward_model=str(root / "rm"),
            prompts=str(root / "prompts.jsonl"),
            out=str(root / "ppo"),
            reward="sparse",
            iterations=2,
            rollout_batch_size=8,
            mini_batch_size=8,
            max_new_tokens=16,
            max_prompt_len=MAX_PROMPT,
            actor_lr=1e-2,
            critic_lr=1e-3,
            warmup_ratio=0.0,
            eval_every=0,
            device=str(_device()),
            generation_backend="vllm",
            vllm_gpu_memory_utilization=0.25,
        ),
        "gpu_vllm_check",
    )
    trainer = PPOTrainer(cfg)
    trainer.train()
    rows = (root / "ppo" / "metrics.jsonl").read_text().splitlines()
    report("rto ppo: two iterations with vLLM rollouts", len(rows) == 2, rows[-1][:200] if rows else "no metrics")
    state = trainer.models.policy.state_dict()
    name = "model.layers.1.self_attn.qkv_proj.weight"

    def engine_weight(worker):
        return dict(worker.model_runner.get_model().named_parameters())[name].detach().float().cpu()

    got = trainer.experience.vllm.llm.collective_rpc(engine_weight)[0]
    want = torch.cat([state[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"]).to(got.device)
    dtype = trainer.experience.vllm.dtype
    report(
        "rto ppo: the engine holds the updated policy",
        torch.equal(got, want.to(dtype).float()),
        f"max |engine - policy| {float((got - want).abs().max()):.2e} (engine {dtype})",
    )


CASES = {"main": case_main, "lora": case_lora, "fp32": case_fp32, "ppo": case_ppo}


def child(case: str, root: Path) -> None:
    results = []

    def report(name: str, ok: bool, detail: str) -> None:
        results.append({"case": case, "point": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'} [{case}] {name}: {detail}", flush=True)

    try:
        import vllm  # noqa: F401

        CASES[case](root, report)
    except Exception as e:  # noqa: BLE001 - a crash is one FAIL line, then the next case runs
        report(
            "ran to the end",
            False,
            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
        )
    (root / f"result-{case}.json").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results as JSON")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--case-timeout", type=int, default=240, help="seconds per case (its own process)")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return child(args.case, Path(args.root))
    try:
        import torch
        import vllm
    except ImportError as e:
        sys.exit(f"FAIL setup: {e} (run integrations/vllm/check on this machine first, then its .venv's python)")
    if not torch.cuda.is_available():
        sys.exit("FAIL setup: no CUDA GPU")
    print(
        f"vllm {vllm.__version__}, torch {torch.__version__}, {torch.cuda.device_count()} x "
        f"{torch.cuda.get_device_name(0)}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root)
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}
        for case in args.cases.split(","):
            start = time.time()
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, "--case", case, "--root", str(root)], env=env, timeout=args.case_timeout
                )
            except subprocess.TimeoutExpired:
                proc = types.SimpleNamespace(returncode=f"timeout after {args.case_timeout}s")
            file = root / f"result-{case}.json"
            got = json.loads(file.read_text()) if file.is_file() else []
            if proc.returncode != 0 or not got:
                got.append({"case": case, "point": "process", "ok": False, "detail": f"exit {proc.returncode}"})
                print(f"FAIL [{case}] process: exit {proc.returncode}", flush=True)
            print(f"[{case}] {time.time() - start:.0f}s", flush=True)
            results += got
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
