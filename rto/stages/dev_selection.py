"""Choosing a TRL-trained policy's checkpoint on the dev split, as `rto ppo` chooses its result.

At the start and after every epoch the policy samples one response per dev prompt (the same
`rto.lm.evaluate.dev_point` that `rto ppo` evaluates with: same prompts, response length,
temperature and sampling seed) and `rto.core.selection.Selection` keeps the best point by the dev
criterion (a task's gold reward or a held-out judge's score, never the training data's). The
kept weights are put back into the model before the stage saves it, so OUT is the dev-selected
DPO policy, and OUT/metrics.json holds the points and the choice under "selection" - the record
`rto tune` scores runs by.

A copy of the trainable weights of the best point is kept in CPU memory rather than written as
a checkpoint: a TRL checkpoint also holds the optimizer state (three times the weights) and is
written whether or not the point is the best; with LoRA the copy is the adapter alone.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from rto.core.selection import Selection
from rto.lm.evaluate import dev_point
from rto.lm.rollout import Sampling


class DevSelection(TrainerCallback):
    def __init__(
        self,
        tokenizer,
        prompts: list[str],
        *,
        metric: str,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        task=None,
        judge=None,
        ref=None,
    ):
        self.tokenizer, self.prompts, self.ref, self.task, self.judge = tokenizer, prompts, ref, task, judge
        self.sampling, self.seed = Sampling(max_new_tokens, temperature), seed
        self.selection = Selection(metric)
        self.curve: list[dict] = []
        self.best_weights: dict[str, torch.Tensor] | None = None

    def _observe(self, model, step: int, epoch: float) -> None:
        was_training = model.training
        model.eval()
        point = dev_point(
            model,
            self.tokenizer,
            self.prompts,
            self.sampling,
            seed=self.seed,
            ref=self.ref,
            task=self.task,
            judge=self.judge,
        )
        model.train(was_training)
        point = {"iteration": step, "epoch": round(epoch, 4), **point}
        self.curve.append(point)
        if self.selection.observe(point):
            self.best_weights = {
                n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
            }

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.curve:  # the model DPO starts from is a candidate, as iteration 0 is for `rto ppo`
            self._observe(model, 0, 0.0)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._observe(model, state.global_step, state.epoch or 0.0)

    def restore_best(self, model) -> dict:
        """Put the best point's weights back into `model`; the record for metrics.json."""
        if self.best_weights is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in self.best_weights.items():
                    params[name].copy_(value.to(params[name].device))
        return {
            "metric": self.selection.metric,
            "best": self.selection.best,
            "best_iteration": self.selection.best_iteration,
            "best_epoch": next(
                (p["epoch"] for p in self.curve if p["iteration"] == self.selection.best_iteration), None
            ),
            "last_iteration": self.curve[-1]["iteration"] if self.curve else None,
            "curve": self.curve,
        }
