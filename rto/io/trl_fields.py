"""What this tool does with each of TRL's settings: the decisions, their matching, and the doc.

Every field of TRL's config dataclasses (SFTConfig, RewardConfig, DPOConfig, the PPOConfig of
TRL 1.12, with every transformers.TrainingArguments field they inherit, and the ScriptArguments
and ModelConfig fields TRL's scripts read beside them) has exactly one decision in the tables of
rto/io/trl_tables.py:

- `Map`: read as one (or several) of our settings;
- `Ignore`: read and ignored; a notice names it unless its value is one of `ok` (values that
  mean what this tool does anyway, TRL's default among them where that is true);
- `Refuse`: an error unless its value is one of `ok` (TRL's default always is one);
- `Hook`: read together with other settings by the stage's `from_trl` (batch sizes, LoRA, saving).

The tables hold TRL's defaults themselves, so reading a config never imports TRL (`rto ppo` has no
TRL trainer at all); tests/test_trl_fields.py checks them against the installed TRL's dataclasses.
`rto.io.config.build` applies them; docs/trl-compatibility.md is `rto.io.trl_tables.markdown()`'s output.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rto.io.coercion import coerce
from rto.io.errors import UserError


@dataclass(frozen=True)
class Map:
    """Read as our setting `target`; `value` turns TRL's value into ours, or (target "") into
    {setting: value} for several of ours. A setting given under our own name wins. A value of
    None (TRL's "unset") leaves our default, unless `value` says otherwise."""

    target: str
    value: Callable[[Any], Any] | None = None
    boolean: bool = False  # its flag is a switch (--bf16 / --no-bf16)
    why: str = ""

    def settings(self, raw: Any, where: str, name: str) -> dict[str, Any]:
        """{our setting: value} for TRL's `name: raw`; UserError naming `where` and `name`."""
        if self.value is None:
            return {} if raw is None else {self.target: raw}
        if self.boolean:
            raw = coerce(raw, bool | None, f"{where}: {name}")
        try:
            out = self.value(raw)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except (TypeError, ValueError):
            raise UserError(f"{where}: {name}: cannot read {raw!r}") from None
        return out if not self.target else {} if out is None else {self.target: out}


@dataclass(frozen=True)
class Ignore:
    why: str
    ok: tuple = ()  # values that need no notice


@dataclass(frozen=True)
class Refuse:
    why: str
    ok: tuple = ()  # values accepted silently: TRL's default, and what means the same here


@dataclass(frozen=True)
class Hook:
    why: str  # read by the stage config's from_trl


def normalised(v: Any) -> Any:
    """One spelling per value: YAML and flag strings, to_dict()'s masks and empties compared alike."""
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("", "none", "null") or re.fullmatch(r"<[a-z_]+>", low):  # to_dict() masks *_token values
            return None
        if low in ("true", "false"):
            return low == "true"
        try:
            return float(low)
        except ValueError:
            return v
    if isinstance(v, (list, tuple)):
        return None if not v else [normalised(x) for x in v]
    if isinstance(v, dict):
        return None if not v else {k: normalised(x) for k, x in v.items()}
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


def same(value: Any, ok: tuple) -> bool:
    value = normalised(value)
    return any(value == normalised(o) and type(value) is type(normalised(o)) for o in ok)


# Our settings, each with the names close in meaning (not in spelling) that people type for it
# (other trainers' names, habits): suggested for an unknown key when the config has the setting.
MEANT_BY = {
    "critic": "value_model_path value_model critic_model_path critic_model",
    "ref": "ref_model_path ref_model reference_model",
    "ref_model": "ref_model_path reference_model",
    "model": "model_path",
    "policy": "policy_model model_path",
    "reward_model": "reward_model_name rm_path",
    "learning_rate": "lr",
    "actor_lr": "lr policy_learning_rate",
    "critic_lr": "critic_learning_rate",
    "epochs": "num_epochs",
    "ppo_epochs": "epochs num_epochs",
    "kl_coef": "kl_penalty init_kl_coef",
    "kl_estimator": "kl_penalty",
    "kl_target": "target_kl target",
    "kl_horizon": "horizon",
    "response_length": "max_new_tokens",
    "data": "train_file dataset dataset_path",
    "prompts": "train_file dataset dataset_path prompt_file",
    "out": "output",
    "rollout_batch_size": "batch_size",
    "warmup_ratio": "warmup",
    "warmup_steps": "warmup",
    "lr_schedule": "lr_scheduler scheduler",
    "precision": "fp32 dtype mixed_precision",
    "report_to": "wandb",
}
SYNONYMS: dict[str, tuple[str, ...]] = {}  # a name typed -> our settings it may mean, in MEANT_BY's order
for _setting, _typed in MEANT_BY.items():
    for _name in _typed.split():
        SYNONYMS[_name] = (*SYNONYMS.get(_name, ()), _setting)


def suggest(name: str, names: set[str]) -> list[str]:
    """Settings the user may have meant: synonyms, then spellings within a small edit."""
    out = [s for s in SYNONYMS.get(name, ()) if s in names]
    for spelling in dict.fromkeys((name, name.replace("learning_rate", "lr"), name.replace("_lr", "_learning_rate"))):
        out += [s for s in difflib.get_close_matches(spelling, sorted(names), n=3, cutoff=0.8) if s not in out]
    return out[:3]


def decisions(cls, values: dict | None = None) -> dict[str, Map | Ignore | Refuse | Hook]:
    """The TRL table `values` are read by: the class's, or (`trl_table`) the one its settings call for."""
    if values is not None and hasattr(cls, "trl_table"):
        return cls.trl_table(values)
    return getattr(cls, "TRL_FIELDS", {})


def flag_decisions(cls) -> dict[str, Map | Ignore | Refuse | Hook]:
    """Every TRL field a class's flags may name (every table it reads by; a switch wins)."""
    out: dict = {}
    for table in getattr(cls, "TRL_DIALECTS", {}).values() or [decisions(cls)]:
        for name, decision in table.items():
            if name not in out or hidden_flag_kind(decision) == "bool":
                out[name] = decision
    return out


def hidden_flag_kind(decision) -> str:
    """'bool' for a switch flag (--x / --no-x), 'value' otherwise (a value or, alone, true)."""
    return "bool" if isinstance(decision, Map) and decision.boolean else "value"


def check_not_refused(name: str, raw: Any, decision, where: str) -> str | None:
    """The problem line of a refused value, or None."""
    if isinstance(decision, Refuse) and not same(raw, decision.ok):
        return f"{where}: {name}: {decision.why} (got {raw!r})"
    return None


def fail_if(problems: list[str]) -> None:
    """All of a file's problems in one error, one line each."""
    if problems:
        raise UserError(
            "\n".join(problems)
            if len(problems) == 1
            else f"{len(problems)} settings cannot be used:\n" + "\n".join(problems)
        )


# --- settings read together (the stages' from_trl) -------------------------------------------
# TRL's LoRA settings, dropped when its use_peft is false (a TRL YAML lists them all).
PEFT_ONLY_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_parameters",
    "lora_modules_to_save",
    "lora_task_type",
    "use_rslora",
    "use_dora",
)


