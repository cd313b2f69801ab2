"""Each stage's table of TRL config fields (`STAGE_TABLES`: SFT, RM, DPO, PPO), built on the tables
every stage shares (rto/io/trl_tables.py), and the doc they generate (docs/trl-compatibility.md)."""

from __future__ import annotations

from rto.io.trl_fields import Hook, Ignore, Map, Refuse, counts, describe
from rto.io.trl_tables import EVAL, LOADING, LOG, MODEL, SCRIPT, TOKENS, TRAINING, _lr_schedule

SFT_OWN = {
    **LOADING,
    "chat_template_path": Map("chat_template_path"),
    "router_aux_loss_coef": Ignore("MoE router loss: not used", (None,)),
    "dataset_text_field": Refuse("give --columns '{text: FIELD}'", ("text",)),
    "dataset_kwargs": Refuse("dataset options are not offered", (None,)),
    "eos_token": Refuse(TOKENS, (None,)),
    "truncation_mode": Refuse("--long-rows truncate keeps the start", ("keep_start",)),
    "shuffle_dataset": Ignore("rows are drawn at random by the trainer", (False,)),
    "packing": Refuse("packing is not offered for sft", (False,)),
    "packing_strategy": Ignore("only with packing (refused)", ("bfd",)),
    "padding_free": Refuse("padding-free batches are not offered for sft", (False,)),
    "eval_packing": Ignore(EVAL, (None,)),
    "completion_only_loss": Refuse("the loss covers completion tokens only", (None, True)),
    "assistant_only_loss": Refuse(
        "the loss covers completion tokens (prompt/completion rows) or all tokens "
        "({text} and {messages} rows as TRL trains them)",
        (False,),
    ),
    "loss_type": Refuse("the loss is the negative log-likelihood", ("nll",)),
}


RM_OWN = {
    **LOADING,
    "chat_template_path": Map("chat_template_path"),
    "disable_dropout": Refuse("dropout is off while training, as TRL's default", (True,)),
    "eos_token": Refuse(TOKENS, (None,)),
    "center_rewards_coefficient": Map("center_rewards_coefficient"),
}


DPO_OWN = {
    **LOADING,
    "router_aux_loss_coef": Ignore("MoE router loss: not used", (None,)),
    "disable_dropout": Refuse("dropout is off while training, as TRL's default", (True,)),
    "truncation_mode": Refuse("--long-rows truncate keeps the start", ("keep_start",)),
    "padding_free": Refuse("padding-free batches are not offered for dpo", (False,)),
    "precompute_ref_log_probs": Ignore("the reference is scored with each batch", (False,)),
    "precompute_ref_batch_size": Ignore("only with precompute_ref_log_probs", (None,)),
    "loss_type": Refuse("the DPO loss is sigmoid", (["sigmoid"], "sigmoid")),
    "loss_weights": Refuse("one loss: no weights", (None,)),
    "ld_alpha": Refuse("LD-DPO is not offered", (None,)),
    "f_divergence_type": Refuse("the divergence is reverse KL", ("reverse_kl",)),
    "f_alpha_divergence_coef": Ignore("only with f_divergence_type alpha_divergence (refused)", (0.5,)),
    "label_smoothing": Refuse("label smoothing is not offered", (0.0,)),
    "beta": Map("beta"),
    "use_weighting": Refuse("WPO weighting is not offered", (False,)),
    "discopop_tau": Ignore("only with loss_type discopop (refused)", (0.05,)),
    "sync_ref_model": Refuse("the reference stays fixed", (False,)),
    "ref_model_mixup_alpha": Ignore("only with sync_ref_model (refused)", (0.6,)),
    "ref_model_sync_steps": Ignore("only with sync_ref_model (refused)", (512,)),
}


# TRL 1.12's PPOConfig (trl.experimental.ppo; gone from TRL 1.16): its own fields and defaults.
TRL112_PPO_DEFAULTS = {
    "learning_rate": 3e-6,
    "dataset_num_proc": None,
    "num_mini_batches": 1,
    "total_episodes": None,
    "local_rollout_forward_batch_size": 64,
    "num_sample_generations": 10,
    "response_length": 53,
    "stop_token": None,
    "stop_token_id": None,
    "temperature": 0.7,
    "missing_eos_penalty": None,
    "sft_model_path": "EleutherAI/pythia-160m",
    "world_size": None,
    "num_total_batches": None,
    "micro_batch_size": None,
    "local_batch_size": None,
    "batch_size": None,
    "local_mini_batch_size": None,
    "mini_batch_size": None,
    "push_to_hub": False,
    "reward_model_path": "EleutherAI/pythia-160m",
    "model_adapter_name": None,
    "ref_adapter_name": None,
    "num_ppo_epochs": 4,
    "whiten_rewards": False,
    "kl_coef": 0.05,
    "kl_estimator": "k1",
    "cliprange": 0.2,
    "vf_coef": 0.1,
    "cliprange_value": 0.2,
    "gamma": 1.0,
    "lam": 0.95,
    "ds3_gather_for_generation": True,
}


COMPUTED = "computed by TRL's trainer from the batch settings"


