"""Generation and scoring passes: masks, left padding, no off-by-one between logits and tokens."""

import torch

from rto.models import load_causal_lm, load_tokenizer
from rto.rollout import encode_prompts, generate, response_logits, response_mask_from_ids, token_logprobs


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
    batch = generate(model, tok, ids, mask, max_new_tokens=8, temperature=0.7)
    # Everything after a response's end is pad (a random model may also sample pad as a token).
    assert (batch.response_ids[batch.response_mask == 0] == tok.pad_token_id).all()
    logp = token_logprobs(response_logits(model, batch), batch.response_ids, temperature=0.7)
    for b, prompt in enumerate(prompts):
        p_ids = tok(prompt, return_tensors="pt")["input_ids"][0]
        n = int(batch.response_mask[b].sum())
        r_ids = batch.response_ids[b, :n]
        full = torch.cat([p_ids, r_ids]).unsqueeze(0)
        with torch.no_grad():
            logits = model(full).logits[0, len(p_ids) - 1:-1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, r_ids.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(logp[b, :n], expected, atol=1e-5)


def test_generate_is_seeded(tiny_dirs):
    tok = load_tokenizer(tiny_dirs["policy"])
    model = load_causal_lm(tiny_dirs["policy"])
    ids, mask = encode_prompts(tok, ["s1 s2 <sep>"] * 4)
    torch.manual_seed(3)
    a = generate(model, tok, ids, mask, max_new_tokens=6)
    torch.manual_seed(3)
    b = generate(model, tok, ids, mask, max_new_tokens=6)
    assert torch.equal(a.response_ids, b.response_ids)