def trl_peft(values: dict, where: str, problems: list[str]) -> None:
    """TRL's use_peft: false means full fine-tuning whatever its lora_* say (a TRL YAML lists them
    all); true means LoRA at lora_r (TRL's default 16). Without use_peft, lora_r is ours (0: off)."""
    if "use_peft" not in values:
        return
    try:
        on = coerce(values.pop("use_peft"), bool | None, f"{where}: use_peft")
    except UserError as e:
        problems.append(str(e))
        return
    if on:
        values.setdefault("lora_r", 16)
    else:
        for key in PEFT_ONLY_KEYS:
            values.pop(key, None)


def trl_saving(values: dict, where: str, problems: list[str]) -> None:
    """TRL's save_strategy: no drops save_steps (our save_every stays 0); steps keeps it."""
    if "save_strategy" not in values:
        return
    strategy = normalised(values.pop("save_strategy"))
    if strategy in (None, False, "no"):
        values.pop("save_steps", None)
    elif strategy != "steps":
        problems.append(
            f"{where}: save_strategy {strategy!r}: checkpoints are written every save_steps (steps) or never (no)"
        )


# --- the doc --------------------------------------------------------------------------------
def describe(decision) -> tuple[str, str]:
    if isinstance(decision, Map):
        target = f"`{decision.target}`" if decision.target else ""
        return "mapped", " ".join(x for x in (target, decision.why) if x)
    if isinstance(decision, Ignore):
        quiet = ", ".join(f"`{o!r}`" for o in decision.ok)
        return "ignored", decision.why + (f" (no notice for {quiet})" if quiet else "")
    if isinstance(decision, Refuse):
        return "refused", decision.why + " (accepted: " + ", ".join(f"`{o!r}`" for o in decision.ok) + ")"
    return "mapped", decision.why


def counts(table: dict) -> dict[str, int]:
    out = {"mapped": 0, "ignored": 0, "refused": 0}
    for d in table.values():
        out[describe(d)[0]] += 1
    return out
