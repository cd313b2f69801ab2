"""Each stage's table of TRL config fields (`STAGE_TABLES`: SFT, RM, DPO, PPO), built on the tables
every stage shares (rto/io/trl_tables.py), and the doc they generate (docs/trl-compatibility.md)."""

from __future__ import annotations

from rto.io.errors import UserError
from rto.io.trl_fields import Hook, Ignore, Map, Refuse, counts, describe
from rto.io.trl_tables import EVAL, HUB, LOADING, LOG, MODEL, SCRIPT, TOKENS, TRAINING, _lr_schedule

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


# What TRL's RL scripts (PPO, GRPO, RLOO) read alike.
RL_SCRIPT = {
    "lr_scheduler_type": Map(
        "", lambda v: _lr_schedule(v, ppo=True), why="`lr_schedule` (cosine: with `lr_min_ratio` 0, as TRL's)"
    ),
    "use_cpu": Map("device", lambda on: "cpu" if on else None, boolean=True, why="(true: cpu)"),
    "ddp_timeout": Map("dist_timeout"),
    "dataset_name": Map("prompts"),
    "dataset_train_split": Map("prompts_split"),
    "dataset_config": Refuse("prompts from a hub dataset's default configuration only", (None,)),
    "model_name_or_path": Map("policy"),
    "ds3_gather_for_generation": Ignore("sharded runs use FSDP2 (--shard), not DeepSpeed ZeRO-3", (True,)),
}


PPO_OWN = {
    **RL_SCRIPT,
    "learning_rate": Hook("`actor_lr` and `critic_lr` (TRL trains both with one optimizer)"),
    "per_device_train_batch_size": Hook(
        "`rollout_batch_size` = per_device_train_batch_size x gradient_accumulation_steps x processes"
    ),
    "gradient_accumulation_steps": Hook("`rollout_batch_size` (see per_device_train_batch_size)"),
    "num_train_epochs": Hook(
        "`prompt_epochs` (passes over the prompts set --iterations); ignored with total_episodes, as TRL does"
    ),
    "max_steps": Ignore("TRL's PPO trainer runs total_episodes (here --iterations)", (-1,)),
    "logging_steps": Ignore("rto ppo logs every iteration", (10,)),
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
}


# Fields of older TRL and transformers versions that their YAML files still carry.
LEGACY = {
    "logging_dir": Ignore(LOG, (None,)),
    "evaluation_strategy": Ignore(EVAL, ("no",)),
    "overwrite_output_dir": Ignore("OUT is replaced by a finished run", (False, True)),
}


PPO_LEGACY = {"exp_name": Ignore("trackers name runs themselves", (None, "ppo"))}


BASE = {**TRAINING, **SCRIPT, **MODEL, **LEGACY}


def _loss_type(v) -> str:
    """TRL's GRPO loss_type as our --loss-agg (bnpo normalises per process batch, the others change the objective)."""
    ours = {"grpo": "seq-mean-token-mean", "dapo": "token-mean", "dr_grpo": "seq-mean-token-sum"}
    if str(v) not in ours:
        raise UserError(f"loss_type {v!r}: offered: grpo, dapo, dr_grpo (--loss-agg)")
    return ours[str(v)]


def _scale_rewards(v) -> str:
    return {True: "group", False: "none"}.get(v, v) if isinstance(v, bool) else str(v)


