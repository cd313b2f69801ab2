"""`rto sft`: supervised fine-tuning on prompt/completion pairs (TRL's SFTTrainer).

With no `model`, a fresh small model is built for the task's vocabulary, so the
built-in testbed needs no download; with a model directory, that model is tuned.
The loss covers completion tokens only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rto.config import opt, require
from rto.data import SFT_FIELDS, read_rows
from rto.stages.common import (TrainingFields, drop_long_rows, finish_trl_stage, resume_checkpoint, setup, stage_lora_config,
                               trl_callbacks, trl_common_args, uniform_rows)


@dataclass
class SFTStageConfig(TrainingFields):
    data: str = opt("", "JSONL file of {prompt, completion} rows")
    out: str = opt("", "output model directory")
    model: str = opt("", "model directory to start from (empty: a new model for --task)")
    task: str = opt("keyed", "task whose tokenizer and model size a new model uses")
    learning_rate: float = opt(1e-3, "peak learning rate", gt=0)
    batch_size: int = opt(64, "batch size", ge=1)

    def validate(self):
        require(self, "sft", "data", "out")
        from rto.tracking import trackers

        trackers(self.report_to, "sft")  # a missing tracker package stops the run before any work


def run(cfg: SFTStageConfig) -> dict:
    setup(cfg.seed, cfg.threads)
    rows = uniform_rows(read_rows(cfg.data, SFT_FIELDS, cfg.columns, cfg.skip_bad_rows), SFT_FIELDS, cfg.data)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rto.models import build_causal_lm, check_tokenizer, load_causal_lm, load_tokenizer

    if cfg.model:
        tokenizer = load_tokenizer(cfg.model)
        model = load_causal_lm(cfg.model)
    else:
        from rto.tasks import load_task

        task = load_task(cfg.task)
        tokenizer = check_tokenizer(task.tokenizer(), f"task {cfg.task}")
        model = build_causal_lm(tokenizer, task.model_config(), cfg.seed)
    rows = drop_long_rows(rows, tokenizer, cfg, cfg.data, "sft")
    dataset = Dataset.from_list(rows)
    args = SFTConfig(**trl_common_args(cfg, cfg.out))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=trl_callbacks(cfg), peft_config=stage_lora_config(cfg, "CAUSAL_LM"))
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, args.output_dir))
    metrics = {"train_loss": result.training_loss, "seconds": time.time() - start, "rows": len(rows)}
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return finish_trl_stage(trainer, cfg, "sft", metrics, trainer.model, tokenizer)
