"""PPO's prompt pool: prompts read as TRL reads data, through `datasets`' memory-mapped Arrow files,
prepared once and cached, drawn a rollout at a time.

A pool of a million prompts costs a process little: the file is converted to Arrow once
(datasets' cache, keyed on the file's path and modification time, so an edited file is read
again), and each prompt is checked, rendered (conversations through the chat template) and
measured in tokens once, into a second cached Arrow file keyed on the first and on the tokenizer
(vocabulary, chat template). A run then maps both files, reads the two small columns it needs
to decide which rows are usable (length, error) and reads a prompt's text only when a rollout
draws it, so each process reads only its own share. The rows kept and their order are those of
the eager reader this replaces: a seed draws the same prompts.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rto.io.data import PROMPT_FIELDS, RowError, _looks_like_hub_id, _records, open_dataset, render, usable_row
from rto.io.errors import UserError

# Bump when what a prepared pool holds, or how a row is read, changes: old caches are then unused.
PREPARED_VERSION = "1"
_WHERE = "\x00"  # a row's place in an error stored in the cache; the real one is put in when raised


class PromptPool(Sequence):
    """The usable prompts of a pool, as text, read from the cached Arrow file when asked for."""

    def __init__(self, texts, kept: np.ndarray):
        self._texts = texts  # a datasets.Dataset with one column, "text" (memory-mapped)
        self._kept = kept  # pool index -> Arrow row

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.take([i])[0]

    def __iter__(self):  # in blocks: one read per thousand prompts, not one per prompt
        for start in range(0, len(self), 1000):
            yield from self.take(range(start, min(start + 1000, len(self))))

    def take(self, indices) -> list[str]:
        """The prompts at these pool indices, in this order (one read for them all)."""
        rows = [int(self._kept[i]) for i in indices]
        return self._texts[rows]["text"] if rows else []


def read_prompts(
    path: str | Path,
    tokenizer,
    *,
    max_len: int,
    long_prompts: str = "error",
    columns: dict | None = None,
    skip_bad_rows: bool = False,
    what: str = "ppo",
    split: str = "train",
    config: str = "",
) -> PromptPool:
    """Prompt texts as the policy reads them (conversations through the chat template, ending where
    the assistant speaks), with the length limit applied as `long_prompts` says: error (naming the
    first long row), skip (counted on stderr) or truncate (left to the encoder, which keeps the end).
    `path`: a data file, a dataset folder (data files or save_to_disk) or a hub dataset id (its
    `split`) where a network has it."""
    columns = dict(columns or {})
    raw, label, row_of = _raw(path, split, config)
    prepared = _prepared(raw, tokenizer, columns)
    table = prepared.data  # the Arrow table: whole columns without Python objects per row
    lengths = table.column("length").to_numpy()
    errors = table.column("error")
    bad = errors.is_valid().to_numpy(zero_copy_only=False) if errors.null_count < len(errors) else None
    usable = ~bad if bad is not None else np.ones(len(lengths), dtype=bool)
    if bad is not None:
        first = int(np.flatnonzero(bad)[0])
        message = f"{label}: row {row_of(first, prepared)}: {errors[first].as_py()}"
        if not skip_bad_rows:
            raise RowError(message)
        print(f"[rto] {path}: skipped {int(bad.sum())} unusable rows (first: {message})", file=sys.stderr, flush=True)
    n_usable = int(usable.sum())
    if not n_usable:
        skipped = len(lengths) - n_usable
        raise UserError(f"{path}: no rows" + (f" left ({skipped} unusable rows skipped)" if skipped else ""))
    long = usable & (lengths > max_len)
    n_long = int(long.sum())
    if n_long and long_prompts == "error":
        i = int(np.flatnonzero(long)[0])
        raise UserError(
            f"{label}: row {row_of(i, prepared)}: field 'prompt' is {lengths[i]} tokens, longer than "
            f"--max-prompt-len {max_len} ({n_long} such rows; --long-prompts skip or truncate to accept "
            "them)"
        )
    if n_long and long_prompts == "skip":
        usable &= ~long
        if not usable.any():
            raise UserError(f"{path}: no prompts left: all {n_long} are longer than --max-prompt-len {max_len}")
        print(
            f"[rto] {what}: {path}: skipped {n_long} of {n_usable} prompts longer than --max-prompt-len {max_len}",
            file=sys.stderr,
            flush=True,
        )
    return PromptPool(prepared.select_columns(["text"]), np.flatnonzero(usable))


# --- reading: the raw rows as an Arrow dataset -----------------------------------------------
def _raw(path: str | Path, split: str, config: str):
    """(raw dataset, label for messages, row_of(index, prepared) -> the row number a message names)."""
    p = Path(path)
    if not p.is_file() and not p.is_dir() and not (_looks_like_hub_id(str(path)) and not p.exists()):
        raise UserError(f"{path}: data file not found")
    if not p.is_file():
        # A folder (data files or save_to_disk) or a hub id: datasets' own loaders and cache.
        return open_dataset(path, split, config), f"{path} (split {split})", lambda i, _: i + 1
    suffix = p.suffix.lower()
    if suffix not in (".json", ".csv"):
        # JSONL (any other suffix) and Parquet through datasets' loaders, as TRL reads them: Arrow
        # readers in C++, and a cache keyed on the file's path and modification time.
        import datasets

        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file refused here is no error yet (below)
        try:
            data = datasets.load_dataset(
                "parquet" if suffix == ".parquet" else "json", data_files=str(p.resolve()), split="train"
            )
            data.data.table.validate(full=True)  # Arrow's JSON reader lets bytes that are not UTF-8 through
            if suffix == ".parquet":
                return data, str(path), lambda i, _: i + 1
            return data, str(path), lambda i, _: _jsonl_line(p, i)
        except Exception:
            # A file Arrow's reader refuses (a line that is no JSON object, bytes that are not
            # UTF-8) is read row by row below, so that the error names the row.
            pass
        finally:
            datasets.logging.set_verbosity(verbosity)
    # Ours, row by row (the rows and errors of rto.io.data's reader), into an Arrow file all the same:
    # for a JSON list and CSV (datasets' CSV reader infers numbers where csv keeps text) and files
    # the Arrow readers refuse.
    import datasets

    stat = p.stat()
    fingerprint = _hash("hand", PREPARED_VERSION, str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    try:
        data = datasets.Dataset.from_generator(
            _hand_rows,
            gen_kwargs={"path": str(p)},
            fingerprint=fingerprint,
            features=datasets.Features(
                {
                    "__rto_row": datasets.Value("int64"),
                    "__rto_json": datasets.Value("string"),
                    "__rto_error": datasets.Value("string"),
                }
            ),
        )
    except UserError:
        raise
    except Exception:
        if next(iter(_records(p)), None) is None:  # datasets makes no dataset of no rows
            raise UserError(f"{path}: no rows") from None
        raise
    return data, str(path), lambda i, prepared: int(prepared[i]["__rto_row"])


def _hand_rows(path: str):
    """rto.io.data's records, one JSON text per row (a row's fields may be of any kind)."""
    for row, record in _records(Path(path)):
        if isinstance(record, RowError):
            yield {
                "__rto_row": row,
                "__rto_json": None,
                "__rto_error": str(record).removeprefix(f"{path}: row {row}: "),
            }
        else:
            yield {"__rto_row": row, "__rto_json": json.dumps(record), "__rto_error": None}


def _jsonl_line(path: Path, index: int) -> int:
    """The line of a JSONL file's index-th record (blank lines hold none); read only for a message."""
    n = -1
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                n += 1
                if n == index:
                    return lineno
    return index + 1


