"""Every TRL config field, decided: one table per stage (see rto/io/trl_fields.py for the kinds).

`TRAINING` holds transformers.TrainingArguments (with TRL's _BaseConfig defaults), `SCRIPT` and
`MODEL` TRL's ScriptArguments and ModelConfig; each stage table adds its TRL config's own fields.
`ok` values are TRL's defaults (and their to_dict() spellings), checked by tests/test_trl_fields.py.
"""

from __future__ import annotations

from rto.io.errors import UserError
from rto.io.trl_fields import Hook, Ignore, Map, Refuse

EVAL = "evaluation during training: evaluate with `rto eval` (rto ppo: --eval-prompts)"
HUB = "the Hugging Face hub: this tool never pushes"
LOG = "logging detail: metrics go to OUT/metrics.jsonl and --report-to trackers"
LOADER = "data loading detail: the rows are read into memory, loaded in the main process"
LAUNCH = "set by the launcher (accelerate launch / torchrun) and its config"
EVAL_KEYS = (
    "eval_strategy",
    "eval_steps",
    "eval_delay",
    "per_device_eval_batch_size",
    "prediction_loss_only",
    "eval_on_start",
    "eval_do_concat_batches",
    "eval_use_gather_object",
    "eval_accumulation_steps",
    "include_for_metrics",
    "batch_eval_metrics",
    "bf16_full_eval",
    "fp16_full_eval",
    "do_eval",
    "do_predict",
    "metric_for_best_model",
    "greater_is_better",
    "dataset_test_split",
)
EVAL_OK = {
    "eval_strategy": ("no",),
    "eval_delay": (0,),
    "per_device_eval_batch_size": (8,),
    "prediction_loss_only": (False,),
    "eval_on_start": (False,),
    "eval_do_concat_batches": (True,),
    "eval_use_gather_object": (False,),
    "batch_eval_metrics": (False,),
    "bf16_full_eval": (False,),
    "fp16_full_eval": (False,),
    "do_eval": (False,),
    "do_predict": (False,),
    "dataset_test_split": ("test",),
}


def _lr_schedule(value, ppo: bool = False) -> dict:
    names = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
    name = str(value.value if hasattr(value, "value") else value)
    if name not in names:
        raise UserError(f"lr_scheduler_type {name!r}: not offered (linear, cosine, constant, constant_with_warmup)")
    out = {"lr_schedule": names[name]}
    if ppo and name == "cosine":
        out["lr_min_ratio"] = 0.0  # TRL's cosine decays to 0 (ours, unasked, to 10%)
    return out


def _warmup(value) -> dict:
    v = float(value)
    if v < 0:
        raise UserError(f"warmup_steps: must be >= 0, got {value}")
    return {"warmup_ratio": v, "warmup_steps": 0} if v < 1 else {"warmup_steps": int(v)}


def _report_to(value):
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value or [])
    items = [v for v in items if v] or ["none"]  # TRL's [] and "none": no tracker
    if "all" in items:
        raise UserError("report_to all: name the trackers (e.g. report_to: [tensorboard])")
    return items


def _precision(on):
    return None if on is None else "bf16" if on else "fp32"


