"""Custom per-token rewards: your own functions, added to the PPO/RTO reward with weights.

A custom reward is any function with this signature:

    def my_reward(prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
        # prompt_ids, prompt_mask:     LongTensor [B, P], prompts left-padded
        # response_ids, response_mask: LongTensor [B, R], responses right-padded;
        #                              the mask is 1 on real tokens, EOS included
        # returns a float tensor [B, R]: the reward of each response token
        # (values on padding are ignored)

Name it in the PPO config with a weight, as `module:function=weight` or
`path/to/file.py:function=weight` (weight 1 if omitted):

    custom_rewards: ["my_rewards:no_repeats=0.5", "task:gold=1.0"]

Built-ins, for tasks with a gold reward (testbeds): `task:gold` is the task's
per-token gold reward; `task:gold-sequence` pays the whole gold reward at the
last response token (a perfect sparse reward model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rto.core.rewards import at_last_token
from rto.io.errors import UserError
from rto.io.plugins import import_object

TokenReward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BUILTIN = ("task:gold", "task:gold-sequence")


def parse(item: str) -> tuple[str, float]:
    """'module:function=0.5' -> ('module:function', 0.5)."""
    spec, sep, weight = item.rpartition("=")
    if not sep:
        return item, 1.0
    try:
        return spec, float(weight)
    except ValueError:
        raise UserError(f"custom reward {item!r}: weight {weight!r} is not a number") from None


def task_gold(task, tokenizer, per_token: bool) -> TokenReward:
    """The task's gold reward as a token reward (decodes the tokens, then asks the task)."""

    def reward(prompt_ids, prompt_mask, response_ids, response_mask):
        out = torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device)
        totals = torch.zeros(response_ids.shape[0], device=response_ids.device)
        for b in range(response_ids.shape[0]):
            prompt = tokenizer.decode(prompt_ids[b][prompt_mask[b] > 0], skip_special_tokens=False)
            n = int(response_mask[b].sum())
            tokens = tokenizer.convert_ids_to_tokens(response_ids[b, :n].tolist())
            if per_token:
                values = task.gold_token_rewards(prompt, tokens)
                if values is None:
                    raise UserError(f"custom reward task:gold: task {task.name} has no per-token gold reward")
                out[b, :n] = torch.tensor(values, dtype=torch.float32)
            else:
                totals[b] = task.gold_reward(prompt, tokenizer.decode(response_ids[b, :n], skip_special_tokens=False))
        return out if per_token else at_last_token(totals, response_mask)

    return reward


class CustomRewards:
    """The weighted sum of the configured token rewards."""

    def __init__(self, items: list[str], tokenizer=None, task=None):
        self.terms: list[tuple[str, float, TokenReward]] = []
        for item in items:
            spec, weight = parse(item)
            if spec in BUILTIN:
                if task is None:
                    raise UserError(f"custom reward {spec}: needs --task (a task with a gold reward)")
                fn = task_gold(task, tokenizer, per_token=spec == "task:gold")
            else:
                fn = import_object(spec, "custom reward")
                if not callable(fn):
                    raise UserError(f"custom reward {spec!r} is not a function")
            self.terms.append((spec, weight, fn))

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __call__(self, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
        total = torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device)
        for spec, weight, fn in self.terms:
            value = fn(prompt_ids, prompt_mask, response_ids, response_mask)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(response_ids.shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise UserError(
                    f"custom reward {spec}: must return a tensor of shape "
                    f"{tuple(response_ids.shape)} (batch x response length), got {got}"
                )
            value = value.to(total.device, torch.float32) * response_mask
            if not torch.isfinite(value).all():
                raise UserError(f"custom reward {spec}: returned non-finite values")
            total = total + weight * value
        return total
