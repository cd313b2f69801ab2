"""Evaluation: sample on held-out prompts, score by gold reward, RM and KL to a reference.

Used by `rto eval`, by the PPO trainer's periodic dev-set checks and by the pipeline's SFT and
DPO reference lines on the same dev prompts (`dev_point`, one function for both).
"""

from __future__ import annotations

import torch

from rto.lm.rollout import Batch, Sampling, decode_responses, encode_prompts, encode_responses, generate
from rto.lm.scoring import response_logits, sequence_scores, token_logprobs


@torch.no_grad()
def sample(
    policy,
    tokenizer,
    prompts: list[str],
    sampling: Sampling,
    *,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[list[str], list[Batch]]:
    """One sampled response per prompt: (texts, the token batches they came from)."""
    devices = {p.device for p in policy.parameters()}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # same seed for every model: differences come from the models
    texts, batches = [], []
    try:
        for i in range(0, len(prompts), batch_size):
            ids, mask = encode_prompts(tokenizer, prompts[i : i + batch_size])
            device = next(iter(devices))
            batch = generate(policy, tokenizer, ids.to(device), mask.to(device), sampling)
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
def dev_point(
    policy,
    tokenizer,
    prompts: list[str],
    sampling: Sampling,
    *,
    seed: int,
    ref=None,
    task=None,
    rm=None,
    judge=None,
) -> dict[str, float]:
    """One response per dev prompt, scored: `kl_to_ref` (with `ref`), `gold_reward` (with a task),
    `rm_score` (with an RM), `judge_score` (with a held-out judge, rto.lm.judges); means over the
    prompts, with standard errors for the gold and judge scores."""
    texts, batches = sample(policy, tokenizer, prompts, sampling, seed=seed + DEV_SEED_OFFSET)
    point = {}
    if ref is not None:
        point["kl_to_ref"] = kl_to(policy, ref, batches, sampling.temperature)
    if task is not None:
        point["gold_reward"], point["gold_reward_se"] = mean_and_se(gold_rewards(task, prompts, texts))
    if judge is not None:
        point["judge_score"], point["judge_score_se"] = mean_and_se(judge(prompts, texts))
    if rm is not None:
        s = rm_scores(rm, batches)
        point["rm_score"] = sum(s) / len(s)
    return point


# --- held-out preference pairs: how well a reward model orders them ------------------------------


@torch.no_grad()
def implicit_reward_margins(policy, reference, tokenizer, rows: list[dict], batch_size: int = 64) -> torch.Tensor:
    """Per pair, DPO's implicit reward of `chosen` minus that of `rejected`, without beta:
    sum over the response tokens of log pi(y|x) - log pi_ref(y|x) (at temperature 1, EOS appended
    where missing, as DPO trained and as RTO's dense reward reads it): [N].

    beta (> 0, the DPO stage's setting) scales every margin alike, so the sign - all an accuracy
    reads - does not depend on it."""
    from rto.io.data import as_texts

    prompts, chosen, rejected = as_texts(rows, tokenizer)
    device = next(policy.parameters()).device
    margins = []
    for i in range(0, len(prompts), batch_size):
        log_ratios = []
        for responses in (chosen[i : i + batch_size], rejected[i : i + batch_size]):
            b = encode_responses(tokenizer, prompts[i : i + batch_size], responses)
            b = Batch(*(t.to(device) for t in (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)))
            log_ratios.append(sequence_logprob(policy, b) - sequence_logprob(reference, b))
        margins.append((log_ratios[0] - log_ratios[1]).cpu())
    return torch.cat(margins) if margins else torch.zeros(0)


def margin_accuracy(margins) -> float:
    """Share of pairs ordered right (margin > 0); an exact tie (margin 0) counts half, as a coin
    flip would score it, so a model that cannot tell the two apart sits at chance (0.5)."""
    margins = torch.as_tensor(margins, dtype=torch.float64)
    if not len(margins):
        return float("nan")
    return float(((margins > 0).double() + 0.5 * (margins == 0).double()).mean())


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion observed over n trials (Wilson 1927): the
    proportions p whose normal test |p_hat - p| <= z sqrt(p (1 - p) / n) accepts. Unlike
    p_hat +- z se it stays within [0, 1] and keeps its width at 0 or n successes. A tie counted
    half makes p_hat a multiple of 1/(2n); the formula takes any p_hat."""
    if n <= 0:
        return (float("nan"), float("nan"))
    z2n = z * z / n
    centre = (accuracy + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * (accuracy * (1 - accuracy) / n + z2n / (4 * n)) ** 0.5
    return (max(0.0, centre - half), min(1.0, centre + half))


def chance_verdict(interval: tuple[float, float] | list[float]) -> str | None:
    """The rule, fixed before any run: an accuracy is "near chance" when its 95% interval over
    the held-out pairs includes 0.5 (ends included), "below chance" when it lies wholly under
    0.5; otherwise None (the pairs tell it from a coin)."""
    lo, hi = interval
    if hi < 0.5:
        return "below chance"
    return "near chance" if lo <= 0.5 else None
