"""`rto dpo`: DPO from the SFT model on preference pairs (TRL's DPOTrainer, sigmoid loss).

Its per-token log-ratio against the model it started from is RTO's dense reward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rto.config import opt, require
from rto.data import PREFERENCE_FIELDS, read_rows
from rto.errors import UserError
from rto.stages.common import (TrainingFields, drop_long_rows, finish_trl_stage, resume_checkpoint, setup, stage_lora_config,
                               trl_callbacks, trl_common_args, uniform_rows)


@dataclass
class DPOStageConfig(TrainingFields):
    model: str = opt("", "SFT model directory to start from")
    data: str = opt("", "JSONL file of {prompt, chosen, rejected} rows")
    out: str = opt("", "output model directory")
    ref_model: str = opt("", "reference model (empty: a frozen copy of --model)")
    beta: float = opt(0.1, "DPO beta (KL strength)", gt=0)

    def validate(self):
        require(self, "dpo", "model", "data", "out")
        from rto.tracking import trackers

        trackers(self.report_to, "dpo")  # a missing tracker package stops the run before any work


def run(cfg: DPOStageConfig) -> dict:
    setup(cfg.seed, cfg.threads)
    rows = uniform_rows(read_rows(cfg.data, PREFERENCE_FIELDS, cfg.columns, cfg.skip_bad_rows), PREFERENCE_FIELDS, cfg.data)
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rto.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model)
    if cfg.lora_r and cfg.ref_model:
        raise UserError("dpo: with --lora-r the reference is --model with the adapter off; drop --ref-model")
    peft_config = stage_lora_config(cfg)  # its output is then an adapter that `rto ppo --lora-r` mounts
    # With LoRA, TRL uses the model with its adapter off as the reference: no second copy.
    ref = None if peft_config else load_causal_lm(cfg.ref_model or cfg.model, what="DPO reference model")
    rows = drop_long_rows(rows, tokenizer, cfg, cfg.data, "dpo")
    dataset = Dataset.from_list(rows)
    args = DPOConfig(beta=cfg.beta, loss_type=["sigmoid"],
                     **trl_common_args(cfg, cfg.out))
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=trl_callbacks(cfg), peft_config=peft_config)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, args.output_dir))
    metrics = {"train_loss": result.training_loss, "seconds": time.time() - start, "pairs": len(rows)}
    return finish_trl_stage(trainer, cfg, "dpo", metrics, trainer.model, tokenizer)
