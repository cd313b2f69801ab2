"""Data files: JSONL in TRL's formats, read with one-line errors naming file, row and field.

- SFT: {"prompt": str, "completion": str}
- preferences: {"prompt": str, "chosen": str, "rejected": str}
- prompts (PPO, evaluation): {"prompt": str}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from rto.errors import UserError

SFT_FIELDS = ("prompt", "completion")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt",)


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file; every row must have every field as a non-empty string."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: row {lineno}: not UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: row {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: row {lineno}: expected a JSON object")
            for field in fields:
                value = row.get(field)
                if value is None:
                    raise UserError(f"{path}: row {lineno}: missing field {field!r}")
                if not isinstance(value, str):
                    raise UserError(f"{path}: row {lineno}: field {field!r} must be a string, got {type(value).__name__}")
                if not value.strip():
                    raise UserError(f"{path}: row {lineno}: field {field!r} is empty")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
    return path
