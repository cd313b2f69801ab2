"""The Python API: every `rto` command as a function of the same settings as its flags.

    import rto

    rto.sft(model="runs/base", data="sft.jsonl", out="runs/sft", epochs=1)
    rto.dpo(model="runs/sft", data="prefs.jsonl", out="runs/dpo")
    rto.rm(model="runs/sft", data="prefs.jsonl", out="runs/rm")
    summary = rto.ppo(policy="runs/sft", reward_model="runs/rm", dpo_model="runs/dpo",
                      prompts="prompts.jsonl", out="runs/rto", reward="rto")
    rto.pipeline(task="keyed", out="runs/demo")             # or rto.run("pipeline", ...)

Settings are the flags' names with underscores (`--reward-model` -> `reward_model`), values as
in a YAML config; they are checked as the command line's are, and a bad one raises
`rto.UserError` with the same one-line message. Each function also takes a config object
(`rto.make_config("ppo", ...)`, or the dataclass itself: `rto.PPOConfig(...)`), with keyword
settings on top. Each returns what the command prints: the run's summary (a dict).

Models and data may be objects as well as paths: a transformers model (with its tokenizer, as a
`(model, tokenizer)` pair, or found from `model.name_or_path`), a `datasets.Dataset` or a list of
row dicts; they are written to a temporary directory for the run (as `save_pretrained` and JSONL).
A run leaves the caller's global state as it found it: the RNGs (Python, NumPy, torch, CUDA),
which every stage seeds, and torch's thread count are put back afterwards.

The functions are made from `rto.COMMANDS`, the one list of commands the command line reads too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import tempfile
from pathlib import Path
from typing import Any

from rto.io.config import build, to_dict


def command_parts(name: str):
    """(config class, run function) of a command (the `rto` command line dispatches through it too)."""
    from rto import COMMANDS

    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; expected one of {', '.join(COMMANDS)}")
    return COMMANDS[name].load()


def make_config(command: str, base: Any = None, /, **settings):
    """The checked config object of `command` from keyword settings (on top of `base`, a config
    object or a mapping, e.g. a YAML file read with rto.io.config.load_yaml)."""
    cls, _ = command_parts(command)
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
    """Run `command` (any name in `rto.COMMANDS`)."""
    _, fn = command_parts(command)
    with tempfile.TemporaryDirectory(prefix="rto-api-") as tmp, _global_state_kept():
        settings = {k: _as_path(v, Path(tmp) / k) for k, v in settings.items()}
        return fn(make_config(command, base, **settings))


def _as_path(value: Any, where: Path) -> Any:
    """A model or data object written to `where` (returned as its path); anything else as it is."""
    model, tokenizer = value if isinstance(value, tuple) and len(value) == 2 else (value, None)
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):  # a transformers (or peft) model
        from rto.lm.models import save_model

        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        save_model(model, tokenizer, where)
        return str(where)
    rows = value.to_list() if hasattr(value, "to_list") and hasattr(value, "column_names") else value
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):  # a dataset's rows
        from rto.io.data import write_jsonl

        return str(write_jsonl(where.with_suffix(".jsonl"), rows))
    return value


@contextlib.contextmanager
def _global_state_kept():
    """Every RNG state and torch's thread count, put back after the run (stages seed them all)."""
    import os

    import numpy as np
    import torch

    states = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
        torch.get_num_threads(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        os.environ.get("OMP_NUM_THREADS"),
    )
    try:
        yield
    finally:
        py, npy, cpu, threads, cuda, omp = states
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        torch.set_num_threads(threads)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _named(command: str):
    def fn(base: Any = None, /, **settings) -> dict:
        return run(command, base, **settings)

    fn.__name__ = fn.__qualname__ = command
    fn.__doc__ = f"`rto {command}` as a function: rto.{command}(**settings) or rto.{command}(config, **overrides)."
    return fn


def _commands() -> dict:
    from rto import COMMANDS

    return {name: _named(name) for name in COMMANDS}


globals().update(_commands())  # rto.api.sft, ..., rto.api.reproduce: one function per command
