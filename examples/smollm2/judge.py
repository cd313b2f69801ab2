"""The example's programmatic judge: VADER sentiment, kept honest by a coherence term.

Sentiment alone rewards stuffing positive words into broken text, so the score is

    gold = VADER compound (-1..1)
         + 0.5 * min(0, mean log-prob of the response under the frozen SFT model - FLOOR)
         - 1 if the response has fewer than 3 words

FLOOR is set below what the SFT model's own samples score (see README), so ordinary
text loses nothing and word salad loses a lot. The judge is also an `rto` Task, so
`rto ppo --task` logs it and `rto eval --task` reports it with confidence intervals.
"""

from __future__ import annotations

import os
import re

import torch

from rto.tasks import Task

FLOOR = -4.0  # nats per token; SFT samples (temperature 1) average -3.5 (README)
COHERENCE_WEIGHT = 0.5
SHORT_WORDS = 3
# The SFT model that judges coherence; run.py sets this for the processes it starts.
MODEL_ENV = "SMOLLM2_JUDGE_MODEL"


class SentimentJudge(Task):
    name = "sentiment"

    def __init__(self, seed: int = 0, model_dir: str | None = None):
        super().__init__(seed)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.vader = SentimentIntensityAnalyzer()
        self.model_dir = model_dir or os.environ.get(MODEL_ENV, "")
        self._lm = self._tok = None

    # The Task interface: this judge only scores; prompts come from the example's files.
    def tokenizer(self):
        return self._load()[1]

    def random_prompt(self, rng):
        raise NotImplementedError("the example's prompts are in its JSONL files")

    def demonstration(self, prompt, rng):
        raise NotImplementedError("the example starts from an instruction-tuned model")

    def _load(self):
        if self._lm is None:
            from rto.lm.models import load_causal_lm, load_tokenizer

            if not self.model_dir:
                raise RuntimeError(f"set {MODEL_ENV} to the SFT model directory (the coherence judge)")
            self._tok, self._lm = load_tokenizer(self.model_dir), load_causal_lm(self.model_dir, "judge model")
        return self._lm, self._tok

    def clean(self, response: str) -> str:
        lm, tok = self._load()
        for t in tok.all_special_tokens:
            response = response.replace(t, "")
        return response.strip()

    @torch.no_grad()
    def mean_logprobs(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Mean log-prob per response token under the SFT model (prompts are rendered chat strings)."""
        from rto.lm.rollout import encode_responses
        from rto.lm.scoring import response_logits, token_logprobs

        lm, tok = self._load()
        out = []
        for i in range(0, len(prompts), 16):
            batch = encode_responses(tok, prompts[i : i + 16], [self.clean(r) for r in responses[i : i + 16]])
            lp = token_logprobs(response_logits(lm, batch), batch.response_ids)
            m = batch.response_mask.float()
            out += (lp * m).sum(-1).div(m.sum(-1).clamp(min=1)).tolist()
        return out

    def parts(self, prompts: list[str], responses: list[str]) -> list[dict[str, float]]:
        rows = []
        for r, lp in zip(responses, self.mean_logprobs(prompts, responses)):
            text = self.clean(r)
            sentiment = self.vader.polarity_scores(text)["compound"]
            coherence = COHERENCE_WEIGHT * min(0.0, lp - FLOOR)
            short = -1.0 if len(re.findall(r"\w+", text)) < SHORT_WORDS else 0.0
            rows.append({"sentiment": sentiment, "coherence": coherence, "length": short, "mean_logprob": lp})
        return rows

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [p["sentiment"] + p["coherence"] + p["length"] for p in self.parts(prompts, responses)]

    def gold_reward(self, prompt: str, response: str) -> float:
        return self.score([prompt], [response])[0]

    def gold_rewards(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.score(prompts, responses)

    def gold_parts(self, prompt: str, response: str) -> dict[str, float]:
        p = self.parts([prompt], [response])[0]
        return {k: p[k] for k in ("sentiment", "coherence", "length")}
