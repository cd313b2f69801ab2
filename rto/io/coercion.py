"""Values from YAML files and command lines into the types a config field declares, with one-line
errors. Below rto.io.config (which builds configs) and rto.io.trl_fields (which reads TRL's values)."""

from __future__ import annotations

import os
import types
import typing
from typing import Any, Literal, get_args, get_origin

from rto.io.errors import UserError


def _base_type(tp):
    """(inner type, optional?) for `X | None` / Optional[X]."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from YAML or a command line string) to `tp`, or raise UserError."""
    inner, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"{where}: a value is required, got nothing")
    if get_origin(inner) is Literal:
        allowed = get_args(inner)
        if value not in allowed:
            raise UserError(f"{where}: must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if out != out:  # NaN
                raise ValueError
            return out
        if inner is str:
            if isinstance(value, os.PathLike):  # pathlib paths from the Python API
                return os.fspath(value)
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if get_origin(inner) is list:
            (item,) = get_args(inner)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [coerce(v, item, where) for v in value]
        if get_origin(inner) is dict or inner is dict:
            if isinstance(value, str):  # a command line: '{prompt: question}' (YAML or JSON) or 'prompt=question,...'
                value = _mapping_from_text(value)
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): v if isinstance(v, (dict, list)) else str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        name = getattr(inner, "__name__", str(inner))
        raise UserError(f"{where}: expected {name}, got {value!r}") from None
    return value


def _mapping_from_text(text: str):
    """'{a: b, c: d}' (YAML flow or JSON) or 'a=b,c=d' -> a dict; anything else is returned as is."""
    import yaml

    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if pairs and all(len(p) == 2 and p[0].strip() for p in pairs):
        return {k.strip(): v.strip() for k, v in pairs}
    return text
