"""`count`: write as many "wanted" symbols as a target asks - a sequence-level property that a
last-token reward model learns well, so PPO is the strong baseline it is in the paper.

Prompt: `prompt_len` distinct symbols out of `n_symbols`, then `<sep>` (the prompt sets nothing:
the property is the same for every prompt). Response: up to `response_len` symbols, then `<eos>`.

Gold reward, in [0, 1]: 1 - |n - target| / target, where n counts the response's tokens from a
secret set of `n_wanted` symbols (floored at 0). Fewer than `target` is too few; more is too
many: the best responses hold exactly `target` wanted symbols.

What it tests: a task where RTO's advantage is not built in. A count is what a last-token RM
learns easily (one attention hop: its held-out accuracy is high), while the DPO model's token
log-ratio can only say "a wanted symbol is good here" - it cannot see that the count is reached,
so its dense reward may push past the target. If RTO wins here, it wins without help; if PPO
wins, that is the paper's baseline doing what it should.

Teacher: writes `response_len - 2` to `response_len` symbols, each from the wanted set with a
probability drawn per demonstration from U(0.05, 0.75), so its responses fall on both sides of
the target (the RM sees both). Its mean gold reward is about 0.57 of the achievable 1.0
(tests/test_tasks_new.py measures it).
"""

from __future__ import annotations

import random

from rto.tasks.symbols import EOS, SymbolTask, response_symbols, symbol_presets


class CountTask(SymbolTask):
    name = "count"

    def __init__(self, seed=0, n_symbols=32, prompt_len=8, response_len=16, n_wanted=8, target=8):
        super().__init__(seed, n_symbols, prompt_len)
        self.response_len, self.target = response_len, target
        rng = random.Random(f"count-secret-{seed}")
        self.wanted = set(rng.sample(self.symbols, n_wanted))
        self.others = [s for s in self.symbols if s not in self.wanted]

    def demonstration(self, prompt: str, rng: random.Random) -> str:
        p = rng.uniform(0.05, 0.75)
        wanted = sorted(self.wanted)
        out = [
            rng.choice(wanted) if rng.random() < p else rng.choice(self.others)
            for _ in range(rng.randint(self.response_len - 2, self.response_len))
        ]
        return " ".join(out) + " " + EOS

    def gold_reward(self, prompt: str, response: str) -> float:
        n = sum(s in self.wanted for s in response_symbols(response))
        return max(0.0, 1.0 - abs(n - self.target) / self.target)

    # The RL schedule; learning rate, KL coefficient and beta1 for `--preset tuned` come from
    # `rto tune` (rto/tasks/presets/count.yaml).
    presets = symbol_presets(20)
