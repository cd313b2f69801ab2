"""`rto sft`: supervised fine-tuning on prompt/completion pairs (TRL's SFTTrainer).

With no `model`, a fresh small model is built for the task's vocabulary, so the
built-in testbed needs no download; with a model directory, that model is tuned.
The loss covers completion tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rto.io.config import opt
from rto.io.data import SFT_FIELDS
from rto.io.trl_stage_tables import STAGE_TABLES
from rto.runtime.process import setup
from rto.stages.common import TrainingFields, finish_trl_stage, fit_trl, stage_lora_config


@dataclass
class SFTStageConfig(TrainingFields):
    STAGE: ClassVar[str] = "sft"
    TRL_FIELDS: ClassVar[dict] = STAGE_TABLES["sft"]
    REQUIRED: ClassVar[tuple[str, ...]] = ("data", "out")

    model: str = opt("", "model directory to start from (empty: a new model for --task)")
    task: str = opt("keyed", "task whose tokenizer and model size a new model uses")
    learning_rate: float = opt(1e-3, "peak learning rate", gt=0)
    batch_size: int = opt(64, "rows per optimizer step over all processes (the global batch)", ge=1)


def run(cfg: SFTStageConfig) -> dict:
    setup(cfg.seed, cfg.threads)
    rows = cfg.read_data(SFT_FIELDS)
    from trl import SFTConfig, SFTTrainer

    from rto.lm.models import build_causal_lm, check_tokenizer, load_causal_lm, load_tokenizer

    if cfg.model:
        tokenizer = load_tokenizer(cfg.model)
        model = load_causal_lm(cfg.model)
    else:
        from rto.tasks import load_task

        task = load_task(cfg.task)
        tokenizer = check_tokenizer(task.tokenizer(), f"task {cfg.task}")
        model = build_causal_lm(tokenizer, task.model_config(), cfg.seed)
    trainer, rows, result, seconds = fit_trl(
        cfg, SFTTrainer, SFTConfig, model, tokenizer, rows, stage_lora_config(cfg, "CAUSAL_LM")
    )
    metrics = {"train_loss": result.training_loss, "seconds": seconds, "rows": len(rows)}
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return finish_trl_stage(trainer, cfg, "sft", metrics, trainer.model, tokenizer)
