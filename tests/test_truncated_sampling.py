"""--top-k / --top-p: the log-probs PPO records (old log-probs, the k1 KL) are those of the
truncated distribution the tokens were drawn from, and the training pass computes the same."""

import torch

from rto.lm.models import load_causal_lm, load_tokenizer
from rto.lm.rollout import Sampling, encode_prompts, generate
from rto.lm.scoring import response_logits, token_logprobs

T, TOP_K, TOP_P = 0.7, 6, 0.8


def _truncated_logprobs_by_hand(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, kept mask) of one position's distribution after /T, top-k, then top-p: the
    smallest set of most probable tokens whose mass reaches top_p, renormalised. Written apart
    from the library's code (sort, cumulative sum), on one [V] vector at a time."""
    z = logits.double() / T
    kth = torch.sort(z, descending=True).values[TOP_K - 1]
    z = torch.where(z >= kth, z, torch.tensor(float("-inf"), dtype=z.dtype))
    probs = torch.softmax(z, -1)
    order = torch.argsort(probs, descending=True)
    mass_before = torch.cumsum(probs[order], 0) - probs[order]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[mass_before < TOP_P]] = True
    z = torch.where(keep, z, torch.tensor(float("-inf"), dtype=z.dtype))
    return torch.log_softmax(z, -1), keep


def test_recorded_logprobs_are_the_truncated_sampling_distribution(tiny_dirs):
    tok = load_tokenizer(tiny_dirs["policy"])
    model = load_causal_lm(tiny_dirs["policy"])
    prompts = ["s1 s2 s3 <sep>", "s4 s5 s6 s7 s8 s9 <sep>", "s10 <sep>", "s2 <sep>"]
    ids, mask = encode_prompts(tok, prompts)
    torch.manual_seed(0)
    batch = generate(model, tok, ids, mask, Sampling(10, T, TOP_K, TOP_P), record_logprobs=True)
    truncated_gain = []
    for b, prompt in enumerate(prompts):
        p_ids = tok(prompt, return_tensors="pt")["input_ids"][0]
        n = int(batch.response_mask[b].sum())
        r_ids = batch.response_ids[b, :n]
        with torch.no_grad():
            logits = model(torch.cat([p_ids, r_ids]).unsqueeze(0)).logits[0, len(p_ids) - 1 : -1]
        for t in range(n):
            logp, keep = _truncated_logprobs_by_hand(logits[t])
            token = int(r_ids[t])
            assert keep[token], f"row {b} token {t}: sampled outside the top-k/top-p set"
            assert abs(float(batch.sampled_logprobs[b, t]) - float(logp[token])) < 1e-5, (b, t)
            truncated_gain.append(float(logp[token] - torch.log_softmax(logits[t].double() / T, -1)[token]))
    # Not vacuous: truncation raised the sampled tokens' log-probs (renormalisation over fewer tokens).
    assert min(truncated_gain) >= -1e-6 and sum(truncated_gain) / len(truncated_gain) > 0.05

    # The training pass, at the weights that sampled, gives the same log-probs (PPO ratio 1).
    with torch.no_grad():
        trained = token_logprobs(response_logits(model, batch), batch.response_ids, T, TOP_K, TOP_P)
    m = batch.response_mask.bool()
    assert torch.allclose(trained[m], batch.sampled_logprobs[m], atol=1e-5)


def test_a_token_cut_from_the_support_after_an_update_keeps_a_finite_logprob():
    logits = torch.tensor([[[4.0, 3.0, 0.0, -1.0]]], requires_grad=True)
    token = torch.tensor([[3]])  # outside top-2 of these logits
    logp = token_logprobs(logits, token, 1.0, top_k=2)
    expected = torch.log_softmax(torch.tensor([4.0, 3.0, -1.0]), -1)[2]  # the kept set plus the token
    assert torch.isfinite(logp).all() and abs(float(logp.detach()) - float(expected)) < 1e-6
    logp.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 2] == 0  # the cut token gets no gradient
