"""`ordered`: write the prompt's symbols in a secret order - a gold reward that is no sum over tokens.

Prompt: `prompt_len` distinct symbols out of `n_symbols`, then `<sep>`.
Response: symbols, then `<eos>`.

Gold reward, in [-inf, 1]: (L - extra_penalty x E) / prompt_len, where L is the length of the
longest subsequence of the response's prompt symbols (first occurrences) that follows a secret
ranking of all symbols, and E counts the other tokens (symbols not in the prompt, repeats). The
best response is the prompt's symbols sorted by the secret ranking (gold 1.0).

What it tests: whether RTO's dense token reward helps where the gold reward depends on the
order of the whole response. No token has a credit of its own - moving one symbol changes which
others count - so the DPO model's per-token log-ratio is at best a heuristic ("this symbol goes
early") that can mislead as well as help, and the sequence-level RM must judge an ordering.
This is the kind of task on which keyed's settings drove PPO and RTO below SFT (issue 13).

Teacher: knows which symbols to write but not their order - a random permutation of the prompt's
symbols, each dropped with probability `teacher_drop` and followed by a stray symbol with
probability `teacher_stray`. Its mean gold reward is about 0.43 of the achievable 1.0
(tests/test_tasks_new.py measures it).
"""

from __future__ import annotations

import bisect
import random

from rto.tasks.symbols import EOS, SymbolTask, response_symbols, symbol_presets


def longest_increasing(values: list[int]) -> int:
    """Length of the longest strictly increasing subsequence (patience sorting, O(n log n))."""
    tails: list[int] = []
    for v in values:
        i = bisect.bisect_left(tails, v)
        tails[i : i + 1] = [v]
    return len(tails)


class OrderedTask(SymbolTask):
    name = "ordered"

    def __init__(self, seed=0, n_symbols=32, prompt_len=8, extra_penalty=0.5, teacher_drop=0.05, teacher_stray=0.05):
        super().__init__(seed, n_symbols, prompt_len)
        self.extra_penalty, self.teacher_drop, self.teacher_stray = extra_penalty, teacher_drop, teacher_stray
        rng = random.Random(f"ordered-secret-{seed}")
        order = self.symbols[:]
        rng.shuffle(order)
        self.rank = {s: i for i, s in enumerate(order)}

    def demonstration(self, prompt: str, rng: random.Random) -> str:
        symbols = self.prompt_symbols(prompt)
        rng.shuffle(symbols)
        out = []
        for s in symbols:
            if rng.random() >= self.teacher_drop:
                out.append(s)
            if rng.random() < self.teacher_stray:
                out.append(rng.choice(self.symbols))
        return " ".join(out) + " " + EOS

    def best_response(self, prompt: str) -> str:
        return " ".join(sorted(self.prompt_symbols(prompt), key=self.rank.__getitem__)) + " " + EOS

    def gold_parts(self, prompt: str, response: str) -> dict[str, float]:
        wanted = set(self.prompt_symbols(prompt))
        seen: set[str] = set()
        kept, extra = [], 0
        for s in response_symbols(response):
            if s in wanted and s not in seen:
                seen.add(s)
                kept.append(self.rank[s])
            else:
                extra += 1
        return {
            "order": longest_increasing(kept) / self.prompt_len,
            "extra": -self.extra_penalty * extra / self.prompt_len,
        }

    def gold_reward(self, prompt: str, response: str) -> float:
        return float(sum(self.gold_parts(prompt, response).values()))

    # The RL schedule; learning rate, KL coefficient and beta1 for `--preset tuned` come from
    # `rto tune` (rto/tasks/presets/ordered.yaml).
    presets = symbol_presets(16)
