"""Config dataclasses: YAML + command-line overrides -> a validated dataclass.

Each stage declares its config as a dataclass beside its trainer, with fields
made by `opt(default, help, ...)`. This module turns such a dataclass into
argparse flags (`--actor-lr 1e-6`), reads YAML files, coerces and range-checks
every value, and reports any problem as one `UserError` line naming the file
and key.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from rto.io import trl_fields
from rto.io.coercion import _base_type, coerce  # noqa: F401 (coerce: part of this module's interface)
from rto.io.errors import UserError


def opt(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    lt: float | None = None,
):
    """A config field with its help text and allowed range."""
    meta = {"help": help, "choices": choices, "gt": gt, "ge": ge, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# Fields several commands share: their meaning (and help) written once.
def source_field(rows: str):
    return opt(
        "", f"{rows}: a JSONL, JSON, Parquet or CSV file, a folder of them, or a hub dataset id where a network exists"
    )


def judge_field(role: str):
    return opt(
        "",
        f"{role}: a reward-model directory, or module:function(prompts, responses) -> scores "
        "(rto/lm/judges.py); empty: none",
    )


def split_field(default: str, flag: str):
    return opt(default, f"the split of a hub dataset given as --{flag}")


def columns_field(rows: str, example: str):
    return opt({}, f"the {rows} file's column names, e.g. {{{example}}}")


def skip_bad_rows_field(rows: str):
    return opt(False, f"skip (and count) {rows} rows that cannot be used instead of stopping")


def chat_template_field(saved_with: str):
    return opt(
        "",
        "the chat template for conversational rows, as TRL's: a Jinja file, or a tokenizer directory whose "
        f"template is copied (no tokens added); saved with the {saved_with} (empty: its tokenizer's own)",
    )


def require(cfg, stage: str, *names: str) -> None:
    """UserError for the first of `names` that is empty."""
    for name in names:
        if not getattr(cfg, name):
            raise UserError(f"{stage}: --{name.replace('_', '-')} is required")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_range(value: Any, meta: dict, where: str) -> None:
    if value is None or isinstance(value, (bool, str, list, dict)):
        items = value if isinstance(value, list) else [value]
        bad = [v for v in items if meta.get("choices") and v not in meta["choices"]]
        if bad:
            raise UserError(f"{where}: must be one of {', '.join(meta['choices'])}; got {bad[0]!r}")
        return
    for key, ok, word in (
        ("gt", lambda v, b: v > b, ">"),
        ("ge", lambda v, b: v >= b, ">="),
        ("lt", lambda v, b: v < b, "<"),
        ("le", lambda v, b: v <= b, "<="),
    ):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise UserError(f"{where}: must be {word} {bound}, got {value}")


def build(cls, values: dict[str, Any], where: str):
    """Make a `cls` from a mapping: our settings, and TRL's as `cls.TRL_FIELDS` decides them
    (rto/io/trl_tables.py). Every unknown key, bad value and refused TRL setting is reported at once:
    one UserError, one line each."""
    kwargs, problems, ignored = _read(cls, values, where)
    trl_fields.fail_if(problems)
    if ignored:
        print(
            f"[rto] {where}: TRL settings with no counterpart here, ignored: {', '.join(ignored)} "
            "(see docs/trl-compatibility.md)",
            file=sys.stderr,
            flush=True,
        )
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except UserError as e:
            raise UserError(f"{where}: {e}" if where else str(e)) from None
    return obj


def check_some(cls, values: dict[str, Any], where: str) -> None:
    """Some of a `cls`'s settings, checked as `build` checks them (unknown keys, types, ranges, TRL's
    refusals) without making one: a pipeline's stage section, before the pipeline adds its paths."""
    trl_fields.fail_if(_read(cls, values, where)[1])


