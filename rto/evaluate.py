"""Evaluation: sample on held-out prompts, score by gold reward, RM and KL to a reference.

Used by `rto eval`, by the PPO trainer's periodic dev-set checks and by the pipeline's SFT and
DPO reference lines on the same dev prompts (`dev_point`, one function for both).
"""

from __future__ import annotations

import torch

from rto.rollout import (Batch, decode_responses, encode_prompts, generate, response_logits, sequence_scores,
                         token_logprobs)


@torch.no_grad()
def sample(policy, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
           batch_size: int = 256, seed: int = 0) -> tuple[list[str], list[Batch]]:
    """One sampled response per prompt: (texts, the token batches they came from)."""
    devices = {p.device for p in policy.parameters()}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # same seed for every model: differences come from the models
    texts, batches = [], []
    try:
        for i in range(0, len(prompts), batch_size):
            ids, mask = encode_prompts(tokenizer, prompts[i:i + batch_size])
            device = next(iter(devices))
            batch = generate(policy, tokenizer, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                             temperature=temperature)
            texts += decode_responses(tokenizer, batch)
            batches.append(batch)
    finally:
        torch.random.set_rng_state(state)
    return texts, batches


@torch.no_grad()
def sequence_logprob(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """Sum of response-token log-probs under `model`: [B]."""
    logp = token_logprobs(response_logits(model, batch), batch.response_ids, temperature)
    return (logp * batch.response_mask).sum(-1)


@torch.no_grad()
def kl_to(policy, reference, batches: list[Batch], temperature: float = 1.0) -> float:
    """Monte-Carlo KL(policy || reference) per response, from samples of the policy (nats); both
    at the temperature the samples were drawn at, so the policy term is the sampling distribution's."""
    diffs = [sequence_logprob(policy, b, temperature) - sequence_logprob(reference, b, temperature) for b in batches]
    return float(torch.cat(diffs).mean()) if diffs else 0.0


@torch.no_grad()
def rm_scores(reward_model, batches: list[Batch]) -> list[float]:
    return torch.cat([sequence_scores(reward_model, b) for b in batches]).tolist()


def mean_ci(values: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean."""
    if not values:
        return (float("nan"), float("nan"))
    t = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (n_boot, len(values)), generator=g)
    means = t[idx].mean(1)
    return (float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975)))


def win_rate(ours: list[float], baseline: list[float]) -> float:
    """Share of prompts where ours beats the baseline; ties count half."""
    if not ours:
        return float("nan")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, baseline))
    return wins / len(ours)


def gold_rewards(task, prompts: list[str], responses: list[str]) -> list[float]:
    return list(task.gold_rewards(prompts, responses))


# Dev-set samples draw from a stream of their own (seed + this), the same for every model and
# every evaluation point: curves and reference lines differ by the models, not by the draw.
DEV_SEED_OFFSET = 7919


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error over prompts: the noise a fall must exceed to count (selection)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / len(values) ** 0.5) if len(values) > 1 else 0.0


@torch.no_grad()
def dev_point(policy, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int,
              ref=None, task=None, rm=None, judge=None) -> dict[str, float]:
    """One response per dev prompt, scored: `kl_to_ref` (with `ref`), `gold_reward` (with a task),
    `rm_score` (with an RM), `judge_score` (with a held-out judge, rto.judges); means over the
    prompts, with standard errors for the gold and judge scores."""
    texts, batches = sample(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=seed + DEV_SEED_OFFSET)
    point = {}
    if ref is not None:
        point["kl_to_ref"] = kl_to(policy, ref, batches, temperature)
    if task is not None:
        point["gold_reward"], point["gold_reward_se"] = mean_and_se(gold_rewards(task, prompts, texts))
    if judge is not None:
        point["judge_score"], point["judge_score_se"] = mean_and_se(judge(prompts, texts))
    if rm is not None:
        s = rm_scores(rm, batches)
        point["rm_score"] = sum(s) / len(s)
    return point
