"""Data files in TRL's formats, read with one-line errors naming file, row and field.

- SFT: {"prompt", "completion"}; or a whole conversation, {"messages"} (TRL's conversational
  language-modelling rows) or ShareGPT's {"conversations": [{"from", "value"}]}, trained on its
  last assistant turn; or {"text"} (plain language modelling: every token trained)
- preferences: {"prompt", "chosen", "rejected"}; the prompt may be implicit (left out, and then
  the common beginning of `chosen` and `rejected`)
- prompts (PPO, evaluation): {"prompt"}, {"messages"} or ShareGPT's {"conversations"}

Each value is plain text or conversational: a list of {"role", "content"} messages, which the
stage renders with the tokenizer's chat template (TRL's trainers do it themselves). Files are
JSONL, JSON (a list of objects), Parquet or CSV; `columns` maps our field names to a file's own
(`{"prompt": "question"}`). A folder is read as `datasets` reads it, as TRL's users keep data: a
folder of data files (`load_dataset(folder)`, splits by file name) or a `save_to_disk` folder
(`load_from_disk`). A row that cannot be used is an error naming file, row and field, or, with
`skip_bad_rows`, skipped and counted. PPO's prompt pools: rto/io/prompt_pool.py.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from rto.io.errors import UserError

SFT_FIELDS = ("prompt", "completion")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt",)


class RowError(UserError):
    """A row that cannot be used (skippable with skip_bad_rows)."""


def _records(path: Path):
    """(row number, record) pairs of a JSONL, JSON, Parquet or CSV file; unreadable rows raise RowError."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as e:  # pyarrow's errors for a bad file vary
            raise UserError(f"{path}: unreadable Parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        yield from enumerate(table.to_pylist(), start=1)
        return
    if suffix == ".csv":
        import csv

        try:
            with open(path, encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 (byte {e.start})") from None
        except csv.Error as e:
            raise UserError(f"{path}: unreadable CSV ({e})") from None
        yield from enumerate(rows, start=2)  # row 1 is the header
        return
    if suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of objects")
        yield from enumerate(data, start=1)
        return
    with open(path, "rb") as fh:  # JSONL (any other suffix)
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, RowError(f"{path}: row {lineno}: not UTF-8 (byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, RowError(f"{path}: row {lineno}: invalid JSON ({e.msg})")


def is_conversation(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


def _conversation(record: dict, columns: dict, where: str):
    """A row's whole conversation: its `messages`, or ShareGPT's `conversations` ({from, value}
    turns) as messages; None when it has neither."""
    messages = record.get(columns.get("messages", "messages"))
    if messages is not None:
        return _check_value(messages, where, columns.get("messages", "messages"))
    turns = record.get(columns.get("conversations", "conversations"))
    if turns is None:
        return None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise RowError(f"{where}: field 'conversations' must be a list of {{from, value}} turns (ShareGPT)")
    out = []
    for i, t in enumerate(turns):
        role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
        if role is None or not isinstance(t.get("value"), str):
            raise RowError(
                f"{where}: conversations[{i}]: expected from (human, gpt or system) and a text value, "
                f"got {json.dumps(t)[:80]}"
            )
        out.append({"role": role, "content": t["value"]})
    return _check_value(out, where, "conversations")


def _sft_from_whole(record: dict, columns: dict, where: str):
    """(prompt, completion) of an SFT row given as a whole conversation (the last assistant turn is
    the completion) or as plain text (empty prompt: every token is trained); None if neither."""
    conversation = _conversation(record, columns, where)
    if conversation is not None:
        if len(conversation) < 2 or conversation[-1]["role"] != "assistant":
            raise RowError(
                f"{where}: a conversation to train on must end with an assistant turn after at least one other"
            )
        return conversation[:-1], conversation[-1:]
    text = record.get(columns.get("text", "text"))
    if text is not None:
        return "", _check_value(text, where, columns.get("text", "text"))
    return None


def _check_value(value, where: str, field: str):
    if value is None:
        raise RowError(f"{where}: missing field {field!r}")
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"{where}: field {field!r} is empty")
        return value
    if isinstance(value, list):
        if not is_conversation(value):
            raise RowError(f"{where}: field {field!r} must be text or a list of {{role, content}} messages")
        if not any(m["content"].strip() for m in value):
            raise RowError(f"{where}: field {field!r} is empty")
        return value
    raise RowError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")


def _implicit_prompt(chosen, rejected):
    """TRL's implicit prompt: the common beginning of chosen and rejected (messages, or text cut
    at a space) becomes the prompt; the rest, the two responses."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        cut = chosen.rfind(" ", 0, n + 1) if n < len(chosen) else n
        cut = max(cut, 0)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    return None, chosen, rejected


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset, or a DatasetDict of splits)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def open_dataset(path: str | Path, split: str = "train", config: str = ""):
    """A `datasets` Dataset (memory-mapped Arrow) for a folder or a hub id, as TRL's users load data:
    a `save_to_disk` folder through load_from_disk (its `split`, if it holds several), a folder of
    data files or a hub id through load_dataset (its `split`, `config`). datasets' own loaders rather
    than ours: the same folder then reads the same in TRL and here, and datasets caches the Arrow."""
    import datasets

    path_ = Path(path)
    try:
        if path_.is_dir() and is_saved_dataset(path_):
            data = datasets.load_from_disk(str(path_))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise UserError(f"{path}: a saved DatasetDict with no split {split!r} (it has: {', '.join(data)})")
                data = data[split]
            return data
        return datasets.load_dataset(str(path_) if path_.is_dir() else str(path), config or None, split=split)
    except UserError:
        raise
    except Exception as e:  # no data files, no such split or dataset, offline: datasets' errors vary
        what = (
            "a dataset folder that datasets could not load"
            if path_.is_dir()
            else "not a data file here, and not a hub dataset that could be loaded"
        )
        raise UserError(
            f"{path}: {what} (split {split!r}{', config ' + repr(config) if config else ''}): {_first_line(e)}"
        ) from None


def source_records(path: str | Path, split: str = "train", config: str = ""):
    """(where, (row number, record) pairs) of a data file, a dataset folder or a hub dataset; rows
    of a folder or hub dataset are numbered within the split."""
    path = Path(path)
    if path.is_file():
        return str(path), _records(path)
    if path.is_dir() or (_looks_like_hub_id(str(path)) and not path.exists()):
        return f"{path} (split {split})", enumerate(open_dataset(path, split, config), start=1)
    raise UserError(f"{path}: data file not found")


def _looks_like_hub_id(text: str) -> bool:
    """`org/name` (or a bare name) with no file suffix: what a hub id looks like, not a path."""
    return bool(text) and not Path(text).suffix and text.count("/") <= 1 and not text.startswith((".", "/", "~"))


def usable_row(record, fields: tuple[str, ...], columns: dict, where: str) -> dict:
    """One record as a row with every field usable, or RowError naming `where` and the field."""
    if isinstance(record, RowError):
        raise record
    if not isinstance(record, dict):
        raise RowError(f"{where}: expected a JSON object with fields {', '.join(fields)}")
    row = {**record, **{f: record.get(columns.get(f, f)) for f in fields}}  # other columns kept
    whole = (
        _sft_from_whole(record, columns, where)
        if fields == SFT_FIELDS and row["prompt"] is None and row["completion"] is None
        else None
    )
    if whole is not None:
        row["prompt"], row["completion"] = whole
    elif "prompt" in fields and row["prompt"] is None:
        conversation = _conversation(record, columns, where) if fields == PROMPT_FIELDS else None
        if conversation is not None:
            if conversation[-1]["role"] == "assistant" and len(conversation) > 1:
                conversation = conversation[:-1]
            row["prompt"] = conversation
        elif fields == PREFERENCE_FIELDS and row["chosen"] is not None and row["rejected"] is not None:
            row["prompt"], row["chosen"], row["rejected"] = _implicit_prompt(row["chosen"], row["rejected"])
            if not row["prompt"]:
                raise RowError(
                    f"{where}: no field 'prompt', and chosen and rejected share no beginning "
                    "to take as an implicit prompt"
                )
    if fields == SFT_FIELDS and row["prompt"] is None and row["completion"] is None:
        raise RowError(
            f"{where}: expected {{prompt, completion}}, {{messages}}, ShareGPT {{conversations}} or {{text}}"
        )
    for f in fields:
        if not (f == "prompt" and row[f] == "" and whole is not None):  # a text row's prompt is empty
            row[f] = _check_value(row[f], where, columns.get(f, f))
    return row


def read_rows(
    path: str | Path,
    fields: tuple[str, ...],
    columns: dict[str, str] | None = None,
    skip_bad_rows: bool = False,
    split: str = "train",
    config: str = "",
) -> list[dict]:
    """Rows with every field present and usable (non-empty text or a conversation).

    `path`: a data file, a dataset folder (files or save_to_disk) or a `datasets` hub id (its
    `split`, `config`) where a network has it. `columns` renames: {our field: the file's column}.
    Prompt-only data may give `messages` instead of `prompt` (a final assistant turn, if any, is
    dropped). Preference data may leave the prompt implicit. With `skip_bad_rows`, unusable rows
    are skipped and counted on stderr."""
    label, records = source_records(path, split, config)
    columns = dict(columns or {})
    rows, skipped, first_error = [], 0, None
    for lineno, record in records:
        try:
            rows.append(usable_row(record, fields, columns, f"{label}: row {lineno}"))
        except RowError as e:
            if not skip_bad_rows:
                raise
            skipped += 1
            first_error = first_error or str(e)
    if skipped:
        print(f"[rto] {path}: skipped {skipped} unusable rows (first: {first_error})", file=sys.stderr, flush=True)
    if not rows:
        raise UserError(f"{path}: no rows" + (f" left ({skipped} unusable rows skipped)" if skipped else ""))
    return rows


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of one of our own files (and of any format `read_rows` reads)."""
    return read_rows(path, fields)


def render(value, tokenizer=None, *, generation_prompt: bool = False) -> str:
    """Text as is; a conversation through the tokenizer's chat template."""
    if isinstance(value, str):
        return value
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("conversational data needs a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=generation_prompt)


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


def as_texts(rows: list[dict], tokenizer) -> tuple[list[str], list[str], list[str]]:
    """(prompts, chosen, rejected) as text: a conversation's prompt rendered up to the assistant's
    turn, each response as the text the template adds after it."""
    prompts, chosen, rejected = [], [], []
    for r in rows:
        prompt = render(r["prompt"], tokenizer, generation_prompt=not isinstance(r["prompt"], str))
        prompts.append(prompt)
        for key, out in (("chosen", chosen), ("rejected", rejected)):
            value = r[key]
            if isinstance(value, str):
                out.append(value)
                continue
            full = render((r["prompt"] if isinstance(r["prompt"], list) else []) + value, tokenizer)
            out.append(full[len(prompt) :] if full.startswith(prompt) else full)
    return prompts, chosen, rejected
