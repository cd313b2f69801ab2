"""TRL's RL configs in `rto ppo`'s settings: which TRL config a file was written for (PPOConfig,
GRPOConfig, RLOOConfig: `dialect`) and the settings TRL reads together (batch sizes, lengths of
training, the KL's place), beside the field-by-field tables of rto/io/trl_stage_tables.py."""

from __future__ import annotations

import sys

from rto.io.coercion import coerce
from rto.io.errors import UserError
from rto.io.trl_fields import normalised, trl_peft, trl_saving
from rto.io.trl_stage_tables import PPO_DIALECTS
from rto.runtime.distributed import launched_world_size

TYPES: dict[str, type] = {  # TRL's settings read together here, and their types
    "learning_rate": float,
    "per_device_train_batch_size": int,
    "gradient_accumulation_steps": int,
    "num_train_epochs": float,
    "num_mini_batches": int,
    "total_episodes": int,
    "whiten_rewards": bool,
    "stop_token": str,
    "steps_per_generation": int,
    "generation_batch_size": int,
    "max_steps": int,
    "num_iterations": int,
    "beta": float,
}
TRL_DEFAULT_EPOCHS = 3.0  # TrainingArguments' num_train_epochs
TRL_GROUP_SIZE = {"grpo": 8, "rloo": 2}  # GRPOConfig's and RLOOConfig's default num_generations


def dialect(values: dict, ours: set[str]) -> str:
    """'grpo' or 'rloo' when the settings hold a field of that TRL config that is neither PPOConfig's
    nor one of ours (RLOO's own fields first; `estimator: rloo` makes a GRPO-looking file RLOO's);
    else 'ppo'."""
    marks = {d: marks_of(d, values, ours) for d in ("grpo", "rloo")}
    if not marks["grpo"] and not marks["rloo"]:
        return "ppo"
    if marks["rloo"] and set(marks["rloo"]) - set(PPO_DIALECTS["grpo"]) or values.get("estimator") == "rloo":
        return "rloo"
    return "grpo"


def marks_of(kind: str, values: dict, ours: set[str]) -> list[str]:
    """The settings that are fields of TRL's `kind` config and neither PPOConfig's nor ours."""
    return sorted(set(values) & (set(PPO_DIALECTS[kind]) - set(PPO_DIALECTS["ppo"]) - ours))


class _Reader:
    """TRL's values popped out of `values`, typed; puts settings of ours unless given under our names."""

    def __init__(self, values: dict, where: str, problems: list[str]):
        self.values, self.where, self.problems = values, where, problems
        self.trl = {k: values.pop(k) for k in list(values) if k in TYPES}

    def put(self, key: str, value) -> None:  # ours win; TRL's computed ones are None (unset) in its YAML
        if self.values.get(key) is None:
            self.values[key] = value

    def get(self, key: str, default):
        if self.trl.get(key) is None:
            return default
        try:
            return coerce(self.trl[key], TYPES[key], f"{self.where}: {key}")
        except UserError as e:
            self.problems.append(str(e))
            return default

    def given(self, *keys: str) -> bool:
        return any(self.trl.get(k) is not None for k in keys)

    def ours(self, key: str, default: int) -> int:
        try:
            return int(self.values.get(key) or default)
        except (TypeError, ValueError):
            return default  # build() reports the bad value

    def epochs(self) -> None:
        """TRL's num_train_epochs (passes over the prompts) as `prompt_epochs`."""
        epochs = self.get("num_train_epochs", None)
        if epochs is not None and self.values.get("iterations") is None:
            self.put("prompt_epochs", epochs)


