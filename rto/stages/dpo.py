"""`rto dpo`: DPO from the SFT model on preference pairs (TRL's DPOTrainer, sigmoid loss).

Its per-token log-ratio against the model it started from is RTO's dense reward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, Literal

from rto.io.config import opt
from rto.io.data import PREFERENCE_FIELDS
from rto.io.errors import UserError
from rto.io.trl_stage_tables import STAGE_TABLES
from rto.runtime.process import setup
from rto.stages.common import TrainingFields, finish_trl_stage, fit_trl, stage_lora_config


@dataclass
class DPOStageConfig(TrainingFields):
    STAGE: ClassVar[str] = "dpo"
    TRL_FIELDS: ClassVar[dict] = STAGE_TABLES["dpo"]

    ref_model: str = opt("", "reference model (empty: a frozen copy of --model)")
    beta: float = opt(0.1, "DPO beta (KL strength)", gt=0)
    # --- choosing the epoch on the dev prompts, as `rto ppo --select-by` chooses its iteration ---
    select_by: Literal["", "gold_reward", "judge_score"] = opt(
        "",
        "keep the epoch (or the start model) with the best dev score: the task's gold reward or --judge's "
        "score (empty: the last epoch)",
    )
    eval_prompts: str = opt("", "with --select-by: JSONL dev prompts")
    n_eval: int = opt(128, "with --select-by: dev prompts used", ge=1)
    task: str = opt("", "with --select-by gold_reward: the task with the gold reward")
    judge: str = opt("", "with --select-by judge_score: a held-out judge (rto/lm/judges.py)")
    eval_max_new_tokens: int = opt(64, "with --select-by: response length on the dev prompts", ge=1)
    eval_temperature: float = opt(1.0, "with --select-by: sampling temperature on the dev prompts", gt=0)

    def validate(self):
        super().validate()
        if not self.select_by:
            return
        if not self.eval_prompts:
            raise UserError("dpo: --select-by needs --eval-prompts (the dev prompts)")
        if self.resume:  # the kept weights and the points so far live in memory, not in TRL's checkpoints
            raise UserError(
                "dpo: --select-by cannot --resume yet (the dev selection's best weights are not in "
                "TRL's checkpoints); run it again from the start"
            )
        if self.select_by == "gold_reward" and not self.task:
            raise UserError("dpo: --select-by gold_reward needs a --task with a gold reward")
        if self.select_by == "judge_score" and not self.judge:
            raise UserError("dpo: --select-by judge_score needs a --judge")


def run(cfg: DPOStageConfig) -> dict:
    setup(cfg.seed, cfg.threads)
    rows = cfg.read_data(PREFERENCE_FIELDS)
    from trl import DPOConfig, DPOTrainer

    from rto.lm.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model)
    if cfg.lora_r and cfg.ref_model:
        raise UserError("dpo: with --lora-r the reference is --model with the adapter off; drop --ref-model")
    peft_config = stage_lora_config(cfg)  # its output is then an adapter that `rto ppo --lora-r` mounts
    # With LoRA, TRL uses the model with its adapter off as the reference: no second copy.
    ref = None if peft_config else load_causal_lm(cfg.ref_model or cfg.model, what="DPO reference model")
    selector = dev_selection(cfg, tokenizer, ref)
    trainer, rows, result, seconds = fit_trl(
        cfg,
        DPOTrainer,
        DPOConfig,
        model,
        tokenizer,
        rows,
        peft_config,
        {"beta": cfg.beta, "loss_type": ["sigmoid"]},
        ref_model=ref,
        extra_callbacks=[selector] if selector else [],
    )
    metrics = {"train_loss": result.training_loss, "seconds": seconds, "pairs": len(rows)}
    if selector:
        metrics["selection"] = selector.restore_best(trainer.model)
    return finish_trl_stage(trainer, cfg, "dpo", metrics, trainer.model, tokenizer)


def dev_selection(cfg: DPOStageConfig, tokenizer, ref):
    """--select-by: the callback that evaluates every epoch on the dev prompts and keeps the best."""
    if not cfg.select_by:
        return None
    from rto.io.prompt_pool import read_prompts
    from rto.lm.judges import load_judge
    from rto.stages.dev_selection import DevSelection
    from rto.tasks import load_task

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("dpo: --select-by runs in one process (the dev samples need the whole model)")
    prompts = read_prompts(cfg.eval_prompts, tokenizer, max_len=cfg.max_length, what="dpo")
    prompts = prompts.take(list(range(min(cfg.n_eval, len(prompts)))))
    return DevSelection(
        tokenizer,
        prompts,
        metric=cfg.select_by,
        max_new_tokens=cfg.eval_max_new_tokens,
        temperature=cfg.eval_temperature,
        seed=cfg.seed,
        ref=ref,
        task=load_task(cfg.task) if cfg.task else None,
        judge=load_judge(cfg.judge, tokenizer) if cfg.judge else None,
    )