TRAINING = {
    "output_dir": Map("out"),
    "per_device_train_batch_size": Map(
        "per_device_train_batch_size", why="TRL's meaning: rows per process per micro-step (sets the global batch)"
    ),
    "num_train_epochs": Map("epochs"),
    "max_steps": Map("max_steps"),
    "learning_rate": Map("learning_rate"),
    "lr_scheduler_type": Map("", _lr_schedule, why="`lr_schedule`: linear, cosine, constant"),
    "lr_scheduler_kwargs": Refuse("scheduler options are not offered", (None,)),
    "warmup_steps": Map("", _warmup, why="`warmup_ratio` (a value below 1) or `warmup_steps`"),
    "optim": Refuse("the optimizer is AdamW (torch's)", ("adamw_torch_fused", "adamw_torch")),
    "optim_args": Refuse("optimizer options are not offered", (None,)),
    "optim_target_modules": Refuse("not offered (GaLore-style optimizers)", (None,)),
    "weight_decay": Map("weight_decay"),
    "adam_beta1": Map("adam_beta1"),
    "adam_beta2": Map("adam_beta2"),
    "adam_epsilon": Refuse("Adam's epsilon is 1e-8", (1e-8,)),
    "gradient_accumulation_steps": Map("gradient_accumulation_steps"),
    "average_tokens_across_devices": Ignore("the loss is averaged as TRL's trainers do by default", (True,)),
    "max_grad_norm": Map("max_grad_norm"),
    "label_smoothing_factor": Refuse("label smoothing is not offered", (0.0,)),
    "bf16": Map("precision", _precision, boolean=True, why="true: bf16, false: fp32, unset: auto"),
    "fp16": Refuse("fp16 is not offered: --precision fp32 or bf16", (False,)),
    "tf32": Ignore("TF32 matmuls are left at torch's default", (None,)),
    "activation_checkpointing": Map("gradient_checkpointing", why="(transformers' new name)"),
    "activation_checkpointing_kwargs": Ignore("checkpointing options: transformers' defaults", (None,)),
    "gradient_checkpointing": Map("gradient_checkpointing"),
    "gradient_checkpointing_kwargs": Ignore("checkpointing options: transformers' defaults", (None,)),
    "torch_compile": Refuse("torch.compile is not offered", (False,)),
    "torch_compile_backend": Ignore("only with torch_compile (refused)", (None,)),
    "torch_compile_mode": Ignore("only with torch_compile (refused)", (None,)),
    "use_liger_kernel": Refuse("Liger kernels are not offered", (False,)),
    "liger_kernel_config": Ignore("only with use_liger_kernel (refused)", (None,)),
    "use_cache": Ignore("the KV cache is used for generation only", (False,)),
    "neftune_noise_alpha": Refuse("NEFTune noise is not offered", (None,)),
    "torch_empty_cache_steps": Ignore("memory housekeeping: not needed", (None,)),
    "auto_find_batch_size": Refuse("the batch size is as given", (False,)),
    "logging_strategy": Ignore("the loss is logged every logging_steps optimizer steps", ("steps",)),
    "logging_steps": Map("logging_steps"),
    "logging_first_step": Ignore(LOG, (False,)),
    "log_on_each_node": Ignore(LOG, (True,)),
    "logging_nan_inf_filter": Ignore(LOG, (True,)),
    "include_num_input_tokens_seen": Ignore(LOG, ("no", False)),
    "log_level": Ignore(LOG, ("passive",)),
    "log_level_replica": Ignore(LOG, ("warning",)),
    "disable_tqdm": Ignore("progress bars follow RTO_PROGRESS and the terminal", (None, False, True)),
    "report_to": Map("report_to", _report_to),
    "run_name": Ignore("trackers name runs themselves", (None,)),
    "project": Ignore(LOG, ("huggingface",)),
    "trackio_space_id": Ignore(LOG, (None,)),
    "trackio_bucket_id": Ignore(LOG, (None,)),
    "trackio_static_space_id": Ignore(LOG, (None,)),
    **{k: Ignore(EVAL, EVAL_OK.get(k, (None,))) for k in EVAL_KEYS if k != "dataset_test_split"},
    "save_only_model": Ignore("checkpoints always hold the optimizer state too", (False,)),
    "save_strategy": Hook("`save_every`: no: 0 (never); steps: save_steps (epoch and best are refused)"),
    "save_steps": Map("save_every", why="(with save_strategy steps)"),
    "save_on_each_node": Ignore(LAUNCH, (False,)),
    "save_total_limit": Map("keep_last", lambda v: 0 if v is None else v, why="(unset: 0, keep all)"),
    "enable_jit_checkpoint": Ignore("checkpoints are written every save_steps only", (False,)),
    "push_to_hub": Ignore(HUB, (False,)),
    "hub_token": Ignore(HUB, (None,)),
    "hub_private_repo": Ignore(HUB, (None,)),
    "hub_model_id": Ignore(HUB, (None,)),
    "hub_strategy": Ignore(HUB, ("every_save",)),
    "hub_always_push": Ignore(HUB, (False,)),
    "hub_revision": Ignore(HUB, (None,)),
    "load_best_model_at_end": Refuse("needs evaluation during training (rto ppo: --select-by)", (False,)),
    "ignore_data_skip": Ignore("a resumed run skips the batches already seen", (False,)),
    "restore_callback_states_from_checkpoint": Ignore("no stateful callbacks here", (False,)),
    "full_determinism": Ignore("runs are seeded by --seed", (False,)),
    "seed": Map("seed"),
    "data_seed": Refuse("the data order follows --seed", (None,)),
    "use_cpu": Refuse("the GPU is used when there is one (hide it with CUDA_VISIBLE_DEVICES=)", (False,)),
    "accelerator_config": Ignore(
        LAUNCH,
        (
            None,
            {
                "dispatch_batches": None,
                "even_batches": True,
                "non_blocking": False,
                "gradient_accumulation_kwargs": None,
                "split_batches": False,
                "use_seedable_sampler": True,
            },
        ),
    ),
    "parallelism_config": Refuse("tensor / context parallelism is not offered", (None,)),
    "dataloader_drop_last": Ignore(LOADER, (False,)),
    "dataloader_num_workers": Ignore(LOADER, (0,)),
    "dataloader_pin_memory": Ignore(LOADER, (True,)),
    "dataloader_persistent_workers": Ignore(LOADER, (False,)),
    "dataloader_prefetch_factor": Ignore(LOADER, (None,)),
    "dataloader_multiprocessing_context": Ignore(LOADER, (None,)),
    "dataloader_in_order": Ignore(LOADER, (True,)),
    "remove_unused_columns": Ignore("the rows hold only the columns the stage uses", (True,)),
    "label_names": Ignore("the stage's trainer names its labels", (None,)),
    "train_sampling_strategy": Refuse("rows are drawn at random", ("random",)),
    "length_column_name": Ignore("only with train_sampling_strategy group_by_length (refused)", ("length",)),
    "ddp_find_unused_parameters": Ignore(LAUNCH, (None,)),
    "ddp_bucket_cap_mb": Ignore(LAUNCH, (None,)),
    "ddp_broadcast_buffers": Ignore(LAUNCH, (None,)),
    "ddp_static_graph": Ignore(LAUNCH, (None,)),
    "ddp_backend": Ignore(LAUNCH, (None,)),
    "ddp_timeout": Ignore(LAUNCH, (1800,)),
    "fsdp": Refuse("give FSDP to accelerate launch --config_file (see docs/usage.md, many GPUs)", (None, "", [])),
    "fsdp_config": Refuse("give FSDP to accelerate launch --config_file (see docs/usage.md, many GPUs)", (None,)),
    "deepspeed": Refuse("give DeepSpeed to accelerate launch --config_file (see docs/usage.md, many GPUs)", (None,)),
    "debug": Ignore("debugging aids: use --debug for tracebacks", (None, "", [])),
    "skip_memory_metrics": Ignore(LOG, (True,)),
    "do_train": Ignore("the command trains", (False, True)),
    "resume_from_checkpoint": Map(
        "resume",
        lambda v: None if v in (None, False, "") else "auto" if v is True else v,
        why="(true: auto, the latest checkpoint)",
    ),
    "local_rank": Ignore(LAUNCH, (-1,)),
}

