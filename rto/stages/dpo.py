"""`rto dpo`: DPO from the SFT model on preference pairs (TRL's DPOTrainer, sigmoid loss).

Its per-token log-ratio against the model it started from is RTO's dense reward.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

from rto.config import opt
from rto.data import PREFERENCE_FIELDS, read_jsonl, write_json
from rto import progress
from rto.errors import UserError
from rto.stages.common import seed_field, setup, threads_field, trl_common_args


@dataclass
class DPOStageConfig:
    model: str = opt("", "SFT model directory to start from")
    data: str = opt("", "JSONL file of {prompt, chosen, rejected} rows")
    out: str = opt("", "output model directory")
    ref_model: str = opt("", "reference model (empty: a frozen copy of --model)")
    beta: float = opt(0.1, "DPO beta (KL strength)", gt=0)
    epochs: float = opt(3.0, "training epochs", gt=0)
    learning_rate: float = opt(5e-4, "peak learning rate", gt=0)
    batch_size: int = opt(32, "batch size (pairs)", ge=1)
    max_length: int = opt(128, "longest prompt + response in tokens", ge=2)
    warmup_ratio: float = opt(0.03, "fraction of steps spent warming up", ge=0, lt=1)
    seed: int = seed_field()
    threads: int = threads_field()

    def validate(self):
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise UserError(f"dpo: --{name.replace('_', '-')} is required")


def run(cfg: DPOStageConfig) -> dict:
    setup(cfg.seed, cfg.threads)
    rows = read_jsonl(cfg.data, PREFERENCE_FIELDS)
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rto.models import load_causal_lm, load_tokenizer, save_model

    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model)
    ref = load_causal_lm(cfg.ref_model or cfg.model, what="DPO reference model")
    dataset = Dataset.from_list([{k: r[k] for k in PREFERENCE_FIELDS} for r in rows])
    args = DPOConfig(beta=cfg.beta, loss_type=["sigmoid"],
                     **trl_common_args(cfg.out, cfg.seed, cfg.epochs, cfg.batch_size, cfg.learning_rate,
                                       cfg.max_length, cfg.warmup_ratio))
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[progress.trainer_callback()])
    start = time.time()
    result = trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)  # TRL's scratch dir; nothing in it is kept
    metrics = {"train_loss": result.training_loss, "seconds": time.time() - start, "pairs": len(rows)}
    save_model(trainer.model, tokenizer, cfg.out)
    write_json(f"{cfg.out}/metrics.json", metrics)
    return metrics
