"""Settings of `rto ppo` (PPO and RTO), apart from the trainer (rto/rl/trainer.py), as TRL keeps
`ppo_config.py` beside `ppo_trainer.py`: the CLI builds its flags from here without importing
the trainer. Grouped as the trainer uses them; every field's help is its flag's help.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from rto.core.advantages import ESTIMATORS
from rto.core.losses import LOSS_AGGREGATIONS
from rto.core.rewards import ENSEMBLE_REDUCTIONS, KL_ESTIMATORS, PLACEMENTS, REWARD_KINDS
from rto.io.config import (
    chat_template_field,
    columns_field,
    judge_field,
    opt,
    require,
    skip_bad_rows_field,
    source_field,
    split_field,
)
from rto.io.errors import UserError
from rto.io.trl_stage_tables import PPO_DIALECTS, STAGE_TABLES
from rto.lm.rollout import Sampling
from rto.rl import trl_config
from rto.rl.trl_config import dialect
from rto.runtime.distributed import launched_world_size
from rto.runtime.process import report_to_field, seed_field, threads_field
from rto.runtime.tracking import trackers


@dataclass
class PPOStageConfig:
    # Every field of TRL's PPOConfig (and TrainingArguments, ScriptArguments, ModelConfig), decided.
    TRL_FIELDS: ClassVar[dict] = STAGE_TABLES["ppo"]
    TRL_DIALECTS: ClassVar[dict] = PPO_DIALECTS  # a GRPOConfig or RLOOConfig file is read by its own table

    @staticmethod
    def trl_table(values: dict) -> dict:
        """The TRL table a file's settings are read by: PPOConfig's, GRPOConfig's or RLOOConfig's."""
        return PPO_DIALECTS[dialect(values, PPOStageConfig.setting_names())]

    @staticmethod
    def from_trl(values: dict, where: str, problems: list[str]) -> dict:
        """TRL's settings read together (batch sizes, training length, the KL's place): rto/rl/trl_config.py."""
        return trl_config.read(values, where, problems, PPOStageConfig.setting_names(), PPOStageConfig)

    @staticmethod
    def setting_names() -> set[str]:
        return {f.name for f in dataclasses.fields(PPOStageConfig)}

    # --- models and data ---
    policy: str = opt("", "SFT model directory: the policy starts here")
    prompts: str = source_field("the prompts, {prompt} or {messages} rows")
    prompts_split: str = split_field("train", "prompts")
    out: str = opt("", "output directory: OUT/policy, OUT/critic, OUT/metrics.jsonl (per iteration), OUT/metrics.json")
    reward_model: str = opt("", "reward model directory (not needed for --reward dpo-only)")
    ref: str = opt("", "reference model for the KL penalty (empty: --policy)")
    critic: str = opt("", "critic initialisation (empty: --reward-model, else --policy with a new head)")
    dpo_model: str = opt("", "DPO model directory (needed by the dense variants)")
    dpo_ref: str = opt("", "the model DPO was trained from (empty: --ref)")
    task: str = opt("", "task with a gold reward to log (empty: none)")
    eval_prompts: str = opt("", "JSONL prompts for periodic evaluation (empty: none)")
    # --- the reward ---
    reward: str = opt(
        "sparse",
        "where the DPO term goes: " + "; ".join(f"{p.name}: {p.summary}" for p in PLACEMENTS.values()),
        choices=REWARD_KINDS,
    )
    beta1: float = opt(0.05, "scale of the DPO token reward (0 switches it off)", ge=0)
    dpo_clip: float | None = opt(0.05, "clamp of the scaled DPO term to [-clip, clip] (none: no clamp)", gt=0)
    kl_coef: float = opt(0.01, "KL penalty coefficient (beta2)", ge=0)
    kl_estimator: str = opt("k1", "per-token KL estimator in the reward", choices=tuple(KL_ESTIMATORS))
    kl_target: float | None = opt(None, "target KL per response for the adaptive controller (none: fixed)", gt=0)
    kl_horizon: int = opt(10000, "adaptive KL horizon (in responses)", ge=1)
    rm_weight: float = opt(1.0, "weight of the RM score at the last token (beta3)")
    reward_model_ensemble: list[str] = opt(
        [],
        "more reward models (other seeds or resamples of the pairs): with "
        "--reward-model, each standardised with its own stats, combined by "
        "--ensemble-reduce into the sparse score",
    )
    ensemble_reduce: str = opt(
        "mean_minus_std",
        "how the ensemble's scores combine: mean, mean - --ensemble-std-coef * std, or min",
        choices=tuple(ENSEMBLE_REDUCTIONS),
    )
    ensemble_std_coef: float = opt(1.0, "the multiple of the members' std taken off with mean_minus_std", ge=0)
    normalize_score: bool = opt(True, "standardise the RM score with the mean/std stored at RM training")
    score_clip: float | None = opt(10.0, "clamp of the (standardised) RM score", gt=0)
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of responses cut off without EOS")
    segment_delimiters: list[str] = opt([], "tokens that end a segment for --reward semi (EOS always does)")
    custom_rewards: list[str] = opt(
        [], "extra per-token rewards, module:function=weight (see rto/rl/custom_rewards.py)"
    )
    # --- advantages ---
    estimator: str = opt(
        "gae",
        "advantage estimator: " + "; ".join(f"{e.name}: {e.summary}" for e in ESTIMATORS.values()),
        choices=tuple(ESTIMATORS),
    )
    gamma: float = opt(1.0, "discount", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda", ge=0, le=1)
    whiten_advantages: bool = opt(True, "gae: whiten advantages over the rollout")
    num_generations: int = opt(
        1, "responses sampled per prompt, a group (TRL's num_generations); grpo and rloo need 2 or more", ge=1
    )
    scale_rewards: str = opt(
        "group",
        "grpo: divide the advantages by the std of the group's returns (group), of the batch's (batch), "
        "or not at all (none: Dr. GRPO)",
        choices=("group", "batch", "none"),
    )
    # --- optimization ---
    iterations: int = opt(100, "rollout + update iterations", ge=1)
    prompt_epochs: float = opt(
        0.0,
        "passes over --prompts instead of --iterations: iterations = passes x prompts / prompts per rollout "
        "(TRL's num_train_epochs; 0: --iterations)",
        ge=0,
    )
    seed: int = seed_field()
    rollout_batch_size: int = opt(64, "responses per rollout (prompts x --num-generations)", ge=1)
    mini_batch_size: int = opt(16, "responses per optimizer step", ge=1)
    micro_batch_size: int = opt(0, "responses per forward/backward (0: = mini-batch)", ge=0)
    ppo_epochs: int = opt(1, "passes over each rollout", ge=1)
    actor_lr: float = opt(5e-7, "policy learning rate", gt=0)
    critic_lr: float = opt(9e-6, "critic learning rate", gt=0)
    adam_beta1: float = opt(0.9, "Adam beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.95, "Adam beta2", ge=0, lt=1)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = opt(
        "cosine",
        "learning-rate decay after warm-up: cosine (to --lr-min-ratio of the peak), linear (to 0; TRL's "
        "default) or constant",
    )
    lr_min_ratio: float = opt(0.1, "where --lr-schedule cosine ends, as a fraction of the peak", ge=0, lt=1)
    warmup_ratio: float = opt(0.03, "fraction of optimizer steps spent warming up", ge=0, lt=1)
    warmup_steps: int = opt(0, "warm-up length in optimizer steps, instead of --warmup-ratio (0: by the ratio)", ge=0)
    max_grad_norm: float = opt(1.0, "gradient-norm clip", gt=0)
    clip_range: float = opt(0.2, "PPO ratio clip: the ratio stays in [1 - this, 1 + this]", gt=0)
    clip_range_high: float | None = opt(
        None,
        "the upper clip, 1 + this, where it differs (DAPO's clip-higher, TRL's epsilon_high; none: --clip-range)",
        gt=0,
    )
    loss_agg: str = opt(
        "seq-mean-token-mean",
        "how per-token losses add up: token mean per response then mean over responses; token-mean over "
        "all tokens; seq-mean-token-sum (per response sums, mean over responses)",
        choices=tuple(LOSS_AGGREGATIONS),
    )
    kl_loss_coef: float = opt(
        0.0,
        "GRPO's KL term: this times the k3 KL to the reference, in the policy loss (the reward's is --kl-coef)",
        ge=0,
    )
    value_clip: float | None = opt(0.2, "value clip around rollout values (none: off)", gt=0)
    # --- generation ---
    max_new_tokens: int = opt(64, "response length limit", ge=1)
    max_prompt_len: int = opt(512, "prompt length limit in tokens", ge=1)
    columns: dict = columns_field("prompt", "prompt: question")
    skip_bad_rows: bool = skip_bad_rows_field("prompt")
    chat_template_path: str = chat_template_field("policy")
    long_prompts: Literal["error", "skip", "truncate"] = opt(
        "error", "a prompt over --max-prompt-len: error (naming its row), skip (counted), or truncate (keep its end)"
    )
    temperature: float = opt(1.0, "sampling temperature (log-probs use the same)", gt=0)
    top_k: int = opt(0, "top-k sampling (0: off)", ge=0)
    top_p: float = opt(1.0, "nucleus sampling", gt=0, le=1)
    # --- memory ---
    lora_r: int = opt(
        0,
        "LoRA rank; > 0: policy and critic are adapters on one frozen shared base, the "
        "reference is that base, a DPO adapter (rto dpo --lora-r) joins it",
        ge=0,
    )
    lora_alpha: float = opt(16.0, "LoRA alpha", gt=0)
    lora_target_modules: list[str] = opt(["all-linear"], "modules that get LoRA adapters (peft names)")
    gradient_checkpointing: bool = opt(
        False,
        "recompute each decoder layer's activations in the update's backward "
        "pass (policy and critic): less memory for long responses, one more "
        "forward of every layer per update",
    )
    # --- speed ---
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (cuda when there is one)")
    threads: int = threads_field()
    precision: Literal["auto", "fp32", "bf16"] = opt(
        "auto",
        "bf16: frozen models stored in bf16, trained ones in fp32 under bf16 autocast (auto: bf16 on a "
        "GPU that supports it, else fp32)",
    )
    packing: bool = opt(False, "padding-free scoring and training passes (sequences packed into rows)")
    pack_row_tokens: int = opt(0, "row length when packing (0: the longest sequence)", ge=0)
    score_batch_size: int = opt(0, "sequences per scoring pass (0: the whole rollout at once)", ge=0)
    generation_backend: Literal["hf", "vllm"] = opt(
        "hf", "rollout sampling: hf (transformers generate) or vllm (GPU; weights synced after every update)"
    )
    vllm_gpu_memory_utilization: float = opt(
        0.3, "GPU memory share vLLM may take (--generation-backend vllm)", gt=0, le=1
    )
    # --- many processes (accelerate launch / torchrun) ---
    shard: Literal["auto", "full", "none"] = opt(
        "auto",
        "several processes: full: policy and critic sharded over them with their Adam states (FSDP2); "
        "none: a whole copy in each, gradients all-reduced; auto: full under an FSDP (or DeepSpeed) "
        "accelerate config, else none",
    )
    shard_frozen: Literal["auto", "shard", "replicate"] = opt(
        "auto", "reference, DPO model and RMs: sharded (forward only) or whole in each process (auto: as --shard)"
    )
    dist_timeout: float = opt(
        600.0,
        "seconds a process waits for the others in a collective before the run "
        "stops with an error (a dead process is noticed sooner); more than process 0 "
        "takes to write a model or checkpoint, while the others wait",
        gt=0,
    )
    # --- logging ---
    report_to: list[str] = report_to_field()
    eval_every: int = opt(10, "evaluate on --eval-prompts every N iterations (0: never)", ge=0)
    n_eval: int = opt(128, "evaluation prompts used", ge=1)
    # --- guards ---
    max_bad_steps: int = opt(
        3, "consecutive non-finite updates (loss, gradient, reward, log-prob) skipped before the run stops", ge=0
    )
    kl_alert: float | None = opt(None, "report iterations whose KL to the reference per response exceeds this", gt=0)
    # --- checkpoints ---
    save_every: int = opt(0, "write a resumable checkpoint to OUT/checkpoints every N iterations (0: never)", ge=0)
    keep_last: int = opt(2, "checkpoints kept (older ones are deleted; 0: keep all)", ge=0)
    resume: str = opt("", "resume from a checkpoint: auto (the latest in OUT/checkpoints, if any) or its path")
    save_critic: bool = opt(True, "also save the critic to OUT/critic")
    # --- choosing the result on the dev prompts (rto.core.selection) ---
    judge: str = judge_field(
        "held-out judge of the dev responses, never trained on, logged as judge_score (e.g. an RM trained on "
        "other pairs)"
    )
    select_by: Literal["", "gold_reward", "judge_score"] = opt(
        "",
        "dev criterion that picks the saved policy among the evaluations (OUT/policy; the last one goes to "
        "OUT/policy_last): gold_reward (needs --task) or judge_score (needs --judge); empty: the last policy",
    )
    patience: int = opt(0, "with --select-by: stop after this many evaluations without a new best (0: never)", ge=0)
    kl_budget: float | None = opt(
        None,
        "with --select-by: stop once the dev KL to the reference exceeds this "
        "(nats per response); a point over it is never selected",
        gt=0,
    )

    @property
    def uses_dpo(self) -> bool:
        return PLACEMENTS[self.reward].uses_dpo and self.beta1 > 0

    @property
    def sampling(self) -> Sampling:
        """How rollouts are drawn (dev points are drawn at the same length and temperature, untruncated)."""
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    @property
    def held_out_metric(self) -> str:
        """The dev score the proxy is checked against (over-optimisation): the selection's criterion,
        else the gold reward, else the judge's score ("" when there is none)."""
        return self.select_by or ("gold_reward" if self.task else "judge_score" if self.judge else "")

    @property
    def needs_critic(self) -> bool:
        """A value network is loaded, trained and saved only for an estimator that needs one."""
        return ESTIMATORS[self.estimator].needs_critic

    @property
    def uses_rm(self) -> bool:
        return PLACEMENTS[self.reward].uses_rm and self.rm_weight != 0

    def validate(self):
        require(self, "ppo", "policy", "prompts", "out")
        trackers(self.report_to, "ppo")  # a missing tracker package stops the run before any work
        if self.select_by and not (self.eval_prompts and self.eval_every):
            raise UserError("ppo: --select-by needs dev prompts to evaluate on (--eval-prompts, --eval-every > 0)")
        if self.select_by == "gold_reward" and not self.task:
            raise UserError("ppo: --select-by gold_reward needs a --task with a gold reward")
        if self.select_by == "judge_score" and not self.judge:
            raise UserError("ppo: --select-by judge_score needs a --judge")
        if self.judge and self.judge in (self.reward_model, self.policy):
            raise UserError("ppo: --judge must be a model the training does not optimise, not the --reward-model")
        if (self.patience or self.kl_budget) and not self.select_by:
            raise UserError("ppo: --patience and --kl-budget act on the dev selection: set --select-by")
        if self.uses_rm and not self.reward_model:
            raise UserError(f"ppo: --reward {self.reward} needs --reward-model")
        if self.reward_model_ensemble and self.uses_rm and not self.normalize_score:
            raise UserError("ppo: --reward-model-ensemble combines standardised RM scores: it needs --normalize-score")
        if self.uses_dpo and not self.dpo_model:
            raise UserError(f"ppo: --reward {self.reward} needs --dpo-model (or --beta1 0)")
        if ESTIMATORS[self.estimator].needs_groups and self.num_generations < 2:
            raise UserError(
                f"ppo: --estimator {self.estimator} compares responses to one prompt: --num-generations >= 2"
            )
        if self.rollout_batch_size % self.mini_batch_size:
            raise UserError("ppo: --rollout-batch-size must be a multiple of --mini-batch-size")
        if self.micro_batch_size and self.mini_batch_size % self.micro_batch_size:
            raise UserError("ppo: --mini-batch-size must be a multiple of --micro-batch-size")
        world = launched_world_size()
        if world > 1 and (self.rollout_batch_size % world or self.mini_batch_size % world):
            raise UserError(
                f"ppo: with {world} processes --rollout-batch-size ({self.rollout_batch_size}) and "
                f"--mini-batch-size ({self.mini_batch_size}) must be multiples of {world}: each "
                "process takes an equal share of both"
            )
        if self.rollout_batch_size % (world * self.num_generations):
            raise UserError(
                f"ppo: --rollout-batch-size ({self.rollout_batch_size}) must be a multiple of --num-generations "
                f"({self.num_generations}) times the processes ({world}): a prompt's group stays in one process"
            )
        if self.micro_batch_size and world > 1 and (self.mini_batch_size // world) % self.micro_batch_size:
            raise UserError(
                f"ppo: --micro-batch-size must divide each process's share of the mini-batch "
                f"({self.mini_batch_size // world})"
            )
