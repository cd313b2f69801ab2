"""docs/tables.py: every generated table in README.md and docs/ is what its committed JSON gives;
a JSON value changed by hand, or a table edited by hand, fails the check (make test runs it)."""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def _check(root: Path, capsys) -> SimpleNamespace:
    """`python docs/tables.py --check --root ROOT`, through its main() in this process."""
    if str(ROOT / "docs") not in sys.path:
        sys.path.insert(0, str(ROOT / "docs"))  # tables.py imports its tables_*.py beside it
    import tables

    capsys.readouterr()
    code = tables.main(["--check", "--root", str(root)])
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def test_the_committed_docs_match_their_json(capsys):
    proc = _check(ROOT, capsys)
    assert proc.returncode == 0, proc.stderr
    assert "tables match their JSON" in proc.stderr


def test_a_json_value_or_a_table_changed_by_hand_fails_the_check(tmp_path, capsys):
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("*.png"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for extra in ("examples",):  # pages and JSON outside docs/ that tables read
        if (ROOT / extra).is_dir():
            shutil.copytree(ROOT / extra, tmp_path / extra, ignore=shutil.ignore_patterns("*.png", "*.gguf"))
    assert _check(tmp_path, capsys).returncode == 0
    results = tmp_path / "docs" / "results" / "keyed" / "results.json"
    data = json.loads(results.read_text())
    data["methods"]["rto"]["gold_reward"] += 0.1  # a JSON value changed by hand
    results.write_text(json.dumps(data))
    proc = _check(tmp_path, capsys)
    assert proc.returncode == 1 and "table 'results-keyed' differs" in proc.stderr, proc.stderr
    shutil.copy(ROOT / "docs" / "results" / "keyed" / "results.json", results)
    page = tmp_path / "docs" / "results.md"
    text = page.read_text()
    start = text.index("<!-- table results-coverage")
    row = text.index("| median", start)
    page.write_text(text[:row] + "| median (edited by hand)" + text[row + len("| median") :])
    proc = _check(tmp_path, capsys)
    assert proc.returncode == 1 and "table 'results-coverage' differs" in proc.stderr, proc.stderr
