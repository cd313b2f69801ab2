"""docs/reliability.md's measured figures, written from the committed JSON (see docs/tables.py).

Only the kill-and-resume figures have a committed JSON (benchmarks/kill_resume.py --out); the page's
other tables describe behaviour and tests, not measurements.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from tables import read_json

PAGE = "docs/reliability.md"


def kill_resume(root: Path) -> str:
    r = read_json(root, "docs/results/kill_resume.json")
    runs = r["results"]
    sigkill = sum(1 for x in runs if not x["in_save"])
    # A SIGKILL that found a half-written checkpoint directory: the atomic rename's case.
    tmp_seen = sum(1 for x in runs if not x["in_save"] and any(c.endswith(".tmp") for c in x["checkpoints_at_kill"]))
    exact = "all" if r["exact"] == r["points"] else f"{r['exact']} of {r['points']}"
    text = (
        "Figures: `python benchmarks/kill_resume.py --points 20 --seed 0` (raw output: "
        "[results/kill_resume.json](results/kill_resume.json)) ran an 8-iteration RTO run with evaluation every "
        f"3 iterations and a checkpoint every iteration, then killed {r['points']} copies of it: {sigkill} with "
        "SIGKILL at a moment drawn uniformly over the training part of the run"
        + (f" ({tmp_seen} of them found a half-written checkpoint directory)" if tmp_seen else "")
        + f", {r['killed_in_save']} inside a checkpoint write by fault injection. {r['killed']} of {r['points']} "
        f"were killed before they finished; {exact} {r['exact']} resumed runs ended with the same policy and "
        "critic weights, log and evaluation curve as the uninterrupted run, bit for bit."
    )
    return textwrap.fill(text, 100)


TABLES = {"reliability.kill-resume": (PAGE, kill_resume)}