ONLY_VLLM_SERVER = "only with vllm_mode server (refused)"
ONLY_VLLM_IS = "vLLM's sampling log-probs are never trained on: the policy rescores every response"
# The fields GRPOConfig and RLOOConfig share past TrainingArguments (TRL 1.16), and their scripts'.
CRITIC_FREE_SHARED = {
    **RL_SCRIPT,
    "learning_rate": Hook("`actor_lr` (no critic)"),
    "per_device_train_batch_size": Hook(
        "responses per process per micro-step: `micro_batch_size`; x gradient_accumulation_steps x processes: "
        "`mini_batch_size`"
    ),
    "gradient_accumulation_steps": Hook("`mini_batch_size` (see per_device_train_batch_size)"),
    "steps_per_generation": Hook(
        "`rollout_batch_size` = per_device_train_batch_size x steps_per_generation (TRL's default: "
        "gradient_accumulation_steps) x processes"
    ),
    "generation_batch_size": Hook("`rollout_batch_size`, instead of steps_per_generation"),
    "max_steps": Hook("`iterations` = optimizer steps / (mini-batches per rollout x num_iterations), rounded up"),
    "num_train_epochs": Hook("`prompt_epochs` (passes over the prompts set --iterations), unless max_steps is set"),
    "num_iterations": Hook("`ppo_epochs` (its steps count in max_steps)"),
    "beta": Hook("GRPO: `kl_loss_coef` (k3 in the loss; no KL in the reward); RLOO: `kl_coef` (k1 in the reward)"),
    "logging_steps": Ignore("rto ppo logs every iteration", (10,)),
    "remove_unused_columns": Ignore("the prompt rows are read as they are", (True, False)),
    "model_init_kwargs": LOADING["model_init_kwargs"],
    "trust_remote_code": LOADING["trust_remote_code"],
    "router_aux_loss_coef": Ignore("MoE router loss: not used", (None,)),
    "disable_dropout": Ignore("dropout is off in every pass of rto ppo (log-probs must not depend on a draw)", (True,)),
    "num_generations": Map("num_generations"),
    "num_generations_eval": Ignore("dev evaluations sample one response per prompt", (None,)),
    "max_completion_length": Map("max_new_tokens"),
    "shuffle_dataset": Ignore("prompts are drawn in a shuffled order", (True,)),
    "pad_to_multiple_of": Ignore("padding detail", ("auto", None)),
    "temperature": Map("temperature"),
    "top_p": Map("top_p"),
    "top_k": Map("top_k"),
    "min_p": Refuse("min-p sampling is not offered", (None,)),
    "generation_kwargs": Refuse("sampling options other than temperature, top_k, top_p are not offered", (None,)),
    "chat_template_kwargs": Refuse("chat-template options are not offered", (None,)),
    "repetition_penalty": Refuse("a repetition penalty changes the sampled policy: not offered", (1.0,)),
    "cache_implementation": Ignore("generation detail", (None,)),
    "use_vllm": Map(
        "generation_backend",
        lambda on: None if on is None else "vllm" if on else "hf",
        boolean=True,
        why="(true: vllm)",
    ),
    "vllm_mode": Refuse("vLLM runs inside the training processes (colocate)", ("colocate",)),
    "vllm_model_impl": Ignore("vLLM's own model code", ("vllm",)),
    "vllm_enable_sleep_mode": Ignore("the engine stays awake", (False,)),
    "vllm_structured_outputs_regex": Refuse("structured outputs are not offered", (None,)),
    "vllm_server_base_url": Ignore(ONLY_VLLM_SERVER, (None,)),
    "vllm_server_host": Ignore(ONLY_VLLM_SERVER, ("0.0.0.0",)),
    "vllm_server_port": Ignore(ONLY_VLLM_SERVER, (8000,)),
    "vllm_server_timeout": Ignore(ONLY_VLLM_SERVER, (240.0,)),
    "vllm_group_port": Ignore(ONLY_VLLM_SERVER, (51216,)),
    "vllm_gpu_memory_utilization": Map("vllm_gpu_memory_utilization"),
    "vllm_max_model_length": Ignore("the engine's length is the prompt and response limits", (None,)),
    "vllm_tensor_parallel_size": Refuse("one GPU per vLLM engine", (1,)),
    "epsilon": Map("clip_range"),
    "epsilon_high": Map("clip_range_high"),
    "reward_weights": Refuse("one reward (the RM's, with custom_rewards' own weights)", (None,)),
    "mask_truncated_completions": Refuse("not offered: penalise them with missing_eos_penalty", (False,)),
    "sync_ref_model": Refuse("the reference stays fixed", (False,)),
    "ref_model_mixup_alpha": Ignore("only with sync_ref_model (refused)", (0.6,)),
    "ref_model_sync_steps": Ignore("only with sync_ref_model (refused)", (512,)),
    "log_completions": Ignore("samples are logged with each --eval-every evaluation", (False,)),
    "log_multimodal": Ignore("text only", (True,)),
    "num_completions_to_print": Ignore(LOG, (None,)),
    "log_unique_prompts": Ignore(LOG, (False,)),
    "use_transformers_continuous_batching": Ignore("generation detail", (False,)),
    "transformers_continuous_batching_config": Ignore("generation detail", (None,)),
    "use_transformers_paged": Ignore("generation detail", (False,)),
    "reward_model_name_or_path": Map("reward_model"),
    "reward_funcs": Refuse(
        "TRL's reward functions score texts; rto's rewards are the RM's and per-token custom_rewards", (None,)
    ),
}

