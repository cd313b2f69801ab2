"""Rollouts: left-padded prompts -> sampled responses -> the scoring passes.

Layout: `input_ids` = prompt (left-padded to P) + response (right-padded to R).
Every per-token quantity is [B, R] and aligned with the response tokens:
the log-prob of response token t comes from the logits at position P + t - 1,
and the critic's value V(s_t) from the hidden state at the same position.
Position ids come from the attention mask, so left padding never shifts them.

Speed (docs/performance.md): the policy's log-probs of the sampled tokens are taken during
generation (no second policy pass); a padded pass asks the model for logits of the response
slots only (`logits_to_keep`); and `pack` turns a batch into padding-free rows - sequences
side by side, position ids restarting at 0 for each, so the model's attention stays within a
sequence - whose outputs are gathered back into the same [B, R] layout, so every per-token
quantity (dense rewards included) is computed exactly as from the padded batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor


@dataclass
class Batch:
    """Prompts and sampled responses; P = prompt_ids.shape[1], R = response_ids.shape[1]."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    # log softmax(logits / T) of each sampled token under the generating policy, when recorded.
    sampled_logprobs: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    def select(self, idx: torch.Tensor) -> Batch:
        return Batch(
            self.prompt_ids[idx],
            self.prompt_mask[idx],
            self.response_ids[idx],
            self.response_mask[idx],
            None if self.sampled_logprobs is None else self.sampled_logprobs[idx],
        )

    def chunks(self, size: int) -> list[Batch]:
        """Consecutive sub-batches of at most `size` sequences (size 0: the whole batch)."""
        n = self.response_ids.shape[0]
        if not size or size >= n:
            return [self]
        return [self.select(torch.arange(i, min(i + size, n))) for i in range(0, n, size)]


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int | None = None):
    """Left-padded prompt ids and mask; a prompt over `max_prompt_len` keeps its end (where the
    instruction and any chat-template header that the response follows sit)."""
    enc = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        truncation=max_prompt_len is not None,
        max_length=max_prompt_len,
        truncation_side="left",
    )
    return enc["input_ids"], enc["attention_mask"]


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS (everything, if there is no EOS)."""
    is_eos = response_ids == eos_id
    after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The logits sampling draws from: divided by the temperature, then top-k, then top-p - the
    warpers HF `generate` applies, in its order, by its own classes - with removed tokens at -inf."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k or top_p < 1.0:
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        flat = logits.reshape(-1, logits.shape[-1])
        if top_k:
            flat = TopKLogitsWarper(top_k)(None, flat)
        if top_p < 1.0:
            flat = TopPLogitsWarper(top_p)(None, flat)
        logits = flat.view_as(logits)
    return logits


class SampledLogprobs(LogitsProcessor):
    """Records the log-prob of each sampled token under the distribution it was sampled from,
    while HF `generate` runs.

    `generate` calls processors with the next-token logits before sampling; the token it picks
    appears in `input_ids` at the next call, so one step's distribution is kept at a time
    (O(B x V) memory; asking `generate` for every step's logits would hold O(B x R x V)).
    Custom processors run before HF's temperature/top-k/top-p warpers, so `scores` are the raw
    logits and the recorder applies the same warpers itself (`sampling_logits`): with --top-k or
    --top-p the recorded log-prob is the truncated, renormalised distribution's, the one the
    token was drawn from - the same quantity the training pass computes (`token_logprobs`)."""

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.last: torch.Tensor | None = None
        self.picked: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.last is not None:
            self.picked.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = torch.log_softmax(sampling_logits(scores, self.temperature, self.top_k, self.top_p), dim=-1)
        return scores

    def finish(self, response_ids: torch.Tensor) -> torch.Tensor:
        picked = [*self.picked, self.last.gather(-1, response_ids[:, -1:]).squeeze(-1)]
        return torch.stack(picked, dim=1)


@contextlib.contextmanager
def plain_generation_config(model):
    """Sample from the model's own distribution: a checkpoint's generation_config.json (say
    repetition_penalty 1.05, top_k 20) would otherwise fill every field we leave unset, and
    responses would come from a distribution the log-probs used for training do not describe."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn: their length limit, the temperature, and the truncation (top-k: 0
    keeps every token; top-p: 1.0 keeps every token)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@torch.no_grad()