SCRIPT = {
    "dataset_name": Map("data"),
    "dataset_config": Map("data_config"),
    "dataset_train_split": Map("data_split"),
    "dataset_test_split": Ignore(EVAL, ("test",)),
    "dataset_streaming": Ignore("rows are read into memory", (False,)),
    "ignore_bias_buffers": Ignore(LAUNCH, (False,)),
}

ONLY_PEFT = "only with use_peft"
MODEL = {
    "model_name_or_path": Map("model"),
    "model_revision": Refuse("models are read from a directory or the hub's main revision", ("main",)),
    "dtype": Refuse("weights load in fp32 (bf16 autocast with --precision bf16)", ("float32", "auto", None)),
    "attn_implementation": Ignore("transformers' default attention", (None,)),
    "use_peft": Hook("`lora_r`: true: lora_r (TRL's 16 unless given); false: full fine-tuning (lora_* ignored)"),
    "lora_r": Map("lora_r"),
    "lora_alpha": Map("lora_alpha"),
    "lora_dropout": Ignore("LoRA dropout is 0 here", (0.0,)),
    "lora_target_modules": Map("lora_target_modules"),
    "lora_target_parameters": Refuse("LoRA on parameters is not offered", (None,)),
    "lora_modules_to_save": Refuse("not offered (the reward model's head is saved whole)", (None,)),
    "lora_task_type": Ignore("set by the stage", ("CAUSAL_LM",)),
    "use_rslora": Refuse("rsLoRA is not offered", (False,)),
    "use_dora": Refuse("DoRA is not offered", (False,)),
    "load_in_8bit": Refuse("quantised loading is not offered", (False,)),
    "load_in_4bit": Refuse("quantised loading is not offered", (False,)),
    "bnb_4bit_quant_type": Ignore("only with load_in_4bit (refused)", ("nf4",)),
    "use_bnb_nested_quant": Ignore("only with load_in_4bit (refused)", (False,)),
    "bnb_4bit_quant_storage": Ignore("only with load_in_4bit (refused)", (None,)),
}

# The fields of TRL's SFT, reward and DPO configs past TrainingArguments.
TOKENS = "the tokenizer's own special tokens are used"
LOADING = {
    "model_init_kwargs": Refuse("model loading options are not offered", (None,)),
    "trust_remote_code": Refuse("models with remote code are not loaded", (False,)),
    "dataset_num_proc": Ignore("the rows are prepared in this process", (None,)),
    "max_length": Map("max_length"),
    "pad_to_multiple_of": Ignore("padding detail", ("auto", None)),
    "activation_offloading": Refuse("activation offloading is not offered", (False,)),
    "pad_token": Refuse(TOKENS, (None,)),
}