GRPO_OWN = {
    "scale_rewards": Map("scale_rewards", _scale_rewards),
    "loss_type": Map(
        "loss_agg",
        _loss_type,
        why="grpo: seq-mean-token-mean, dapo: token-mean, dr_grpo: "
        "seq-mean-token-sum (Dr. GRPO's constant 1/max_completion_length left to the learning rate)",
    ),
    "importance_sampling_level": Refuse("the ratio is per token (GSPO's sequence level is not offered)", ("token",)),
    "delta": Refuse("two-sided clipping is not offered", (None,)),
    "top_entropy_quantile": Refuse("every token is trained on", (1.0,)),
    "entropy_coef": Refuse("an entropy bonus is not offered", (0.0,)),
    "use_adaptive_entropy": Refuse("an entropy bonus is not offered", (False,)),
    **{
        k: Ignore("only with use_adaptive_entropy (refused)", (d,))
        for k, d in (
            ("entropy_coef_min", 0.0),
            ("entropy_coef_max", 1.0),
            ("entropy_coef_delta", 0.005),
            ("entropy_target", 0.2),
        )
    },
    **{
        k: Ignore("only with loss_type sapo or vespo (refused)", (d,))
        for k, d in (
            ("sapo_temperature_neg", 1.05),
            ("sapo_temperature_pos", 1.0),
            ("vespo_k_pos", 2.0),
            ("vespo_lambda_pos", 3.0),
            ("vespo_k_neg", 3.0),
            ("vespo_lambda_neg", 2.0),
        )
    },
    "multi_objective_aggregation": Ignore("one reward: nothing to aggregate", ("sum_then_normalize",)),
    "cast_lm_head_to_fp32": Ignore("the head runs in the model's precision", (False,)),
    "max_tool_calling_iterations": Refuse("tool calling is not offered", (None,)),
    "off_policy_mask_threshold": Refuse("off-policy masking is not offered", (None,)),
    "vllm_importance_sampling_correction": Ignore(ONLY_VLLM_IS, (True, False)),
    "vllm_importance_sampling_mode": Ignore(ONLY_VLLM_IS, ("sequence_mask",)),
    "vllm_importance_sampling_clip_max": Ignore(ONLY_VLLM_IS, (3.0,)),
    "vllm_importance_sampling_clip_min": Ignore(ONLY_VLLM_IS, (None,)),
    "vllm_importance_sampling_cap": Ignore(ONLY_VLLM_IS, (None,)),
    "use_bias_correction_kl": Ignore(ONLY_VLLM_IS, (True, False)),
    "log_completions_hub_repo": Ignore(HUB, (None,)),
}

RLOO_OWN = {
    "normalize_advantages": Refuse("RLOO's advantages are not renormalised over the batch here", (False,)),
    "reward_clip_range": Refuse("the RM score is clamped symmetrically (score_clip)", (None,)),
}

STAGE_TABLES = {
    "sft": {**BASE, **SFT_OWN},
    "rm": {**BASE, **RM_OWN},
    "dpo": {**BASE, **DPO_OWN},
    "ppo": {**BASE, **PPO_OWN, **PPO_LEGACY},
}


# `rto ppo --config` reads a file as TRL's PPOConfig, GRPOConfig or RLOOConfig (rto.rl.trl_config.dialect).
PPO_DIALECTS = {
    "ppo": STAGE_TABLES["ppo"],
    "grpo": {**BASE, **CRITIC_FREE_SHARED, **GRPO_OWN},
    "rloo": {**BASE, **CRITIC_FREE_SHARED, **RLOO_OWN},
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
        "TRL 1.12's PPOConfig, TRL 1.16's GRPOConfig and RLOOConfig, with every transformers TrainingArguments "
        "field they inherit, and the ScriptArguments and ModelConfig fields TRL's scripts read beside them) has "
        "one decision here:",
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
        "`rto ppo` reads a file as a GRPOConfig or RLOOConfig when it holds one of their own fields that is neither "
        "PPOConfig's nor a setting of ours (beta, epsilon, loss_type, max_completion_length, ...; RLOO's: "
        "normalize_advantages, reward_clip_range), and says so. Such a file trains without a critic: "
        "`estimator` grpo or rloo (ours, given, wins), groups of `num_generations` (TRL's 8 for GRPO, 2 for "
        "RLOO, unless the file says), GRPO's KL as a k3 term in "
        "the loss (`kl_loss_coef`, and `kl_coef` 0), RLOO's as k1 in the reward (`kl_coef`), the loss "
        "aggregated as TRL's loss_type default (GRPO: dapo, token-mean) or RLOO's sequence sum "
        "(`seq-mean-token-sum`: TRL's RLOO ratio is per sequence; here it is per token, which gives the same "
        "gradient on the first pass over a rollout). Add `reward: rto` (and `dpo_model`) for RTO's dense reward.",
        "",
    ]
    headings = {**{stage: f"rto {stage}" for stage in STAGE_TABLES}, "grpo": "rto ppo, a GRPOConfig file"}
    headings["rloo"] = "rto ppo, an RLOOConfig file"
    for key, table in {**STAGE_TABLES, **PPO_DIALECTS}.items():
        c = counts(table)
        lines += [
            f"## {headings[key]}",
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
