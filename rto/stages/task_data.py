"""`rto data` and `rto pairs`: a task's data files, in the same JSONL formats users bring.

- `rto data`: SFT demonstrations from the task's teacher, and prompt files for
  RL (train split), model selection (dev) and evaluation (test).
- `rto pairs`: two SFT samples per train prompt, labelled by a Bradley-Terry
  draw on the gold reward difference, P(a > b) = sigmoid((g_a - g_b) / T)
  (optionally more such pairs on other prompts, for a held-out judge RM);
  plus held-out pairs from test prompts ordered by the gold reward itself
  (ties dropped), on which the RM's accuracy against the gold order is measured.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from rto.io.config import opt, require
from rto.io.data import write_json, write_jsonl
from rto.runtime.process import seed_field, setup, threads_field


@dataclass
class DataStageConfig:
    out: str = opt("", "output directory for the JSONL files")
    task: str = opt("keyed", "task name or pkg.module:Class")
    n_sft: int = opt(4000, "SFT demonstrations", ge=1)
    n_rl_prompts: int = opt(2048, "prompts for PPO/RTO (train split)", ge=1)
    n_dev: int = opt(128, "dev prompts (model selection, training curves)", ge=1)
    n_test: int = opt(512, "test prompts (final evaluation)", ge=1)
    seed: int = seed_field()

    def validate(self):
        require(self, "data", "out")


def run_data(cfg: DataStageConfig) -> dict:
    from rto.tasks import load_task

    task = load_task(cfg.task)
    out = Path(cfg.out)
    rng = random.Random(f"teacher/{cfg.seed}")
    sft_prompts = task.prompts("train", cfg.n_sft, seed=cfg.seed)
    write_jsonl(out / "sft.jsonl", ({"prompt": p, "completion": " " + task.demonstration(p, rng)} for p in sft_prompts))
    # RL prompts come from the train split but a different stream than the SFT prompts.
    rl = task.prompts("train", cfg.n_rl_prompts, seed=cfg.seed + 1_000_003)
    write_jsonl(out / "rl_prompts.jsonl", ({"prompt": p} for p in rl))
    write_jsonl(out / "dev_prompts.jsonl", ({"prompt": p} for p in task.prompts("dev", cfg.n_dev, cfg.seed)))
    write_jsonl(out / "test_prompts.jsonl", ({"prompt": p} for p in task.prompts("test", cfg.n_test, cfg.seed)))
    rng = random.Random(f"teacher-score/{cfg.seed}")
    teacher_gold = sum(task.gold_reward(p, task.demonstration(p, rng)) for p in sft_prompts[:500]) / min(
        500, len(sft_prompts)
    )
    info = {"n_sft": cfg.n_sft, "n_rl_prompts": cfg.n_rl_prompts, "teacher_gold_reward": teacher_gold}
    write_json(out / "data_info.json", info)
    return info


@dataclass
class PairsStageConfig:
    model: str = opt("", "SFT model directory to sample from")
    out: str = opt("", "output directory (prefs.jsonl, prefs_heldout.jsonl, prefs_judge.jsonl)")
    task: str = opt("keyed", "task whose gold reward labels the pairs")
    n_pairs: int = opt(2000, "training pairs (train-split prompts)", ge=1)
    n_heldout: int = opt(500, "held-out pairs (test-split prompts), ordered by gold reward", ge=0)
    n_judge_pairs: int = opt(
        0,
        "pairs for a held-out judge RM (prefs_judge.jsonl): labelled as the training pairs, "
        "on train-split prompts disjoint from theirs",
        ge=0,
    )
    bt_temperature: float = opt(0.1, "Bradley-Terry temperature of the labels (label noise)", gt=0)
    max_new_tokens: int = opt(24, "response length limit", ge=1)
    temperature: float = opt(1.0, "sampling temperature", gt=0)
    batch_size: int = opt(256, "prompts per generation batch", ge=1)
    seed: int = seed_field()
    threads: int = threads_field()

    def validate(self):
        require(self, "pairs", "model", "out")


def _sample_two(policy, tokenizer, prompts, cfg) -> tuple[list[str], list[str]]:
    from rto.lm.rollout import Sampling, decode_responses, encode_prompts, generate

    first, second = [], []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i : i + cfg.batch_size]
        ids, mask = encode_prompts(tokenizer, chunk + chunk)
        texts = decode_responses(
            tokenizer,
            generate(policy, tokenizer, ids, mask, Sampling(cfg.max_new_tokens, cfg.temperature)),
        )
        first += [" " + t for t in texts[: len(chunk)]]
        second += [" " + t for t in texts[len(chunk) :]]
    return first, second


def _labelled_pairs(task, prompts, policy, tokenizer, rng, cfg) -> tuple[list[dict], int, int]:
    """Two SFT samples per prompt, labelled by a Bradley-Terry draw on their gold rewards:
    (rows, labels agreeing with the gold order, pairs whose gold rewards differ)."""
    a, b = _sample_two(policy, tokenizer, prompts, cfg)
    rows, agree, informative = [], 0, 0
    for p, ra, rb in zip(prompts, a, b):
        ga, gb = task.gold_reward(p, ra), task.gold_reward(p, rb)
        p_a = 1.0 / (1.0 + math.exp(-(ga - gb) / cfg.bt_temperature))
        a_wins = rng.random() < p_a
        chosen, rejected = (ra, rb) if a_wins else (rb, ra)
        gc, gr = (ga, gb) if a_wins else (gb, ga)
        if ga != gb:
            informative += 1
            agree += gc > gr
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected, "gold_chosen": gc, "gold_rejected": gr})
    return rows, agree, informative


def run_pairs(cfg: PairsStageConfig) -> dict:
    setup(cfg.seed, cfg.threads)
    from rto.lm.models import load_causal_lm, load_tokenizer
    from rto.tasks import load_task

    task = load_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model)
    policy = load_causal_lm(cfg.model, what="SFT model")
    rng = random.Random(f"pairs/{cfg.seed}")
    out = Path(cfg.out)

    prompts = task.prompts("train", cfg.n_pairs + cfg.n_judge_pairs, seed=cfg.seed + 2_000_003)
    rows, agree, informative = _labelled_pairs(task, prompts[: cfg.n_pairs], policy, tokenizer, rng, cfg)
    write_jsonl(out / "prefs.jsonl", rows)

    heldout = []
    if cfg.n_heldout:
        hp = task.prompts("test", cfg.n_heldout, seed=cfg.seed + 3_000_017)
        ha, hb = _sample_two(policy, tokenizer, hp, cfg)
        for p, ra, rb in zip(hp, ha, hb):
            ga, gb = task.gold_reward(p, ra), task.gold_reward(p, rb)
            if ga != gb:
                chosen, rejected = (ra, rb) if ga > gb else (rb, ra)
                heldout.append(
                    {
                        "prompt": p,
                        "chosen": chosen,
                        "rejected": rejected,
                        "gold_chosen": max(ga, gb),
                        "gold_rejected": min(ga, gb),
                    }
                )
        write_jsonl(out / "prefs_heldout.jsonl", heldout)
    # Last, so the other files are the same with or without them; distinct prompts (one draw),
    # so the training RM and the judge never see the same pair.
    if cfg.n_judge_pairs:
        write_jsonl(
            out / "prefs_judge.jsonl", _labelled_pairs(task, prompts[cfg.n_pairs :], policy, tokenizer, rng, cfg)[0]
        )
    info = {
        "pairs": len(rows),
        "label_agreement_with_gold": agree / max(informative, 1),
        "tied_fraction": 1 - informative / len(rows),
        "heldout_pairs": len(heldout),
        "sft_sample_gold_reward": sum(r["gold_chosen"] + r["gold_rejected"] for r in rows) / (2 * len(rows)),
    }
    write_json(out / "pairs_info.json", info)
    return info
