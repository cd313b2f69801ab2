"""Held-out judges: a second opinion on dev responses that the RL training never optimises.

Over-optimisation shows as the training RM's score (the proxy) rising while a score the policy
was not trained on falls. A task with a gold reward has that score built in; elsewhere a judge
gives it (`rto ppo --judge`), logged at every dev evaluation as `judge_score` and usable as the
selection criterion (`--select-by judge_score`). A judge is one of:
- a reward-model directory (any `AutoModelForSequenceClassification` with one label, with its own
  tokenizer): for instance an RM trained on preference pairs disjoint from the training RM's
  (`rto pipeline --judge heldout-rm` trains one);
- `module:function` or `path/to/file.py:function`, called as `function(prompts, responses)` with
  lists of texts (responses as decoded, special tokens kept) and returning one float per response.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from rto.io.errors import UserError

Judge = Callable[[list[str], list[str]], list[float]]


def load_judge(spec: str, policy_tokenizer, device: torch.device | str = "cpu") -> Judge:
    """The judge named by `spec` (a model directory or module:function), checked on every call."""
    if Path(spec).is_dir():
        fn = _model_judge(spec, policy_tokenizer, device)
    elif ":" in spec:
        from rto.io.plugins import import_object

        fn = import_object(spec, "--judge")
        if not callable(fn):
            raise UserError(f"--judge {spec!r}: not a function")
    else:
        raise UserError(f"--judge {spec!r}: neither a reward-model directory nor module:function")

    def judge(prompts: list[str], responses: list[str]) -> list[float]:
        try:
            scores = [float(s) for s in fn(prompts, responses)]
        except UserError:
            raise
        except Exception as e:  # a user's judge can fail in any way; report it in one line
            raise UserError(
                f"--judge {spec!r}: failed on {len(responses)} responses: {type(e).__name__}: {e}"
            ) from None
        if len(scores) != len(responses):
            raise UserError(f"--judge {spec!r}: returned {len(scores)} scores for {len(responses)} responses")
        if not all(math.isfinite(s) for s in scores):
            raise UserError(f"--judge {spec!r}: returned a non-finite score")
        return scores

    return judge


def _model_judge(path: str, policy_tokenizer, device) -> Judge:
    """A reward model read at the last response token, as the training RM is; it reads text, so
    its tokenizer may differ from the policy's. The policy's EOS text is taken off the end and the
    judge's own EOS appended (as TRL appends it when training an RM on text pairs), also to a
    response cut at the token limit."""
    from rto.lm.models import load_score_model, load_tokenizer
    from rto.lm.scoring import score_texts

    tokenizer = load_tokenizer(path, what="judge")
    model = load_score_model(path, what="judge").to(device).eval()
    eos = policy_tokenizer.eos_token or ""

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        texts = [r[: -len(eos)] if eos and r.endswith(eos) else r for r in responses]
        return score_texts(model, tokenizer, prompts, texts).tolist()

    return score
