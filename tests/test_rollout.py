"""Generation and scoring passes: masks, left padding, no off-by-one between logits and tokens."""

import torch

from rto.lm.models import load_causal_lm, load_tokenizer
from rto.lm.rollout import Sampling, encode_prompts, generate, response_mask_from_ids
from rto.lm.scoring import response_logits, token_logprobs


def test_response_mask_stops_at_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8]])
    assert response_mask_from_ids(ids, eos_id=1).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_logprobs_match_unpadded_forward(tiny_dirs, keyed):
    tok = load_tokenizer(tiny_dirs["policy"])
    model = load_causal_lm(tiny_dirs["policy"])
    # Prompts of different lengths, so the batch has left padding.
    prompts = ["s1 s2 s3 <sep>", "s4 s5 s6 s7 s8 s9 <sep>", "s10 <sep>"]
    ids, mask = encode_prompts(tok, prompts)
    assert (mask == 0).any()
    torch.manual_seed(0)
    batch = generate(model, tok, ids, mask, Sampling(8, 0.7))
    # Everything after a response's end is pad (a random model may also sample pad as a token).
    assert (batch.response_ids[batch.response_mask == 0] == tok.pad_token_id).all()
    logp = token_logprobs(response_logits(model, batch), batch.response_ids, temperature=0.7)
    for b, prompt in enumerate(prompts):
        p_ids = tok(prompt, return_tensors="pt")["input_ids"][0]
        n = int(batch.response_mask[b].sum())
        r_ids = batch.response_ids[b, :n]
        full = torch.cat([p_ids, r_ids]).unsqueeze(0)
        with torch.no_grad():
            logits = model(full).logits[0, len(p_ids) - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, r_ids.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(logp[b, :n], expected, atol=1e-5)


def test_generate_is_seeded(tiny_dirs):
    tok = load_tokenizer(tiny_dirs["policy"])
    model = load_causal_lm(tiny_dirs["policy"])
    ids, mask = encode_prompts(tok, ["s1 s2 <sep>"] * 4)
    torch.manual_seed(3)
    a = generate(model, tok, ids, mask, Sampling(6))
    torch.manual_seed(3)
    b = generate(model, tok, ids, mask, Sampling(6))
    assert torch.equal(a.response_ids, b.response_ids)


def _rollout(tiny_dirs, n=6, max_new_tokens=8, temperature=0.7):
    tok = load_tokenizer(tiny_dirs["policy"])
    model = load_causal_lm(tiny_dirs["policy"])
    # Prompts of 1 to 6 symbols and responses of different lengths: padding on both sides.
    prompts = [" ".join(f"s{j}" for j in range(1 + i % 6)) + " <sep>" for i in range(n)]
    ids, mask = encode_prompts(tok, prompts)
    torch.manual_seed(0)
    batch = generate(model, tok, ids, mask, Sampling(max_new_tokens, temperature), record_logprobs=True)
    return tok, model, batch


def test_sampled_logprobs_equal_a_scoring_pass(tiny_dirs):
    """The log-probs recorded while sampling are the ones a separate forward pass computes."""
    _, model, batch = _rollout(tiny_dirs)
    with torch.no_grad():
        scored = token_logprobs(response_logits(model, batch), batch.response_ids, temperature=0.7)
    m = batch.response_mask.bool()
    assert batch.sampled_logprobs is not None and batch.sampled_logprobs.shape == scored.shape
    assert torch.allclose(batch.sampled_logprobs[m], scored[m], atol=1e-5)
    assert (batch.sampled_logprobs[~m] == 0).all()


def test_sampled_logprobs_ignore_the_checkpoints_generation_defaults(tiny_dirs):
    """A checkpoint's generation_config (here top_k=1, i.e. greedy) must not change what we sample."""
    from transformers import GenerationConfig

    tok, model, _ = _rollout(tiny_dirs)
    model.generation_config = GenerationConfig(top_k=1, repetition_penalty=3.0)
    ids, mask = encode_prompts(tok, ["s1 s2 <sep>"] * 16)
    torch.manual_seed(0)
    batch = generate(model, tok, ids, mask, Sampling(4))
    assert len({tuple(r) for r in batch.response_ids.tolist()}) > 1  # sampled, not greedy
    assert model.generation_config.top_k == 1  # restored


def test_packed_passes_equal_padded_passes(tiny_dirs):
    from rto.lm.models import load_score_model
    from rto.lm.rollout import pack
    from rto.lm.scoring import sequence_scores, token_values

    tok, model, batch = _rollout(tiny_dirs, n=9)
    lengths = batch.prompt_mask.sum(-1) + batch.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2, "the test needs sequences of different lengths"
    critic = load_score_model(tiny_dirs["rm"])
    m = batch.response_mask.bool()
    for row_tokens in (0, 40, 1000):  # rows of the longest sequence, mid-size, everything in one row
        packed = pack(batch, row_tokens, pad_id=tok.pad_token_id)
        assert packed.n_tokens == int(lengths.sum())
        with torch.no_grad():
            padded_lp = token_logprobs(response_logits(model, batch), batch.response_ids)
            packed_lp = token_logprobs(response_logits(model, batch, packed), batch.response_ids)
            assert torch.allclose(packed_lp[m], padded_lp[m], atol=1e-5)
            assert torch.allclose(token_values(critic, batch, packed)[m], token_values(critic, batch)[m], atol=1e-5)
            assert torch.allclose(sequence_scores(critic, batch, packed), sequence_scores(critic, batch), atol=1e-5)
    assert pack(batch, 1000).input_ids.shape[0] == 1
    padded_fill = float(lengths.sum()) / batch.attention_mask.numel()

    def fill(p):  # share of row slots holding real tokens
        return p.n_tokens / p.input_ids.numel()

    assert fill(pack(batch)) >= padded_fill and fill(pack(batch, 40)) > padded_fill


def test_packed_loss_and_gradients_equal_padded(tiny_dirs):
    from rto.core.losses import policy_loss

    _, model, batch = _rollout(tiny_dirs, n=7)
    from rto.lm.rollout import pack

    adv = torch.randn(batch.response_ids.shape)
    old = batch.sampled_logprobs + 0.05 * torch.randn(adv.shape)
    grads = []
    for packed in (None, pack(batch)):
        model.zero_grad()
        logp = token_logprobs(response_logits(model, batch, packed), batch.response_ids, 0.7)
        loss, _ = policy_loss(logp, old, adv, batch.response_mask, 0.2)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-5)
