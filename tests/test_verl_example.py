"""examples/verl/rto_reward.py's reward math on verl's batch layout, without verl (the main suite has
no verl: it pins transformers<5.11). Inside the real verl 0.9.1 - its config, loader, registry,
reward loop, KL penalty and GAE - the example is checked by integrations/verl (make test-integrations).
Here: its tokens, log-probs and token rewards equal this trainer's own."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "verl"))


def _verl_layout(tokenizer, prompts, lengths, left_padded_prompts, seed=0):
    """verl's [prompt | response] layout with one attention mask over both; responses right-padded,
    prompts left-padded (the rollout's batch) or right-padded (the v1 trainer's reward input)."""
    from rto.lm.rollout import encode_prompts

    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts)  # left-padded
    if not left_padded_prompts:
        order = torch.argsort(1 - prompt_mask, dim=1, stable=True)  # the real tokens first, in order
        prompt_ids, prompt_mask = prompt_ids.gather(1, order), prompt_mask.gather(1, order)
    g = torch.Generator().manual_seed(seed)
    R = max(lengths) + 1
    responses = torch.full((len(prompts), R), tokenizer.pad_token_id)
    response_mask = torch.zeros((len(prompts), R), dtype=torch.long)
    for i, n in enumerate(lengths):
        responses[i, :n] = torch.randint(5, len(tokenizer) - 1, (n,), generator=g)
        response_mask[i, :n] = 1
    return prompt_ids, prompt_mask, responses, response_mask


@pytest.mark.parametrize("left_padded_prompts", [True, False], ids=["legacy-trainer", "v1-trainer"])
def test_rto_token_rewards_on_verls_layout(tiny_dirs, prompt_file, left_padded_prompts):
    import rto_reward

    from rto.core.rewards import dpo_token_term, token_rewards
    from rto.io.prompt_pool import read_prompts
    from rto.lm.models import load_causal_lm, load_tokenizer
    from rto.lm.rollout import Batch, encode_prompts
    from rto.lm.scoring import response_logits, token_logprobs

    tokenizer = load_tokenizer(tiny_dirs["policy"])
    prompts = read_prompts(prompt_file, tokenizer, max_len=64)[:4]
    lengths = [5, 2, 7, 1]
    prompt_ids, prompt_mask, responses, response_mask = _verl_layout(tokenizer, prompts, lengths, left_padded_prompts)
    assert (prompt_mask == 0).any(), "the test needs padded prompts"
    attention_mask = torch.cat([prompt_mask, response_mask], 1)

    # This trainer's own log-probs, on its own (left-padded) batch.
    left_ids, left_mask = encode_prompts(tokenizer, prompts)
    ours = Batch(left_ids, left_mask, responses, response_mask)
    ref_model, dpo_model = load_causal_lm(tiny_dirs["policy"]), load_causal_lm(tiny_dirs["dpo"])
    with torch.no_grad():
        ref_logp = token_logprobs(response_logits(ref_model, ours), ours.response_ids)
        dpo_logp = token_logprobs(response_logits(dpo_model, ours), ours.response_ids)
    scores = torch.tensor([0.5, -1.0, 12.0, 0.25])  # 12 is past the score clip
    dense, _ = dpo_token_term(dpo_logp, ref_logp, response_mask, 0.5, None)
    expected = token_rewards(
        "rto", mask=response_mask, kl=torch.zeros_like(dense), kl_coef=0.0, score=scores.clamp(-10, 10), dpo_term=dense
    )
    assert dense.abs().sum() > 0, "a DPO term of 0 everywhere would make the comparison prove nothing"

    per_sample = []
    for i in range(len(prompts)):
        p, r = rto_reward.sample_tokens(prompt_ids[i], responses[i], attention_mask[i])
        assert p.tolist() == left_ids[i][left_mask[i].bool()].tolist() and len(r) == lengths[i]
        dpo = rto_reward.response_token_logprobs(dpo_model, p, r)
        ref = rto_reward.response_token_logprobs(ref_model, p, r)
        torch.testing.assert_close(dpo, dpo_logp[i, : lengths[i]], atol=1e-5, rtol=1e-5)
        rewards, info = rto_reward.rto_token_rewards(
            dpo, ref, float(scores[i]), beta1=0.5, dpo_clip=None, score_clip=10.0
        )
        assert info["dpo_term_sum"] == pytest.approx(float(dense[i].sum()), abs=1e-5)
        per_sample.append(rewards.tolist())
    # verl's rm_scores [B, R]: the token rewards on each response's tokens, the RM score on its last.
    rm_scores = rto_reward.place_token_rewards(prompt_ids, responses, attention_mask, per_sample)
    torch.testing.assert_close(rm_scores, expected, atol=1e-5, rtol=1e-5)
    assert (rm_scores[response_mask == 0] == 0).all()


def test_token_rewards_clip_and_refuse_what_verl_would_misplace():
    import rto_reward

    dpo, ref = torch.tensor([0.0, -1.0, -3.0]), torch.tensor([-2.0, -1.0, 0.0])
    rewards, info = rto_reward.rto_token_rewards(dpo, ref, 2.0, beta1=0.1, dpo_clip=0.15, rm_weight=0.5)
    torch.testing.assert_close(rewards, torch.tensor([0.15, 0.0, -0.15 + 1.0]))
    assert info["dpo_clip_frac"] == pytest.approx(2 / 3)
    prompts, responses = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="sample 1 has 4 response tokens but 1"):
        rto_reward.place_token_rewards(prompts, responses, attention_mask, [[1.0, 2.0], [3.0]])  # a scalar's place


def test_manager_needs_verl():
    import rto_reward

    if rto_reward._verl_registry is not None:
        pytest.skip("verl is installed here: integrations/verl checks the manager")
    with pytest.raises(ImportError, match="verl"):
        rto_reward.RTORewardManager(None, None, None)
