"""What every TRL-backed stage shares: its settings (`TrainingFields`), TRL arguments, LoRA, row checks, saving."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from rto.io.config import chat_template_field, columns_field, opt, skip_bad_rows_field, source_field, split_field
from rto.io.errors import UserError
from rto.io.trl_fields import trl_peft, trl_saving
from rto.runtime.distributed import launched_world_size
from rto.runtime.process import report_to_field, seed_field, threads_field
from rto.runtime.progress import bars_enabled


@dataclass
class TrainingFields:
    """Settings every TRL-backed stage (SFT, RM, DPO) shares; each stage's config extends it, names
    itself in STAGE (for its messages) and decides every TRL config field in TRL_FIELDS
    (rto/io/trl_tables.py)."""

    STAGE: ClassVar[str] = ""
    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "data", "out")
    TRL_FIELDS: ClassVar[dict] = {}

    @staticmethod
    def from_trl(values: dict, where: str, problems: list[str]) -> dict:
        """TRL settings read together: use_peft with the lora_* keys, save_strategy with save_steps."""
        trl_peft(values, where, problems)
        trl_saving(values, where, problems)
        return values

    # --- models and data ---
    model: str = opt("", "model directory to start from (the SFT model, for rm and dpo)")
    data: str = source_field(
        "training data, {prompt, completion}, {messages} or {text} rows for sft, {prompt, chosen, rejected} pairs "
        "for rm and dpo (docs/usage.md, data formats)"
    )
    data_split: str = split_field("train", "data")
    data_config: str = opt("", "the configuration (subset) of a hub dataset")
    out: str = opt("", "output model directory")
    columns: dict = columns_field("data", "prompt: question, chosen: good")
    skip_bad_rows: bool = skip_bad_rows_field("data")
    chat_template_path: str = chat_template_field("model")
    max_length: int = opt(128, "longest prompt + response in tokens", ge=2)
    long_rows: Literal["skip", "error", "truncate"] = opt(
        "skip",
        "rows over --max-length tokens: skip (and count), error (naming the row), or truncate (TRL cuts "
        "the end, which can cut off a response's EOS)",
    )
    # --- optimization ---
    epochs: float = opt(3.0, "training epochs", gt=0)
    max_steps: int = opt(0, "optimizer steps to train for, overriding --epochs (0: by epochs)", ge=-1)
    learning_rate: float = opt(5e-4, "peak learning rate", gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = opt(
        "cosine", "learning-rate decay after warm-up: cosine (to 0), linear (to 0; TRL's default) or constant"
    )
    warmup_ratio: float = opt(0.03, "fraction of steps spent warming up", ge=0, lt=1)
    warmup_steps: int = opt(0, "warm-up length in optimizer steps, instead of --warmup-ratio (0: by the ratio)", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = opt(0.9, "Adam beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "Adam beta2", ge=0, lt=1)
    max_grad_norm: float = opt(1.0, "gradient-norm clip", gt=0)
    batch_size: int = opt(
        32,
        "rows (or pairs) per optimizer step over all processes: the global batch, as rto ppo's "
        "batch sizes are; each process takes batch-size / (processes x "
        "--gradient-accumulation-steps) per micro-step",
        ge=1,
    )
    per_device_train_batch_size: int = opt(
        0,
        "rows per process per micro-step, TRL's meaning (0: from "
        "--batch-size); given, it sets the global batch instead",
        ge=0,
    )
    gradient_accumulation_steps: int = opt(1, "micro-batches accumulated into one optimizer step", ge=1)
    seed: int = seed_field()
    # --- memory and speed ---
    precision: Literal["auto", "fp32", "bf16"] = opt(
        "auto", "bf16: mixed precision (TRL's --bf16); auto: bf16 on a GPU that supports it, else fp32"
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory, ~30% more time)")
    lora_r: int = opt(0, "LoRA rank (0: full fine-tuning); the output is then a peft adapter on --model", ge=0)
    lora_alpha: float = opt(16.0, "LoRA alpha", gt=0)
    lora_target_modules: list[str] = opt(["all-linear"], "modules that get LoRA adapters (peft names)")
    threads: int = threads_field()
    # --- checkpoints ---
    save_every: int = opt(0, "write a resumable checkpoint every N optimizer steps into OUT.trl/ (0: never)", ge=0)
    keep_last: int = opt(2, "checkpoints kept (0: all)", ge=0)
    resume: str = opt("", "auto (the latest complete checkpoint in OUT.trl/, if any) or a checkpoint directory")
    # --- logging ---
    logging_steps: int = opt(50, "log the training loss every N optimizer steps", ge=1)
    report_to: list[str] = report_to_field()

    def read_data(self, fields: tuple[str, ...]) -> list[dict]:
        """The stage's training rows (rto.io.data.read_rows), one kind per field as TRL's datasets need."""
        from rto.io.data import read_rows

        rows = read_rows(self.data, fields, self.columns, self.skip_bad_rows, self.data_split, self.data_config)
        return uniform_rows(rows, fields, self.data)

    def validate(self):
        from rto.io.config import require
        from rto.runtime.tracking import trackers

        require(self, self.STAGE, *self.REQUIRED)
        trackers(self.report_to, self.STAGE)  # a missing tracker package stops the run before any work
        share = launched_world_size() * self.gradient_accumulation_steps
        if not self.per_device_train_batch_size and self.batch_size % share:
            raise UserError(
                f"{self.STAGE}: --batch-size ({self.batch_size}) is the global batch: it must be a multiple "
                f"of processes x --gradient-accumulation-steps ({share}), or give "
                "--per-device-train-batch-size"
            )


def per_device_batch(cfg: TrainingFields) -> int:
    """Rows per process per micro-step: TRL's per_device_train_batch_size."""
    if cfg.per_device_train_batch_size:
        return cfg.per_device_train_batch_size
    return cfg.batch_size // (launched_world_size() * cfg.gradient_accumulation_steps)


