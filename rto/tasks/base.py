"""The Task interface: what a testbed with a known ("gold") reward provides.

A task owns its vocabulary (a tokenizer), a seeded prompt sampler with disjoint
train/dev/test splits, an imperfect teacher that writes SFT demonstrations, and
the gold reward. Everything is text in, text out, so the stages treat a task's
data exactly like a user's JSONL files.
"""

from __future__ import annotations

import random
import zlib
from abc import ABC, abstractmethod
from typing import Any

SPLITS = ("train", "dev", "test")


class Task(ABC):
    """Base class for a task. Subclass it and point `--task pkg.module:Class` at it."""

    name: str = "task"
    # Stage settings per preset, e.g. {"smoke": {"sft": {"epochs": 1}, "ppo": {...}}};
    # "default" with no settings runs every stage with the library defaults.
    presets: dict[str, dict[str, dict[str, Any]]] = {"default": {}}

    def __init__(self, seed: int = 0):
        self.seed = seed

    # --- vocabulary and model -------------------------------------------------
    @abstractmethod
    def tokenizer(self):
        """A Hugging Face tokenizer with pad and eos tokens (pad != eos)."""

    def model_config(self) -> dict[str, Any]:
        """Keyword arguments for a small `LlamaConfig` to start from when no model is given."""
        return {}

    # --- prompts --------------------------------------------------------------
    @abstractmethod
    def random_prompt(self, rng: random.Random) -> str:
        """One prompt, drawn with `rng`."""

    def split_of(self, prompt: str) -> str:
        """Which split a prompt belongs to: a stable hash, so the splits never overlap."""
        bucket = zlib.crc32(prompt.encode()) % 10
        return "test" if bucket == 0 else "dev" if bucket == 1 else "train"

    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        """`n` distinct prompts of `split`, the same for the same seed."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.seed}/{split}/{seed}")
        seen: set[str] = set()
        out: list[str] = []
        for _ in range(1000 * n + 1000):
            if len(out) == n:
                return out
            p = self.random_prompt(rng)
            if p not in seen and self.split_of(p) == split:
                seen.add(p)
                out.append(p)
        raise RuntimeError(f"task {self.name}: could not draw {n} distinct {split} prompts")

    # --- teacher and gold reward ----------------------------------------------
    @abstractmethod
    def demonstration(self, prompt: str, rng: random.Random) -> str:
        """An (imperfect) response written by the teacher, ending with the EOS token."""

    @abstractmethod
    def gold_reward(self, prompt: str, response: str) -> float:
        """The true reward of a response (decoded text, EOS included if generated)."""

    def gold_rewards(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Gold rewards of many responses; override where scoring in batches is cheaper (a model judge)."""
        return [self.gold_reward(p, r) for p, r in zip(prompts, responses)]

    def gold_parts(self, prompt: str, response: str) -> dict[str, float]:
        """Named parts of the gold reward (summing to it), for reports; empty if not split."""
        return {}

    def gold_token_rewards(self, prompt: str, response_tokens: list[str]) -> list[float] | None:
        """Per-token gold reward summing to `gold_reward`, or None where the task has none."""
        return None
