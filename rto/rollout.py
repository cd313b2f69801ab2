"""Rollouts: left-padded prompts -> sampled responses -> the scoring passes.

Layout: `input_ids` = prompt (left-padded to P) + response (right-padded to R).
Every per-token quantity is [B, R] and aligned with the response tokens:
the log-prob of response token t comes from the logits at position P + t - 1,
and the critic's value V(s_t) from the hidden state at the same position.
Position ids come from the attention mask, so left padding never shifts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rto.models import score_parts


@dataclass
class Batch:
    """Prompts and sampled responses; P = prompt_ids.shape[1], R = response_ids.shape[1]."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    def select(self, idx: torch.Tensor) -> "Batch":
        return Batch(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx])


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int | None = None):
    """Left-padded prompt ids and mask."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                    truncation=max_prompt_len is not None, max_length=max_prompt_len)
    return enc["input_ids"], enc["attention_mask"]


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS (everything, if there is no EOS)."""
    is_eos = response_ids == eos_id
    after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


@torch.no_grad()
def generate(policy, tokenizer, prompt_ids, prompt_mask, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> Batch:
    """Sample responses (HF generate with a KV cache); tokens after EOS become pad."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=not greedy, temperature=temperature if not greedy else None,
        top_k=top_k if not greedy else None, top_p=top_p if not greedy else None,
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    response_ids = out[:, prompt_ids.shape[1]:]
    mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    response_ids = response_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Batch(prompt_ids, prompt_mask, response_ids, mask)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(model, batch: Batch) -> torch.Tensor:
    """Logits that predict each response token: [B, R, V]."""
    attn = batch.attention_mask
    logits = model(input_ids=batch.input_ids, attention_mask=attn, position_ids=position_ids(attn),
                   use_cache=False).logits
    p = batch.prompt_len
    return logits[:, p - 1:-1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token], without materialising the full log-softmax."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def hidden_states(score_model, batch: Batch) -> torch.Tensor:
    backbone, _ = score_parts(score_model)
    attn = batch.attention_mask
    return backbone(input_ids=batch.input_ids, attention_mask=attn, position_ids=position_ids(attn),
                    use_cache=False).last_hidden_state


def token_values(critic, batch: Batch) -> torch.Tensor:
    """V(s_t) for every response slot t: [B, R]."""
    _, head = score_parts(critic)
    h = hidden_states(critic, batch)
    p = batch.prompt_len
    return head(h[:, p - 1:-1]).squeeze(-1).float()


def sequence_scores(reward_model, batch: Batch) -> torch.Tensor:
    """The RM's score read at each response's last token (EOS included): [B]."""
    _, head = score_parts(reward_model)
    h = hidden_states(reward_model, batch)
    last = batch.prompt_len + (batch.response_mask.sum(-1) - 1).clamp(min=0)
    picked = h[torch.arange(h.shape[0]), last]
    return head(picked).squeeze(-1).float()


def decode_responses(tokenizer, batch: Batch) -> list[str]:
    """Response texts with special tokens kept (EOS shows whether the response ended)."""
    out = []
    for ids, m in zip(batch.response_ids.tolist(), batch.response_mask.tolist()):
        n = sum(m)
        out.append(tokenizer.decode(ids[:n], skip_special_tokens=False))
    return out


def encode_responses(tokenizer, prompts: list[str], responses: list[str], max_prompt_len: int | None = None) -> Batch:
    """A Batch from texts: prompts left-padded, responses right-padded (EOS appended if missing,
    as TRL's trainers do), so scoring text and scoring a rollout read the same slots."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_len)
    eos = tokenizer.eos_token
    texts = [r if r.endswith(eos) else r + eos for r in responses]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    return Batch(prompt_ids, prompt_mask, enc["input_ids"], enc["attention_mask"])


@torch.no_grad()
def score_texts(reward_model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 256) -> torch.Tensor:
    """RM scores of (prompt, response) texts: [N]."""
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = encode_responses(tokenizer, prompts[i:i + batch_size], responses[i:i + batch_size])
        out.append(sequence_scores(reward_model, batch))
    return torch.cat(out) if out else torch.zeros(0)
