"""`keyed`: the built-in testbed, a symbol task whose gold reward is exact code.

Prompt: `prompt_len` distinct symbols out of `n_symbols`, then `<sep>`.
Response: symbols, then `<eos>`.

Gold reward = local + global, in [0, 1 + bonus_weight]:
- local (sparse, localised credit): every `score_every`-th response position t
  (t = 0, 3, 6, ...) is right when it equals key[prompt[t // score_every]], a
  fixed secret permutation of the prompt symbol it points at. Local = hits /
  number of scored positions. Only a third of the tokens matter, and which
  ones matter is never said: the situation RTO's dense reward is meant for.
- global (a count constraint no single token decides): bonus_weight x
  min(n, bonus_target) / bonus_target, where n counts the response's tokens
  from a secret set of `n_bonus` "bonus" symbols. Past the target, more bonus
  symbols are worth nothing. The teacher writes about 4 of the 10 wanted and
  almost never reaches the target, so offline data shows the direction but
  not the optimum: that is what the reward model and online RL can add.

Per token (`gold_token_rewards`, used by the dense-gold reference and the token heat-map),
each token gets its marginal credit: 1 / n_scored for a right scored symbol, bonus_weight /
bonus_target for each of the first bonus_target bonus symbols.

Why these two parts: a last-token reward model on a small transformer learns
a count easily (one attention hop) but hardly learns the positional key (it
must compare each scored token with a prompt symbol, then aggregate); DPO's
per-token log-ratio learns the key well. A prototype with only the local part
found an RM near chance and offline DPO already near the optimum.

Teacher: right on a scored position with probability `teacher_accuracy`,
otherwise a wrong symbol; elsewhere it follows a hidden bigram habit. Its
length varies between response_len - 2 and response_len. Its mean gold reward
is about 0.94 of an achievable 2.0 (0.941 over 20,000 demonstrations; tests/test_task.py computes it exactly).
"""

from __future__ import annotations

import math
import random

from rto.tasks.symbols import EOS, SEP, SymbolTask, split_tokens, symbol_presets

__all__ = ["KeyedTask", "split_tokens", "SEGMENT_DELIMITERS", "EOS", "SEP"]
# Keyed text has no sentences; for Semi-RTO these four symbols (1 token in 8) end a segment.
SEGMENT_DELIMITERS = ["s0", "s1", "s2", "s3"]


class KeyedTask(SymbolTask):
    name = "keyed"

    def __init__(
        self,
        seed: int = 0,
        n_symbols: int = 32,
        prompt_len: int = 8,
        response_len: int = 18,
        score_every: int = 3,
        teacher_accuracy: float = 0.5,
        n_bonus: int = 8,
        bonus_target: int = 10,
        bonus_weight: float = 1.0,
        teacher_habit: float = 0.8,
    ):
        super().__init__(seed, n_symbols, prompt_len)
        self.response_len = response_len
        self.score_every, self.teacher_accuracy = score_every, teacher_accuracy
        self.bonus_target, self.bonus_weight, self.teacher_habit = bonus_target, bonus_weight, teacher_habit
        rng = random.Random(f"keyed-secret-{seed}")
        shuffled = self.symbols[:]
        rng.shuffle(shuffled)
        self.key = dict(zip(self.symbols, shuffled))
        # The teacher's habit: each symbol has 3 favourite successors.
        self.successors = {s: rng.sample(self.symbols, 3) for s in self.symbols}
        self.bonus = set(rng.sample(self.symbols, n_bonus))
        self.n_scored = math.ceil(response_len / score_every)

    # --- teacher -------------------------------------------------------------------------
    def target(self, prompt_symbols: list[str], t: int) -> str | None:
        """The right symbol at response position t, or None if t is not scored."""
        if t % self.score_every or t >= self.response_len:
            return None
        return self.key[prompt_symbols[(t // self.score_every) % len(prompt_symbols)]]

    def demonstration(self, prompt: str, rng: random.Random) -> str:
        ps = self.prompt_symbols(prompt)
        out: list[str] = []
        for t in range(rng.randint(self.response_len - 2, self.response_len)):
            want = self.target(ps, t)
            if want is not None:
                right = rng.random() < self.teacher_accuracy
                out.append(want if right else rng.choice([s for s in self.symbols if s != want]))
            elif out and rng.random() < self.teacher_habit:
                out.append(rng.choice(self.successors[out[-1]]))
            else:
                out.append(rng.choice(self.symbols))
        return " ".join(out) + " " + EOS

    # --- gold reward -------------------------------------------------------------
    def _parts(self, prompt: str, response_tokens: list[str]) -> tuple[list[float], float]:
        """(local reward of each token, global count reward)."""
        ps = self.prompt_symbols(prompt)
        local = [0.0] * len(response_tokens)
        for t, tok in enumerate(response_tokens):
            if tok == EOS:
                break
            if tok == self.target(ps, t):
                local[t] = 1.0 / self.n_scored
        n = sum(tok in self.bonus for tok in response_tokens)
        return local, self.bonus_weight * min(n, self.bonus_target) / self.bonus_target

    def gold_token_rewards(self, prompt: str, response_tokens: list[str]) -> list[float]:
        """Each token's marginal credit: a right scored symbol earns 1 / n_scored, and each of the
        first `bonus_target` bonus symbols earns bonus_weight / bonus_target (later ones nothing)."""
        rewards, _ = self._parts(prompt, response_tokens)
        paid = 0
        for t, tok in enumerate(response_tokens):
            if tok in self.bonus and paid < self.bonus_target:
                rewards[t] += self.bonus_weight / self.bonus_target
                paid += 1
        return rewards

    def gold_parts(self, prompt: str, response: str) -> dict[str, float]:
        tokens = split_tokens(response)
        local, count = self._parts(prompt, tokens)
        return {"local": sum(local), "count": count if tokens else 0.0}

    def gold_reward(self, prompt: str, response: str) -> float:
        return float(sum(self.gold_token_rewards(prompt, split_tokens(response))))

    # Settings of each stage for this task; `rto pipeline --preset NAME` picks one (`tuned`: rto tune's).
    # The default RL settings were chosen on the dev split before `rto tune` existed (runs of `rto ppo`
    # with everything else fixed, seed 0): kl_coef for PPO from {0.01: 1.20, 0.05: 1.29, 0.2: 1.21}
    # (dev gold reward after 100 iterations); RTO inherits it and tunes only beta1/dpo_clip, from
    # (0.05, 0.05): 1.55, (0.1, 0.1): 1.59, (0.3, 0.3): 1.63, (1.0, 1.0): 1.61 at kl_coef 0.01, and
    # 1.68 for (0.3, 0.3) at kl_coef 0.05. The clip keeps the reference code's ratio: the log-ratio is
    # clipped at +-1. The library defaults (0.05, 0.05, 0.01) are the reference code's.
    presets = symbol_presets(
        24,
        smoke_ppo={"segment_delimiters": SEGMENT_DELIMITERS},
        default_ppo={"kl_coef": 0.05, "beta1": 0.3, "dpo_clip": 0.3, "segment_delimiters": SEGMENT_DELIMITERS},
    )