# --- preparing: each row checked, rendered and measured once, cached ---------------------------
def _prepared(raw, tokenizer, columns: dict):
    """The raw rows as (text, length, error) rows, from the cache or made now (under a file lock, so
    that processes started together make it once)."""
    import datasets
    from filelock import FileLock

    fingerprint = _hash(
        "prepared", PREPARED_VERSION, raw._fingerprint, tokenizer_signature(tokenizer), sorted(columns.items())
    )
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "rto_prompt_pools" / f"{fingerprint}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)
    hand = "__rto_json" in raw.column_names  # read by _hand_rows
    with FileLock(str(cache) + ".lock"):
        return raw.map(
            _prepare_batch,
            batched=True,
            batch_size=10_000,
            writer_batch_size=10_000,
            fn_kwargs={
                "tokenizer": tokenizer,
                "count_tokens": token_counter(tokenizer),
                "columns": columns,
                "hand": hand,
            },
            remove_columns=[c for c in raw.column_names if c != "__rto_row"],
            cache_file_name=str(cache),
            load_from_cache_file=True,
            new_fingerprint=fingerprint,
            features=datasets.Features(
                {
                    **({"__rto_row": datasets.Value("int64")} if hand else {}),
                    "text": datasets.Value("string"),
                    "length": datasets.Value("int32"),
                    "error": datasets.Value("string"),
                }
            ),
            desc="Preparing prompts",
        )