def generate(
    policy, tokenizer, prompt_ids, prompt_mask, sampling: Sampling, *, greedy: bool = False, record_logprobs=False
) -> Batch:
    """Sample responses (HF generate: KV cache, stops once every sequence hit EOS); tokens after
    EOS become pad. `record_logprobs` also returns each sampled token's log-prob under the
    distribution it was drawn from (`sampling`'s temperature, top-k and top-p)."""
    from transformers import GenerationConfig, LogitsProcessorList

    s = sampling
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=s.temperature if not greedy else None,
        top_k=s.top_k if not greedy else None,
        top_p=s.top_p if not greedy else None,
        max_new_tokens=s.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    recorder = SampledLogprobs(s.temperature, s.top_k, s.top_p) if record_logprobs else None
    with plain_generation_config(policy):
        out = policy.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder] if recorder else []),
        )
    response_ids = out[:, prompt_ids.shape[1] :]
    mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    logprobs = recorder.finish(response_ids) * mask if recorder else None
    response_ids = response_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Batch(prompt_ids, prompt_mask, response_ids, mask, logprobs)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Packed:
    """A batch as padding-free rows. Each sequence (its prompt without padding, then its response
    up to EOS) sits whole in one row; `position_ids` restart at 0 per sequence, which is how HF
    models tell packed sequences apart when no attention mask is given. `response_index` [B, R]
    points, in the flattened rows, at the position whose output predicts response token t
    (0 at padding slots: read, then masked); `last_index` [B] at each sequence's last token."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    response_index: torch.Tensor
    last_index: torch.Tensor
    n_tokens: int  # real tokens in the rows (the rest is padding)


def pack(batch: Batch, row_tokens: int = 0, pad_id: int = 0) -> Packed:
    """First-fit-decreasing packing into rows of max(row_tokens, longest sequence) tokens.

    The default row length, the longest sequence, never makes a row's attention longer than the
    padded batch's; longer rows suit kernels that skip masked blocks (flash-attention varlen)."""
    P = batch.prompt_len
    R = batch.response_ids.shape[1]
    device = batch.response_ids.device
    prompt_ids, response_ids = batch.prompt_ids.cpu(), batch.response_ids.cpu()  # built on CPU, moved once
    p_len = [int(x) for x in batch.prompt_mask.sum(-1).tolist()]
    r_len = [int(x) for x in batch.response_mask.sum(-1).tolist()]
    lengths = [a + b for a, b in zip(p_len, r_len)]
    capacity = max(row_tokens, max(lengths))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # over sequences, never tokens
        slot = next((r for r, u in enumerate(used) if u + lengths[i] <= capacity), None)
        if slot is None:
            rows.append([])
            used.append(0)
            slot = len(rows) - 1
        rows[slot].append(i)
        used[slot] += lengths[i]
    width = max(used)
    input_ids = torch.full((len(rows), width), pad_id, dtype=batch.response_ids.dtype)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    response_index = torch.zeros((len(lengths), R), dtype=torch.long)
    last_index = torch.zeros(len(lengths), dtype=torch.long)
    for r, members in enumerate(rows):
        off = 0
        for i in members:
            pl, rl = p_len[i], r_len[i]
            input_ids[r, off : off + pl] = prompt_ids[i, P - pl :]
            input_ids[r, off + pl : off + pl + rl] = response_ids[i, :rl]
            pos[r, off : off + pl + rl] = torch.arange(pl + rl)
            flat = r * width + off
            # Response token t sits at flat + pl + t; the output that predicts it, one before.
            response_index[i, :rl] = flat + pl - 1 + torch.arange(rl)
            last_index[i] = flat + pl + rl - 1
            off += pl + rl
        # The row's tail restarts at 0 too: a separate sequence of padding nobody attends to.
        pos[r, off:] = torch.arange(width - off)
    return Packed(input_ids.to(device), pos.to(device), response_index.to(device), last_index.to(device), sum(lengths))


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