PPO_OWN = {
    "learning_rate": Hook("`actor_lr` and `critic_lr` (TRL trains both with one optimizer)"),
    "per_device_train_batch_size": Hook(
        "`rollout_batch_size` = per_device_train_batch_size x gradient_accumulation_steps x processes"
    ),
    "gradient_accumulation_steps": Hook("`rollout_batch_size` (see per_device_train_batch_size)"),
    "num_train_epochs": Hook(
        "ignored with total_episodes (as TRL does); otherwise refused unless TRL's default: "
        "give total_episodes or --iterations"
    ),
    "max_steps": Ignore("TRL's PPO trainer runs total_episodes (here --iterations)", (-1,)),
    "logging_steps": Ignore("rto ppo logs every iteration", (10,)),
    "lr_scheduler_type": Map(
        "", lambda v: _lr_schedule(v, ppo=True), why="`lr_schedule` (cosine: with `lr_min_ratio` 0, as TRL's)"
    ),
    "use_cpu": Map("device", lambda on: "cpu" if on else None, boolean=True, why="(true: cpu)"),
    "ddp_timeout": Map("dist_timeout"),
    "dataset_name": Map("prompts"),
    "dataset_train_split": Map("prompts_split"),
    "dataset_config": Refuse("prompts from a hub dataset's default configuration only", (None,)),
    "model_name_or_path": Map("policy"),
    "dataset_num_proc": Ignore("the prompts are prepared in this process", (None,)),
    "num_mini_batches": Hook("`mini_batch_size` = the rollout / num_mini_batches"),
    "total_episodes": Hook("`iterations` = total_episodes / the rollout, rounded up"),
    "local_rollout_forward_batch_size": Map("score_batch_size"),
    "num_sample_generations": Ignore("samples are logged with each --eval-every evaluation", (10,)),
    "response_length": Map("max_new_tokens"),
    "stop_token": Hook("responses end at the tokenizer's EOS: eos or unset only"),
    "stop_token_id": Refuse("responses end at the tokenizer's EOS", (None,)),
    "temperature": Map("temperature"),
    "missing_eos_penalty": Map("missing_eos_penalty"),
    "sft_model_path": Map("policy"),
    **{
        k: Ignore(COMPUTED, (None,))
        for k in ("world_size", "num_total_batches", "local_batch_size", "batch_size", "local_mini_batch_size")
    },
    "micro_batch_size": Map("micro_batch_size", why="(TRL computes it; unset: ours)"),
    "mini_batch_size": Map("mini_batch_size", why="(TRL computes it; unset: ours)"),
    "reward_model_path": Map("reward_model"),
    "model_adapter_name": Refuse("adapters are named by rto (--lora-r)", (None,)),
    "ref_adapter_name": Refuse("adapters are named by rto (--lora-r)", (None,)),
    "num_ppo_epochs": Map("ppo_epochs"),
    "whiten_rewards": Hook("refused when true: advantages are whitened (--whiten-advantages)"),
    "kl_coef": Map("kl_coef"),
    "kl_estimator": Map("kl_estimator"),
    "cliprange": Map("clip_range"),
    "vf_coef": Ignore("separate Adam optimizers for policy and critic are invariant to a loss scale", (0.1,)),
    "cliprange_value": Map("value_clip"),
    "gamma": Map("gamma"),
    "lam": Map("lam"),
    "ds3_gather_for_generation": Ignore("sharded runs use FSDP2 (--shard), not DeepSpeed ZeRO-3", (True,)),
}


# Fields of older TRL and transformers versions that their YAML files still carry.
LEGACY = {
    "logging_dir": Ignore(LOG, (None,)),
    "evaluation_strategy": Ignore(EVAL, ("no",)),
    "overwrite_output_dir": Ignore("OUT is replaced by a finished run", (False, True)),
}


PPO_LEGACY = {"exp_name": Ignore("trackers name runs themselves", (None, "ppo"))}


BASE = {**TRAINING, **SCRIPT, **MODEL, **LEGACY}


STAGE_TABLES = {
    "sft": {**BASE, **SFT_OWN},
    "rm": {**BASE, **RM_OWN},
    "dpo": {**BASE, **DPO_OWN},
    "ppo": {**BASE, **PPO_OWN, **PPO_LEGACY},
}


def markdown() -> str:
    """docs/trl-compatibility.md, from the tables."""
    lines = [
        "# TRL compatibility",
        "",
        "<!-- generated by rto.io.trl_tables.markdown(); tests/test_trl_fields.py checks it -->",
        "",
        "`rto sft|rm|dpo|ppo --config FILE.yaml` read the YAML files (and `--flags`) written for TRL's own "
        "scripts: every field of TRL's config dataclasses (TRL 1.16's SFTConfig, RewardConfig and DPOConfig, "
        "TRL 1.12's PPOConfig, with every transformers TrainingArguments field they inherit, and the "
        "ScriptArguments and ModelConfig fields TRL's scripts read beside them) has one decision here:",
        "",
        "- **mapped**: read as the setting named (our own name for it wins when both are given);",
        "- **ignored**: read and ignored; one notice line names those set to a value other than the ones listed "
        "as needing no notice;",
        "- **refused**: an error unless its value is one listed as accepted (TRL's default always is). All "
        "the refusals of one file are reported together, in one run (exit code 2).",
        "",
        "A field at TRL's default value is never an error. An unknown key is an error, with a suggestion "
        "when a setting is close in meaning or spelling.",
        "",
        "Learning-rate schedules: TRL's `lr_scheduler_type` linear, cosine and constant (or "
        "constant_with_warmup) are honoured. Without it, `rto sft|rm|dpo` decay by cosine (to 0) and "
        "`rto ppo` by cosine to 10% of the peak (`--lr-schedule`, `--lr-min-ratio`); TRL's own default is "
        "linear, which a YAML written by TRL's dataclasses states.",
        "",
    ]
    for stage, table in STAGE_TABLES.items():
        c = counts(table)
        lines += [
            f"## rto {stage}",
            "",
            f"{len(table)} fields: {c['mapped']} mapped, {c['ignored']} ignored, {c['refused']} refused.",
            "",
            "| TRL field | decision | detail |",
            "|---|---|---|",
        ]
        for name in sorted(table):
            kind, detail = describe(table[name])
            lines.append(f"| `{name}` | {kind} | {detail.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)