def _read(cls, values: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """(the field values, the problems found, the TRL settings ignored) of a mapping of settings."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    table = trl_fields.decisions(cls, values)
    problems: list[str] = []
    if hasattr(cls, "from_trl"):  # TRL settings read together (batch sizes, LoRA, saving)
        values = cls.from_trl(values, where, problems)
    kwargs, from_trl, ignored = {}, {}, []
    for name, raw in values.items():
        decision = table.get(name)
        ours = name in known and not (isinstance(decision, trl_fields.Map) and decision.value)
        if ours and raw is None and decision is not None and not _base_type(hints[name])[1]:
            continue  # TRL's "unset" for a setting of ours that has no unset: our default
        try:
            if ours:
                kwargs[name] = coerce(raw, hints[name], f"{where}: {name}")
                _check_range(kwargs[name], known[name].metadata, f"{where}: {name}")
            elif isinstance(decision, trl_fields.Map):
                for target, value in decision.settings(raw, where, name).items():
                    if target in from_trl and trl_fields.normalised(from_trl[target][1]) != trl_fields.normalised(
                        value
                    ):
                        problems.append(f"{where}: {name} and {from_trl[target][0]} disagree (both set {target})")
                    from_trl.setdefault(target, (name, value))
            elif isinstance(decision, trl_fields.Ignore):
                if not trl_fields.same(raw, decision.ok):
                    ignored.append(name)
            elif isinstance(decision, trl_fields.Refuse):
                problem = trl_fields.check_not_refused(name, raw, decision, where)
                if problem:
                    problems.append(problem)
            elif decision is None:
                close = trl_fields.suggest(
                    name, set(known) | {k for k, d in table.items() if isinstance(d, trl_fields.Map)}
                )
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                problems.append(f"{where}: unknown setting {name!r}{hint}")
        except UserError as e:
            problems.append(str(e))
    for name, (trl_name, raw) in from_trl.items():
        if name not in kwargs and name in known:
            try:
                kwargs[name] = coerce(raw, hints[name], f"{where}: {trl_name}")
                _check_range(kwargs[name], known[name].metadata, f"{where}: {trl_name}")
            except UserError as e:
                problems.append(str(e))
        elif name not in known:
            problems.append(f"{where}: {trl_name}: has no counterpart in this version ({name})")
    return kwargs, problems, ignored


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, with one-line errors for every way it can be wrong."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of settings")
    return data


def _groups(cls) -> dict[str, str]:
    """{first field of a group: its title}, from the `# --- title ---` comments of the config
    class (and its bases): --help shows the flags in those groups."""
    import inspect
    import re

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        title = None
        for line in source.splitlines():
            header = re.match(r"\s*# --- (.+?) ---", line)
            if header:
                title = header.group(1)
                continue
            field = re.match(r"\s{4}(\w+):", line)
            if field and title:
                out[field.group(1)] = title
                title = None
    return out


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per field, grouped as the config class's comments group them; unset flags stay
    absent so the YAML value wins."""
    hints = _hints(cls)
    groups = _groups(cls)
    # A stage's own fields after its base class's groups get a group of their own.
    first_owner: dict[str, type] = {}
    for klass in reversed(cls.__mro__):
        for name in getattr(klass, "__annotations__", {}):
            first_owner.setdefault(name, klass)
    target, previous = parser, None
    for f in dataclasses.fields(cls):
        owner = first_owner.get(f.name)
        if f.name in groups:
            target = parser.add_argument_group(groups[f.name])
        elif previous is not None and owner is not previous and target is not parser:
            target = parser.add_argument_group(f"{getattr(cls, 'STAGE', '') or cls.__name__} settings")
        previous = owner
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        inner, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices") or (get_args(inner) if get_origin(inner) is Literal else None)
        if choices:
            help_text += f" {{{', '.join(map(str, choices))}}}"
        if default not in ("", None, [], {}):
            help_text += f" (default: {', '.join(map(str, default)) if isinstance(default, list) else default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        if inner is bool:
            target.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            target.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)
    taken = set(parser._option_string_actions)  # our own flags (and --debug, --config) win
    for name, decision in trl_fields.flag_decisions(cls).items():  # TRL's flags, hidden: build() decides them
        flag = "--" + name.replace("_", "-")
        if flag in taken or "--no-" + flag[2:] in taken:
            continue
        if trl_fields.hidden_flag_kind(decision) == "bool":
            parser.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
                action=argparse.BooleanOptionalAction,
            )
        else:  # a value, or none (a switch such as --push_to_hub)
            parser.add_argument(
                flag, dest=name, nargs="?", const=True, default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )


def dashed_flags(argv: list[str]) -> list[str]:
    """`--learning_rate 1e-4` as `--learning-rate 1e-4`: the underscore spelling TRL's and
    transformers' users type, for every flag (values are left as they are)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            flag, eq, value = arg.partition("=")
            arg = flag.replace("_", "-") + eq + value
        out.append(arg)
    return out


def from_sources(cls, yaml_values: dict[str, Any], yaml_where: str, cli_values: dict[str, Any]):
    """YAML values, then command-line overrides on top; both validated."""
    merged = dict(yaml_values)
    merged.update(cli_values)
    where = yaml_where if not cli_values else f"{yaml_where} + command line" if yaml_values else "command line"
    return build(cls, merged, where)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)