def stage_lora_config(cfg: TrainingFields, task_type: str = "CAUSAL_LM"):
    """peft's LoraConfig for a TRL trainer, or None for full fine-tuning."""
    if not cfg.lora_r:
        return None
    from rto.lm.lora import lora_config

    targets = cfg.lora_target_modules if cfg.lora_target_modules != ["all-linear"] else "all-linear"
    return lora_config(cfg.lora_r, cfg.lora_alpha, targets, task_type)


def uniform_rows(rows: list[dict], fields: tuple[str, ...], path: str) -> list[dict]:
    """TRL's datasets need one kind per column: all text or all conversations."""
    from rto.io.errors import UserError

    for f in fields:
        kinds = {isinstance(r[f], str) for r in rows}
        if len(kinds) > 1:
            i = next(i for i, r in enumerate(rows) if isinstance(r[f], str) != isinstance(rows[0][f], str))
            raise UserError(
                f"{path}: field {f!r} mixes text and conversations (row {i + 1} of the usable rows differs "
                "from the first)"
            )
    return [{f: r[f] for f in fields} for r in rows]


def drop_long_rows(rows: list[dict], tokenizer, cfg: TrainingFields, path: str, stage: str) -> list[dict]:
    """Rows whose prompt + response (the longer of chosen and rejected) exceed --max-length tokens,
    handled as --long-rows says; the count of skipped rows is printed."""
    from rto.io.data import as_texts
    from rto.io.errors import UserError

    if cfg.long_rows == "truncate":
        return rows
    pairs = [
        r if "chosen" in r else {"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"]}
        for r in rows
    ]
    prompts, chosen, rejected = as_texts(pairs, tokenizer)
    # +1: the EOS token the trainers append to a response that lacks one.
    with_chosen = tokenizer([p + c for p, c in zip(prompts, chosen)])["input_ids"]
    with_rejected = tokenizer([p + r for p, r in zip(prompts, rejected)])["input_ids"]
    lengths = [max(len(a), len(b)) + 1 for a, b in zip(with_chosen, with_rejected)]
    long = [i for i, n in enumerate(lengths) if n > cfg.max_length]
    if not long:
        return rows
    if cfg.long_rows == "error":
        i = long[0]
        which = "usable row" if cfg.skip_bad_rows else "row"
        raise UserError(
            f"{path}: {which} {i + 1}: prompt + response is {lengths[i]} tokens, longer than --max-length "
            f"{cfg.max_length} ({len(long)} such rows; --long-rows skip or truncate to accept them)"
        )
    if len(long) == len(rows):
        raise UserError(f"{path}: no rows left: all {len(rows)} are longer than --max-length {cfg.max_length}")
    print(
        f"[rto] {stage}: {path}: skipped {len(long)} of {len(rows)} rows longer than --max-length {cfg.max_length}",
        file=sys.stderr,
        flush=True,
    )
    drop = set(long)
    return [r for i, r in enumerate(rows) if i not in drop]


