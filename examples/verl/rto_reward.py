"""RTO's dense token reward inside verl: a reward manager that returns token-level scores.

verl keeps a reward manager's [batch, response] tensor token by token (`token_level_scores`,
then `token_level_rewards` once `algorithm.use_kl_in_reward` has added the KL penalty) as long as:
  - the legacy reward path runs it: `reward_model.use_reward_loop=False` (the reward loop keeps
    one score per response and puts it on the last token);
  - the advantage estimator reads rewards per token: `algorithm.adv_estimator=gae` (PPO with a
    critic, RTO's setting) or `reinforce_plus_plus`; GRPO and RLOO sum a response's token
    rewards into one score first.
Run verl with this file on its PYTHONPATH and
    reward_model.use_reward_loop=False reward_model.reward_manager=rto algorithm.adv_estimator=gae
    algorithm.use_kl_in_reward=True algorithm.kl_penalty=kl
(verl adds beta2 * KL per token itself; RTO's KL term is that).

The batch, in verl's layout (`DataProto.batch`): `responses` [B, R] right-padded, `attention_mask`
[B, P + R] (prompt left-padded, response right-padded), `rm_scores` [B, R] from verl's reward-model
worker (the score on each response's last token), and the DPO term's two log-probs per response
token: `dpo_log_prob` (the DPO model's) and `ref_log_prob` (its reference, the SFT model: verl's
reference worker computes it when the KL is on). verl has no worker for a second frozen policy; at
scale run its reference worker class a second time on the DPO model's weights and add the result as
`dpo_log_prob` (verl's PRIME recipe computes the same log-ratio with its implicit-PRM worker). For a
small run, `DPOLogProbs` computes it in the reward manager's process.

Only torch and rto.core are needed to compute the reward (tests/test_verl_example.py checks it on
verl's batch layout without verl installed); verl itself only for the registration.
"""

from __future__ import annotations

import torch

from rto.core.rewards import dpo_token_term, token_rewards


def response_mask(batch) -> torch.Tensor:
    """[B, R]: 1 on response tokens, from verl's attention mask (its last R columns)."""
    if "response_mask" in batch.keys():
        return batch["response_mask"].long()
    return batch["attention_mask"][:, -batch["responses"].shape[1]:].long()


def rto_token_scores(batch, beta1: float = 0.05, dpo_clip: float | None = 0.05, rm_weight: float = 1.0,
                     score_clip: float | None = 10.0) -> torch.Tensor:
    """RTO's reward without the KL penalty (verl adds that): clip(beta1 * (log pi_dpo - log pi_ref))
    on every response token, plus the RM score on the last one. [B, R], 0 on padding."""
    mask = response_mask(batch)
    dense, _ = dpo_token_term(batch["dpo_log_prob"].float(), batch["ref_log_prob"].float(), mask, beta1, dpo_clip)
    score = batch["rm_scores"].float().sum(-1) if "rm_scores" in batch.keys() else torch.zeros(mask.shape[0])
    if score_clip is not None:
        score = score.clamp(-score_clip, score_clip)
    return token_rewards("rto", mask=mask, kl=torch.zeros_like(dense), kl_coef=0.0, score=score, dpo_term=dense,
                         rm_weight=rm_weight)


class DPOLogProbs:
    """log pi_dpo of each response token, from a transformers model in this process (small runs)."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        responses = batch["responses"]
        attn = batch["attention_mask"].to(self.device)
        ids = batch["input_ids"].to(self.device)
        positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=attn, position_ids=positions).logits.float()
        R = responses.shape[1]
        logp = torch.log_softmax(logits[:, -R - 1:-1], dim=-1)
        return logp.gather(-1, responses.to(self.device).unsqueeze(-1)).squeeze(-1).cpu() * response_mask(batch)


class RTORewardManager:
    """verl's reward-manager interface: called with a DataProto, returns the [B, R] token scores
    (or {"reward_tensor", "reward_extra_info"} with `return_dict`)."""

    def __init__(self, tokenizer=None, num_examine: int = 0, compute_score=None, reward_fn_key: str = "data_source",
                 beta1: float = 0.05, dpo_clip: float | None = 0.05, dpo_model: str | None = None, **kwargs):
        self.beta1, self.dpo_clip = beta1, dpo_clip
        self.dpo_logprobs = DPOLogProbs(dpo_model) if dpo_model else None

    def __call__(self, data, return_dict: bool = False):
        batch = data.batch
        if "dpo_log_prob" not in batch.keys():
            if self.dpo_logprobs is None:
                raise ValueError("rto reward: the batch has no 'dpo_log_prob' and no dpo_model was given")
            batch["dpo_log_prob"] = self.dpo_logprobs(batch)
        scores = rto_token_scores(batch, self.beta1, self.dpo_clip)
        if return_dict:
            return {"reward_tensor": scores, "reward_extra_info": {}}
        return scores


try:  # registered under `reward_model.reward_manager=rto` where verl is installed
    from verl.workers.reward_manager import register

    RTORewardManager = register("rto")(RTORewardManager)
except ImportError:
    pass
