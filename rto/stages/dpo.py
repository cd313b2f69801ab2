"""`rto dpo`: DPO from the SFT model on preference pairs (TRL's DPOTrainer, sigmoid loss).

Its per-token log-ratio against the model it started from is RTO's dense reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rto.config import opt
from rto.data import PREFERENCE_FIELDS
from rto.errors import UserError
from rto.stages.common import TrainingFields, finish_trl_stage, fit_trl, setup, stage_lora_config
from rto.trl_tables import STAGE_TABLES


@dataclass
class DPOStageConfig(TrainingFields):
    STAGE: ClassVar[str] = "dpo"
    TRL_FIELDS: ClassVar[dict] = STAGE_TABLES["dpo"]

    ref_model: str = opt("", "reference model (empty: a frozen copy of --model)")
    beta: float = opt(0.1, "DPO beta (KL strength)", gt=0)


def run(cfg: DPOStageConfig) -> dict:
    setup(cfg.seed, cfg.threads)
    rows = cfg.read_data(PREFERENCE_FIELDS)
    from trl import DPOConfig, DPOTrainer

    from rto.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model)
    if cfg.lora_r and cfg.ref_model:
        raise UserError("dpo: with --lora-r the reference is --model with the adapter off; drop --ref-model")
    peft_config = stage_lora_config(cfg)  # its output is then an adapter that `rto ppo --lora-r` mounts
    # With LoRA, TRL uses the model with its adapter off as the reference: no second copy.
    ref = None if peft_config else load_causal_lm(cfg.ref_model or cfg.model, what="DPO reference model")
    trainer, rows, result, seconds = fit_trl(cfg, DPOTrainer, DPOConfig, model, tokenizer, rows, peft_config,
                                             {"beta": cfg.beta, "loss_type": ["sigmoid"]}, ref_model=ref)
    metrics = {"train_loss": result.training_loss, "seconds": seconds, "pairs": len(rows)}
    return finish_trl_stage(trainer, cfg, "dpo", metrics, trainer.model, tokenizer)