def resume_checkpoint(cfg: TrainingFields, scratch: str) -> str | None:
    """The checkpoint to resume from, or None (then any stale scratch directory is cleared).

    transformers writes a checkpoint's files in place and its trainer_state.json last, so a
    checkpoint whose trainer_state.json parses is complete; a half-written one is skipped."""
    import json
    import shutil
    from pathlib import Path

    from rto.io.errors import UserError

    if cfg.resume and cfg.resume != "auto":
        path = Path(cfg.resume)
        if not (path / "trainer_state.json").is_file():
            raise UserError(f"--resume {path}: not a complete checkpoint (no trainer_state.json)")
        print(f"[rto] resuming from {path}", file=sys.stderr, flush=True)
        return str(path)
    complete = []
    for ck in Path(scratch).glob("checkpoint-*") if cfg.resume == "auto" else []:
        try:
            json.loads((ck / "trainer_state.json").read_text())
            complete.append((int(ck.name.split("-")[-1]), ck))
        except (OSError, ValueError):
            continue
    if complete:
        print(f"[rto] resuming from {max(complete)[1]}", file=sys.stderr, flush=True)
        return str(max(complete)[1])
    shutil.rmtree(scratch, ignore_errors=True)
    return None


def trl_common_args(cfg: TrainingFields, out: str) -> dict:
    """TrainingArguments for TRL on any machine: no hub, checkpoints and trackers as asked.

    bf16 (--precision auto: only on a GPU that supports it) and gradient checkpointing (off unless
    asked) are chosen here: TRL turns both on by default, which costs time (or fails) on a CPU.
    """
    # TRL turns gradient checkpointing on by default; turning it off through the old name warns.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    same_name = {name: getattr(cfg, name) for name in _TRL_SAME_NAME}
    return dict(
        **same_name,
        output_dir=os.path.join(out + ".trl"),
        report_to=_trl_report_to(cfg),
        bf16=_bf16(cfg.precision),
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        save_total_limit=cfg.keep_last or None,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        per_device_train_batch_size=per_device_batch(cfg),
        data_seed=cfg.seed,
        warmup_steps=cfg.warmup_steps or cfg.warmup_ratio,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(cfg.lr_schedule, cfg.lr_schedule),
        disable_tqdm=not bars_enabled(),
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        log_level="warning",
    )


# Our settings that TrainingArguments takes under the same name and meaning.
_TRL_SAME_NAME = (
    "gradient_checkpointing",
    "gradient_accumulation_steps",
    "learning_rate",
    "max_length",
    "seed",
    "logging_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
)


def _bf16(precision: str) -> bool:
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


_USER_TB_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")  # a user's own setting wins


