"""The scoring passes: a model's logits, log-probs, values and scores on the response tokens of a
`Batch` (padded, or packed without padding), and scoring whole texts with a reward model.

Every pass reads only the response slots: slot t holds token t's quantity (rto.lm.rollout's layout)."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from rto.lm.models import score_parts
from rto.lm.rollout import Batch, Packed, encode_responses, position_ids, sampling_logits


def _gather(flat_outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[rows, L, ...] outputs at flat positions `index` ([B, R] or [B]) -> [B, R, ...] / [B, ...]."""
    flat = flat_outputs.reshape(-1, *flat_outputs.shape[2:])
    return flat[index]


def keeps_logits(model) -> bool:
    """Whether the model underneath (through a peft wrapper or an adapter view) takes `logits_to_keep`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(inner))


@functools.cache
def _forward_takes_logits_to_keep(cls) -> bool:
    # Read once per class: this sits on every scoring and training pass.
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def response_logits(model, batch: Batch, packed: Packed | None = None) -> torch.Tensor:
    """Logits that predict each response token: [B, R, V]."""
    if packed is not None:
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        return _gather(logits, packed.response_index)
    attn = batch.attention_mask
    R = batch.response_ids.shape[1]
    # Logits of the last R + 1 positions only: the LM head skips the prompt (a large saving
    # for real vocabularies); models without `logits_to_keep` compute all and get sliced.
    keep = {"logits_to_keep": R + 1} if keeps_logits(model) else {}
    logits = model(
        input_ids=batch.input_ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False, **keep
    ).logits
    return logits[:, -(R + 1) : -1]


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """log-prob of `tokens` under softmax(logits / temperature), or under the top-k/top-p truncated
    distribution sampling draws from (`sampling_logits`).

    Truncated: the support is the warpers' kept set for these logits plus the token itself, so a
    sampled token is never impossible - at rollout time it is always in the kept set and this is
    exactly the sampling distribution's log-prob; after an update moved it just out of the kept
    set, its log-prob stays finite (the PPO ratio then clips as for any improbable token)."""
    if top_k or top_p < 1.0:
        raw = logits.float() / temperature if temperature != 1.0 else logits.float()
        kept = sampling_logits(logits, temperature, top_k, top_p)
        index = tokens.unsqueeze(-1)
        kept = kept.scatter(-1, index, raw.gather(-1, index))
        return torch.log_softmax(kept, dim=-1).gather(-1, index).squeeze(-1)
    # Without truncation: the picked logit minus the log-normaliser, without materialising the
    # full log-softmax.
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_scores(score_model, batch: Batch, packed: Packed | None = None) -> torch.Tensor:
    """The score head at every position: [B, P + R] padded, or [rows, L] packed.

    Read from one call of the model's own forward (its head's output, caught by a hook): a
    sharded model (rto.runtime.sharding) gathers its weights in that forward, so its backbone and head
    are never called apart. The LoRA critic (rto.lm.lora.CriticView) reads its own."""
    if packed is not None:
        inputs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    else:
        attn = batch.attention_mask
        inputs = dict(input_ids=batch.input_ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False)
    if hasattr(score_model, "token_scores"):
        return score_model.token_scores(**inputs)
    _, head = score_parts(score_model)
    caught: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        with _pooling_pad_id(score_model):
            score_model(**inputs)
    finally:
        hook.remove()
    return caught[-1].squeeze(-1)


@contextlib.contextmanager
def _pooling_pad_id(score_model):
    """A placeholder pad id in the config while the forward runs, where the config names none.

    transformers' sequence-classification forward pools its head's output at the last non-pad
    token, found with `config.pad_token_id`, and refuses batches of more than one without it;
    many hub checkpoints (Llama's family) keep the pad id only in the tokenizer. Scores here are
    the head's per-token output (caught above), never that pooled value, so any id serves; -1
    matches no token. The config is put back as it was."""
    config = getattr(score_model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is None or getattr(text_config, "pad_token_id", 0) is not None:
        yield
        return
    text_config.pad_token_id = -1
    try:
        yield
    finally:
        text_config.pad_token_id = None


def token_values(critic, batch: Batch, packed: Packed | None = None) -> torch.Tensor:
    """V(s_t) for every response slot t: [B, R]."""
    v = token_scores(critic, batch, packed)
    v = _gather(v, packed.response_index) if packed is not None else v[:, batch.prompt_len - 1 : -1]
    return v.float()


def sequence_scores(reward_model, batch: Batch, packed: Packed | None = None) -> torch.Tensor:
    """The RM's score read at each response's last token (EOS included): [B]."""
    s = token_scores(reward_model, batch, packed)
    if packed is not None:
        return _gather(s, packed.last_index).float()
    last = batch.prompt_len + (batch.response_mask.sum(-1) - 1).clamp(min=0)
    return s[torch.arange(s.shape[0], device=s.device), last].float()


@torch.no_grad()
def score_texts(
    reward_model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 256
) -> torch.Tensor:
    """RM scores of (prompt, response) texts: [N]."""
    out = []
    device = next(reward_model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        batch = encode_responses(tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size])
        batch = Batch(
            *(t.to(device) for t in (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask))
        )
        out.append(sequence_scores(reward_model, batch).cpu())
    return torch.cat(out) if out else torch.zeros(0)
