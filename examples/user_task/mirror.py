"""A user's own task, plugged in with `--task examples/user_task/mirror.py:MirrorTask`.

Write the prompt's symbols backwards. The gold reward is the longest common subsequence of the
response and the reversed prompt, over the prompt's length, minus 0.25 per token of length
difference: it depends on the order of the whole response, not on a sum of per-token terms.
The teacher reverses the prompt but swaps neighbours and drops symbols.

Its `default` preset is what a user new to the project would write: data sizes like the
built-in tasks' and the built-in `keyed` task's RL settings copied as they are, with no tuning
on this task. `rto pipeline` then chooses each RL result on the dev split (its default) and
says how it chose; `--tune` or `rto tune` choose the RL settings on this task's dev split.
"""

from __future__ import annotations

import random

from rto.tasks import KeyedTask
from rto.tasks.symbols import EOS, SymbolTask, response_symbols


def common_subsequence(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b):
            prev, row[j + 1] = row[j + 1], prev + 1 if x == y else max(row[j + 1], row[j])
    return row[-1]


class MirrorTask(SymbolTask):
    name = "mirror"

    def __init__(self, seed: int = 0):
        super().__init__(seed, n_symbols=24, prompt_len=8)

    def demonstration(self, prompt: str, rng: random.Random) -> str:
        out = self.prompt_symbols(prompt)[::-1]
        for i in range(len(out) - 1):
            if rng.random() < 0.35:
                out[i], out[i + 1] = out[i + 1], out[i]
        out = [s for s in out if rng.random() > 0.1]
        return " ".join(out) + " " + EOS

    def gold_reward(self, prompt: str, response: str) -> float:
        want = self.prompt_symbols(prompt)[::-1]
        got = response_symbols(response)
        return common_subsequence(got, want) / len(want) - 0.25 * abs(len(got) - len(want)) / len(want)

    presets = {
        "default": {
            "data": {"n_sft": 4000, "n_rl_prompts": 2048, "n_dev": 128, "n_test": 512},
            "sft": {"epochs": 8, "learning_rate": 3e-3},
            "pairs": {"n_pairs": 2000, "n_heldout": 500, "max_new_tokens": 16},
            "rm": {"epochs": 4, "learning_rate": 1e-3},
            "dpo": {"epochs": 3, "learning_rate": 5e-4},
            # keyed's RL settings, copied as they are (keyed's segment delimiters do not apply here)
            "ppo": {k: v for k, v in KeyedTask.presets["default"]["ppo"].items() if k != "segment_delimiters"}
            | {"max_new_tokens": 16},
            "eval": {"max_new_tokens": 16},
        }
    }