def read_ppo(values: dict, where: str, problems: list[str], defaults) -> dict:
    """TRL's PPO settings in ours. A rollout is per_device_train_batch_size x
    gradient_accumulation_steps x processes prompts (TRL's defaults 8 and 1), num_mini_batches
    mini-batches of it per epoch, total_episodes prompts in all (else num_train_epochs passes over
    the prompts); learning_rate is the policy's and the critic's (TRL trains both with one
    optimizer). whiten_rewards and a stop token other than EOS are not offered."""
    r = _Reader(values, where, problems)
    if r.get("learning_rate", None) is not None:
        r.put("actor_lr", r.get("learning_rate", None))
        r.put("critic_lr", r.get("learning_rate", None))
    if r.given("per_device_train_batch_size", "gradient_accumulation_steps"):
        per_device, accumulation = r.get("per_device_train_batch_size", 8), r.get("gradient_accumulation_steps", 1)
        r.put("rollout_batch_size", per_device * accumulation * launched_world_size())
    rollout = r.ours("rollout_batch_size", defaults.rollout_batch_size)
    n = r.get("num_mini_batches", 1)
    if n < 1 or rollout % n:
        problems.append(f"{where}: num_mini_batches {n} does not divide the rollout of {rollout} prompts")
    elif r.given("num_mini_batches"):
        r.put("mini_batch_size", rollout // n)
    if r.get("total_episodes", None) is not None:
        r.put("iterations", max(1, -(-r.get("total_episodes", 0) // rollout)))
    elif r.get("num_train_epochs", TRL_DEFAULT_EPOCHS) != TRL_DEFAULT_EPOCHS:
        r.epochs()
    if r.get("whiten_rewards", False):
        problems.append(f"{where}: whiten_rewards: not offered (advantages are whitened: --whiten-advantages)")
    if str(normalised(r.trl.get("stop_token")) or "eos").lower() != "eos":  # (None or to_dict()'s mask: unset)
        problems.append(f"{where}: stop_token {r.trl['stop_token']!r}: responses end at the tokenizer's EOS only")
    return values


def read_critic_free(values: dict, where: str, problems: list[str], kind: str, defaults) -> dict:
    """TRL's GRPO (kind 'grpo') or RLOO ('rloo') settings in ours. TRL counts completions: an optimizer
    step takes per_device_train_batch_size x gradient_accumulation_steps x processes of them (our
    mini-batch), a generation per_device_train_batch_size x steps_per_generation x processes (our
    rollout; or generation_batch_size), each pass over it num_iterations times (our ppo_epochs);
    max_steps counts optimizer steps. GRPO's beta weighs a k3 KL term in the loss and keeps the KL out
    of the reward; RLOO's beta weighs a k1 KL in the reward."""
    r = _Reader(values, where, problems)
    r.put("estimator", kind)
    r.put("num_generations", TRL_GROUP_SIZE[kind])  # (a file's own num_generations is read as ours)
    if r.get("learning_rate", None) is not None:
        r.put("actor_lr", r.get("learning_rate", None))
    world = launched_world_size()
    per_device, accumulation = r.get("per_device_train_batch_size", 8), r.get("gradient_accumulation_steps", 1)
    if r.given("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation"):
        r.put("micro_batch_size", per_device)
        r.put("mini_batch_size", per_device * accumulation * world)
    by_steps = per_device * r.get("steps_per_generation", accumulation) * world
    if r.given("generation_batch_size"):  # (GRPOConfig's dump holds both, the one computed from the other)
        if r.given("steps_per_generation") and r.get("generation_batch_size", 0) != by_steps:
            problems.append(
                f"{where}: generation_batch_size {r.get('generation_batch_size', 0)} is not per_device_train_batch_"
                f"size x steps_per_generation x processes ({by_steps}): give one of the two (as TRL asks)"
            )
        r.put("rollout_batch_size", r.get("generation_batch_size", 0))
    elif r.given("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation"):
        r.put("rollout_batch_size", by_steps)
    if r.given("num_iterations"):
        r.put("ppo_epochs", r.get("num_iterations", 1))
    rollout = r.ours("rollout_batch_size", defaults.rollout_batch_size)
    mini = r.ours("mini_batch_size", defaults.mini_batch_size)
    if r.get("max_steps", -1) > 0:
        per_rollout = max(1, rollout // max(mini, 1)) * r.ours("ppo_epochs", 1)
        r.put("iterations", max(1, -(-r.get("max_steps", 0) // per_rollout)))
    else:
        r.epochs()
    beta = r.get("beta", None)
    if kind == "grpo":
        r.put("kl_coef", 0.0)  # GRPO keeps the KL out of the reward
        if beta is not None:
            r.put("kl_loss_coef", beta)
        if "loss_type" not in values:  # (a loss_type given is mapped by the table)
            r.put("loss_agg", "token-mean")  # TRL's default loss_type, dapo
    else:
        if beta is not None:
            r.put("kl_coef", beta)
        r.put("loss_agg", "seq-mean-token-sum")  # TRL's RLOO: the sequence's log-prob sum times its advantage
    return values


def read(values: dict, where: str, problems: list[str], ours: set[str], defaults) -> dict:
    """`rto ppo`'s TRL settings read together, as the dialect of the file says."""
    kind = dialect(values, ours)
    trl_peft(values, where, problems)
    trl_saving(values, where, problems)
    if kind == "ppo":
        return read_ppo(values, where, problems, defaults)
    marks = marks_of(kind, values, ours)
    shown = [m for m in ("normalize_advantages", "beta", "loss_type", "epsilon") if m in marks] or marks
    shown = ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")
    estimator = values.get("estimator") or kind
    print(
        f"[rto] {where}: read as TRL's {kind.upper()}Config (it has {shown}): no critic, --estimator {estimator}",
        file=sys.stderr,
        flush=True,
    )
    return read_critic_free(values, where, problems, kind, defaults)
