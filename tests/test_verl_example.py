"""examples/verl/rto_reward.py on verl's batch layout (prompts left-padded, responses right-padded,
one attention mask over both), without verl: its DPO log-probs equal this trainer's own, and its
token scores are RTO's reward (DPO term on every token, RM score on the last one)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "verl"))


def _verl_batch(tokenizer, prompts, lengths, seed=0):
    """A verl-style DataProto.batch: tensors keyed as verl keys them."""
    from rto.rollout import encode_prompts

    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts)
    g = torch.Generator().manual_seed(seed)
    R = max(lengths)
    responses = torch.full((len(prompts), R), tokenizer.pad_token_id)
    response_mask = torch.zeros((len(prompts), R), dtype=torch.long)
    for i, n in enumerate(lengths):
        responses[i, :n] = torch.randint(5, len(tokenizer) - 1, (n,), generator=g)
        response_mask[i, :n] = 1
    return {"prompts": prompt_ids, "responses": responses, "input_ids": torch.cat([prompt_ids, responses], 1),
            "attention_mask": torch.cat([prompt_mask, response_mask], 1)}, prompt_mask, response_mask


def test_rto_reward_manager_on_verls_layout(tiny_dirs, prompt_file):
    import rto_reward

    from rto.core.rewards import dpo_token_term, token_rewards
    from rto.data import read_prompts
    from rto.models import load_causal_lm, load_tokenizer
    from rto.rollout import Batch, response_logits, token_logprobs

    tokenizer = load_tokenizer(tiny_dirs["policy"])
    prompts = read_prompts(prompt_file, tokenizer, max_len=64)[:4]
    batch, prompt_mask, response_mask = _verl_batch(tokenizer, prompts, [5, 2, 7, 1])
    assert (prompt_mask == 0).any(), "verl's prompts are left-padded: the test needs some padding"
    ours = Batch(batch["prompts"], prompt_mask, batch["responses"], response_mask)
    with torch.no_grad():
        ref_logp = token_logprobs(response_logits(load_causal_lm(tiny_dirs["policy"]), ours), ours.response_ids)
        dpo_logp = token_logprobs(response_logits(load_causal_lm(tiny_dirs["dpo"]), ours), ours.response_ids)
    batch["ref_log_prob"] = ref_logp * response_mask
    last = response_mask.sum(-1) - 1
    batch["rm_scores"] = torch.zeros(response_mask.shape)
    batch["rm_scores"][torch.arange(4), last] = torch.tensor([0.5, -1.0, 2.0, 0.25])

    manager = rto_reward.RTORewardManager(beta1=0.5, dpo_clip=None, dpo_model=tiny_dirs["dpo"])
    scores = manager(SimpleNamespace(batch=batch))
    # The example's own DPO log-probs (verl's layout) are this trainer's, token for token.
    torch.testing.assert_close(batch["dpo_log_prob"], dpo_logp * response_mask, atol=1e-5, rtol=1e-5)
    dense, _ = dpo_token_term(dpo_logp, ref_logp, response_mask, 0.5, None)
    expected = token_rewards("rto", mask=response_mask, kl=torch.zeros_like(dense), kl_coef=0.0,
                             score=torch.tensor([0.5, -1.0, 2.0, 0.25]), dpo_term=dense)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert (scores[response_mask == 0] == 0).all()
    assert dense.abs().sum() > 0, "a DPO term of 0 everywhere would make the comparison above prove nothing"
    # The RM score sits on each response's last token, with that token's DPO term.
    torch.testing.assert_close(scores[torch.arange(4), last] - dense[torch.arange(4), last],
                               torch.tensor([0.5, -1.0, 2.0, 0.25]))
    assert manager(SimpleNamespace(batch=batch), return_dict=True)["reward_tensor"].shape == scores.shape

    # A response mask with a gap is refused, not read as something else.
    broken = dict(batch, attention_mask=batch["attention_mask"].clone())
    broken["attention_mask"][2, -batch["responses"].shape[1] + 1] = 0
    with pytest.raises(ValueError, match="row 2 has gaps"):
        rto_reward.rto_token_scores(broken)
