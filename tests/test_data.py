"""JSONL reading: every bad row is one line naming the file, the row and the field."""

import pytest

from rto.io.data import PREFERENCE_FIELDS, read_jsonl, write_jsonl
from rto.io.errors import UserError


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "a", "chosen": "b"}\n', "row 1: missing field 'rejected'"),
        (
            b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": 3, "chosen": "b", "rejected": "c"}\n',
            "row 2: field 'prompt' must be a string",
        ),
        (b'{"prompt": "a", "chosen": " ", "rejected": "c"}\n', "row 1: field 'chosen' is empty"),
        (b'{"prompt": "a", \n', "row 1: invalid JSON"),
        (b"[1, 2]\n", "row 1: expected a JSON object"),
        (b'{"prompt": "\xff", "chosen": "b", "rejected": "c"}\n', "row 1: not UTF-8"),
        (b"\n\n", "no rows"),
    ],
)
def test_bad_rows(tmp_path, content, message):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        read_jsonl(path, PREFERENCE_FIELDS)
    assert str(path) in str(e.value)


def test_roundtrip(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "extra": 1}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    assert read_jsonl(path, PREFERENCE_FIELDS) == rows