def token_counter(tokenizer):
    """texts -> their lengths in tokens, as `tokenizer(texts)` counts them. A fast tokenizer's Rust
    backend counts without transformers building an encoding object per text, which was half of a
    large pool's first read (1M prompts: 17.5 s through `tokenizer(...)`, about 2.7x less this way);
    a copy of it, so that truncation or padding stored in tokenizer.json (which `tokenizer(...)`
    turns off per call) cannot shorten a count."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: [
            len(ids) for ids in tokenizer(texts, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        ]
    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(backend.to_str())
    counter.no_truncation()
    counter.no_padding()
    encode = getattr(counter, "encode_batch_fast", counter.encode_batch)  # _fast: no character offsets
    return lambda texts: [len(e.ids) for e in encode(texts, add_special_tokens=True)]


def _prepare_batch(batch: dict, *, tokenizer, count_tokens, columns: dict, hand: bool) -> dict:
    """rto.io.data's checks for each row (an unusable one keeps its error, whose place is filled in when
    raised), its text as the policy reads it, and its length in tokens."""
    texts, errors = [], []
    given = batch.get(columns.get("prompt", "prompt")) if not hand else None
    for j in range(len(next(iter(batch.values())))):
        if given is not None and type(given[j]) is str and given[j].strip():
            texts.append(given[j])  # usable_row's answer for a non-empty text prompt, without building the row
            errors.append(None)
            continue
        if hand and batch["__rto_error"][j] is not None:
            texts.append(None)
            errors.append(batch["__rto_error"][j])
            continue
        record = json.loads(batch["__rto_json"][j]) if hand else {k: v[j] for k, v in batch.items()}
        try:
            row = usable_row(record, PROMPT_FIELDS, columns, _WHERE)
        except RowError as e:
            texts.append(None)
            errors.append(str(e).removeprefix(_WHERE + ": "))
            continue
        texts.append(render(row["prompt"], tokenizer, generation_prompt=True))
        errors.append(None)
    ok = [t for t in texts if t is not None]
    measured = iter(count_tokens(ok)) if ok else iter(())
    out = {
        "text": [t if t is not None else "" for t in texts],
        "length": [next(measured) if t is not None else -1 for t in texts],
        "error": errors,
    }
    if hand:
        out["__rto_row"] = batch["__rto_row"]
    return out


def tokenizer_signature(tokenizer) -> str:
    """What a prepared pool depends on in a tokenizer: its whole definition (vocabulary, normaliser,
    special tokens), its chat template and its class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    core = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _hash(
        type(tokenizer).__name__,
        core,
        str(getattr(tokenizer, "chat_template", None)),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
    )


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


__all__ = ["PromptPool", "read_prompts", "tokenizer_signature"]
