"""The Python API: every `rto` command as a function of the same settings as its flags.

    import rto

    rto.sft(model="runs/base", data="sft.jsonl", out="runs/sft", epochs=1)
    rto.dpo(model="runs/sft", data="prefs.jsonl", out="runs/dpo")
    rto.rm(model="runs/sft", data="prefs.jsonl", out="runs/rm")
    summary = rto.ppo(policy="runs/sft", reward_model="runs/rm", dpo_model="runs/dpo",
                      prompts="prompts.jsonl", out="runs/rto", reward="rto")
    rto.run("pipeline", task="keyed", out="runs/demo")     # any command by name

Settings are the flags' names with underscores (`--reward-model` -> `reward_model`), values as
in a YAML config; they are checked as the command line's are, and a bad one raises
`rto.UserError` with the same one-line message. Each function also takes a config object
(`rto.make_config("ppo", ...)`, or the dataclass itself: `rto.PPOConfig(...)`), with keyword
settings on top. Each returns what the command prints: the run's summary (a dict).

`rto.data`, `rto.pipeline`, `rto.tune`, `rto.reproduce` and `rto.config` are this package's
modules, so those commands run through `rto.run(name, ...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rto.config import build, to_dict


def _command(name: str):
    """(config class, run function) of a command."""
    if name == "pipeline":
        from rto.pipeline import PipelineConfig, run
        return PipelineConfig, run
    if name == "tune":
        from rto.tune import TuneConfig, run
        return TuneConfig, run
    if name == "reproduce":
        from rto.reproduce import ReproduceConfig, run
        return ReproduceConfig, run
    from rto.stages import STAGES

    if name not in STAGES:
        raise ValueError(f"unknown command {name!r}; expected one of {', '.join([*STAGES, 'pipeline', 'tune', 'reproduce'])}")
    return STAGES[name].load()


def make_config(command: str, base: Any = None, /, **settings):
    """The checked config object of `command` from keyword settings (on top of `base`, a config
    object or a mapping, e.g. a YAML file read with rto.config.load_yaml)."""
    cls, _ = _command(command)
    values: dict[str, Any] = {}
    if base is not None:
        if dataclasses.is_dataclass(base):
            if not isinstance(base, cls):
                raise TypeError(f"rto.{command}: a {type(base).__name__} is not a {cls.__name__}")
            values.update(to_dict(base))
        else:
            values.update(dict(base))
    values.update(settings)
    return build(cls, values, f"rto.{command}")


def run(command: str, base: Any = None, /, **settings) -> dict:
    """Run `command` (sft, rm, dpo, ppo, eval, data, pairs, pipeline, tune, reproduce)."""
    cfg = make_config(command, base, **settings)
    _, fn = _command(command)
    return fn(cfg)


def _named(command: str):
    def fn(base: Any = None, /, **settings) -> dict:
        return run(command, base, **settings)

    fn.__name__ = fn.__qualname__ = command
    fn.__doc__ = f"`rto {command}` as a function: rto.{command}(**settings) or rto.{command}(config, **overrides)."
    return fn


sft, pairs, rm, dpo, ppo, eval = (_named(c) for c in ("sft", "pairs", "rm", "dpo", "ppo", "eval"))  # noqa: A001