def _trl_report_to(cfg: TrainingFields) -> list[str] | str:
    from rto.runtime.tracking import trackers

    names = trackers(cfg.report_to, "--report-to")
    # TensorBoard files go to the scratch directory and move to OUT/trackers once the model is saved.
    os.environ["TENSORBOARD_LOGGING_DIR"] = _USER_TB_DIR or os.path.join(cfg.out + ".trl", "trackers", "tensorboard")
    return names or "none"


def trl_callbacks(cfg: TrainingFields) -> list:
    """Progress reporting and the live OUT.trl/metrics.jsonl."""
    from rto.runtime import progress
    from rto.runtime.tracking import jsonl_callback

    return [progress.trainer_callback(), jsonl_callback(os.path.join(cfg.out + ".trl", "metrics.jsonl"))]


def fit_trl(
    cfg: TrainingFields,
    trainer_cls,
    config_cls,
    model,
    tokenizer,
    rows: list[dict],
    peft_config,
    config_kwargs: dict | None = None,
    extra_callbacks: list | None = None,
    **trainer_kwargs,
):
    """Train with one of TRL's trainers, as every TRL stage does: rows over --max-length handled as
    --long-rows says, our common arguments and callbacks, resumed from a checkpoint when asked.
    Returns (trainer, the rows trained on, TRL's train output, seconds)."""
    import time

    from datasets import Dataset

    if cfg.chat_template_path:  # before any row is rendered; the stage saves the tokenizer with it
        from rto.lm.models import set_chat_template

        set_chat_template(tokenizer, cfg.chat_template_path)
    rows = drop_long_rows(rows, tokenizer, cfg, cfg.data, cfg.STAGE)
    args = config_cls(**(config_kwargs or {}), **trl_common_args(cfg, cfg.out))
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=trl_callbacks(cfg) + list(extra_callbacks or []),
        peft_config=peft_config,
        **trainer_kwargs,
    )
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, args.output_dir))
    return trainer, rows, result, time.time() - start


def finish_trl_stage(
    trainer, cfg, stage: str, metrics: dict, model, tokenizer, extra_files: dict | None = None
) -> dict:
    """After training: `model` is saved (with `extra_files` beside it), then OUT/metrics.json,
    OUT/metrics.jsonl (every log of the run, resumed parts included) and the model card are written
    by the main process; the other processes of a multi-process run wait for it, so none ends
    before the model is on disk.

    Under FSDP or DeepSpeed the weights are sharded over the processes: every process takes part
    in TRL's `save_model` (it gathers them), into a temporary directory renamed into place."""
    import json
    import shutil
    from pathlib import Path

    from rto.io.data import write_json, write_jsonl
    from rto.lm.model_cards import write_model_card
    from rto.lm.models import save_model

    accelerator = trainer.accelerator
    sharded = str(accelerator.distributed_type).split(".")[-1] in ("FSDP", "DEEPSPEED")
    if sharded:
        tmp = Path(cfg.out + ".tmp")
        trainer.save_model(str(tmp))
        if accelerator.is_main_process:
            for name, content in (extra_files or {}).items():
                (tmp / name).write_text(json.dumps(content, indent=2))
            if Path(cfg.out).exists():
                shutil.rmtree(cfg.out)
            os.replace(tmp, cfg.out)
    if accelerator.is_main_process:
        if not sharded:
            save_model(model, tokenizer, cfg.out, extra_files=extra_files)
        write_json(f"{cfg.out}/metrics.json", metrics)
        write_jsonl(f"{cfg.out}/metrics.jsonl", trainer.state.log_history)
        write_model_card(cfg.out, stage, cfg, metrics)
        if Path(cfg.out + ".trl", "trackers").is_dir():
            shutil.move(Path(cfg.out + ".trl", "trackers"), Path(cfg.out, "trackers"))
        shutil.rmtree(cfg.out + ".trl", ignore_errors=True)  # TRL's scratch dir; nothing in it is kept
    accelerator.wait_for_everyone()
    return metrics
