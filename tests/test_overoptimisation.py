"""A reward model with a planted flaw the gold reward does not share: PPO exploits it, the
proxy/gold divergence flag fires, and dev selection keeps an earlier policy than the last.

The flaw is in the preference labels, as in practice: the labeller prefers responses with more
of one `trap` symbol, which the keyed gold reward ignores (it is neither a key nor a bonus
symbol), so every trap token written displaces one that could have earned gold reward."""

import json
import random

import torch
from safetensors.torch import load_file

from rto.io.config import build
from rto.io.data import write_jsonl
from rto.io.prompt_pool import read_prompts
from rto.lm.evaluate import dev_point
from rto.lm.models import load_causal_lm, load_tokenizer
from rto.lm.rollout import Sampling
from rto.rl.config import PPOStageConfig
from rto.rl.trainer import PPOTrainer
from rto.stages.rm import RMStageConfig
from rto.stages.rm import run as run_rm


def _flawed_pairs(task, n: int, trap: str) -> list[dict]:
    """Teacher responses against copies with 2-8 tokens overwritten by `trap`: the copy is chosen."""
    rng = random.Random(0)
    rows = []
    for prompt in task.prompts("train", n, seed=0):
        tokens = task.demonstration(prompt, rng).split()[:-1]
        trapped = list(tokens)
        for i in rng.sample(range(len(tokens)), rng.randint(2, 8)):
            trapped[i] = trap
        rows.append({"prompt": prompt, "chosen": " ".join(trapped) + " <eos>", "rejected": " ".join(tokens) + " <eos>"})
    return rows


def test_an_exploitable_rm_is_flagged_and_an_earlier_policy_is_selected(tiny_dirs, keyed, tmp_path):
    trap = next(s for s in keyed.symbols if s not in keyed.bonus)
    write_jsonl(tmp_path / "prefs.jsonl", _flawed_pairs(keyed, 256, trap))
    write_jsonl(tmp_path / "prompts.jsonl", ({"prompt": p} for p in keyed.prompts("train", 64, seed=0)))
    write_jsonl(tmp_path / "dev.jsonl", ({"prompt": p} for p in keyed.prompts("dev", 32, seed=0)))
    rm_metrics = run_rm(
        build(
            RMStageConfig,
            dict(
                model=tiny_dirs["policy"],
                data=str(tmp_path / "prefs.jsonl"),
                out=str(tmp_path / "rm"),
                epochs=2.0,
                learning_rate=1e-3,
                threads=1,
            ),
            "test",
        )
    )
    assert rm_metrics["train_accuracy"] > 0.95  # the RM learnt the flaw
    out = tmp_path / "out"
    cfg = build(
        PPOStageConfig,
        dict(
            policy=tiny_dirs["policy"],
            reward_model=str(tmp_path / "rm"),
            prompts=str(tmp_path / "prompts.jsonl"),
            out=str(out),
            iterations=16,
            rollout_batch_size=16,
            mini_batch_size=8,
            max_new_tokens=12,
            actor_lr=3e-3,
            critic_lr=1e-3,
            warmup_ratio=0.0,
            kl_coef=0.0,
            eval_every=2,
            eval_prompts=str(tmp_path / "dev.jsonl"),
            n_eval=32,
            task="keyed",
            select_by="gold_reward",
            threads=1,
        ),
        "test",
    )
    summary = PPOTrainer(cfg).train()

    curve = summary["curve"]
    d = summary["divergence"]
    assert d is not None, [(p["iteration"], p["gold_reward"], p["rm_score"]) for p in curve]
    assert d["rm_score"] > d["rm_score_at_best"] and d["gold_reward"] < d["gold_reward_at_best"]
    best = summary["selection"]["best_iteration"]
    assert best < summary["iterations"] and best <= d["true_best_iteration"]
    assert json.loads((out / "metrics.json").read_text())["divergence"] == d
    # The result is the selected policy, not the last; the last writes the trap far more often and
    # earns less gold reward on the dev prompts.
    selected, last = (
        load_file(str(out / "policy" / "model.safetensors")),
        load_file(str(out / "policy_last" / "model.safetensors")),
    )
    assert any(not torch.equal(selected[k], last[k]) for k in selected)
    tok = load_tokenizer(out / "policy")
    prompts = read_prompts(str(tmp_path / "dev.jsonl"), tok, max_len=64)
    points = {}
    for name in ("policy", "policy_last"):
        points[name] = dev_point(load_causal_lm(out / name), tok, prompts, Sampling(12, 1.0), seed=0, task=keyed)
    assert points["policy"]["gold_reward"] == next(p["gold_reward"] for p in curve if p["iteration"] == best)
    assert points["policy"]["gold_reward"] > points["policy_last"]["gold_reward"] + 0.05
