"""`rto rm`: a Bradley-Terry reward model, initialised from the SFT model (TRL's RewardTrainer).

The score is read at the last response token (EOS). After training, the mean and
std of its scores on the training responses are stored beside the weights
(`reward_stats.json`), so PPO can normalise rewards the same way every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rto.io.config import opt
from rto.io.data import PREFERENCE_FIELDS, as_texts, read_rows
from rto.io.trl_stage_tables import STAGE_TABLES
from rto.runtime.process import setup
from rto.stages.common import TrainingFields, finish_trl_stage, fit_trl, stage_lora_config


@dataclass
class RMStageConfig(TrainingFields):
    STAGE: ClassVar[str] = "rm"
    TRL_FIELDS: ClassVar[dict] = STAGE_TABLES["rm"]

    eval_data: str = opt("", "held-out pairs to report accuracy on (empty: none)")
    center_rewards_coefficient: float | None = opt(
        None, "weight of TRL's auxiliary loss that pulls the scores' mean to 0 (none: off)", ge=0
    )


def pair_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Fraction of pairs where the RM scores `chosen` above `rejected`."""
    from rto.lm.scoring import score_texts

    prompts, chosen_texts, rejected_texts = as_texts(rows, tokenizer)
    chosen = score_texts(model, tokenizer, prompts, chosen_texts)
    rejected = score_texts(model, tokenizer, prompts, rejected_texts)
    return float((chosen > rejected).float().mean())


def run(cfg: RMStageConfig) -> dict:
    setup(cfg.seed, cfg.threads)
    rows = cfg.read_data(PREFERENCE_FIELDS)
    eval_rows = read_rows(cfg.eval_data, PREFERENCE_FIELDS, cfg.columns, cfg.skip_bad_rows) if cfg.eval_data else []
    from trl import RewardConfig, RewardTrainer

    from rto.lm.models import RM_STATS_FILE, ScoreStats, load_score_model, load_tokenizer
    from rto.lm.scoring import score_texts

    tokenizer = load_tokenizer(cfg.model)
    model = load_score_model(cfg.model, what="SFT model")
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer, rows, result, seconds = fit_trl(
        cfg,
        RewardTrainer,
        RewardConfig,
        model,
        tokenizer,
        rows,
        stage_lora_config(cfg, "SEQ_CLS"),
        {"center_rewards_coefficient": cfg.center_rewards_coefficient},
    )
    model = trainer.model
    if cfg.lora_r:  # the RM is used whole (it shares nothing): merge its adapter and saved head
        model = model.merge_and_unload()
    model.eval()
    prompts, chosen, rejected = as_texts(rows, tokenizer)
    with torch.no_grad():
        scores = torch.cat(
            [score_texts(model, tokenizer, prompts, chosen), score_texts(model, tokenizer, prompts, rejected)]
        )
    stats = ScoreStats(mean=float(scores.mean()), std=float(scores.std()))
    metrics = {
        "train_loss": result.training_loss,
        "seconds": seconds,
        "pairs": len(rows),
        "train_accuracy": pair_accuracy(model, tokenizer, rows),
        "score_mean": stats.mean,
        "score_std": stats.std,
    }
    if eval_rows:
        metrics["eval_accuracy"] = pair_accuracy(model, tokenizer, eval_rows)
    return finish_trl_stage(trainer, cfg, "rm", metrics, model, tokenizer, extra_files={RM_STATS_FILE: stats.as_json()})
