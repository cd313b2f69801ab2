"""Progress: live bars on a terminal, plain lines in a log; and for a parent process, a child
stage writes {done, total} to the JSON file named by the RTO_PROGRESS_FILE environment variable
(set by `rto pipeline` for parallel jobs)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ENV = "RTO_PROGRESS_FILE"


def bars_enabled() -> bool:
    """Live progress bars only when stderr is a terminal: in a log file their cursor codes and
    redraws are noise. RTO_PROGRESS=0 turns them off, RTO_PROGRESS=1 on, whatever stderr is."""
    setting = os.environ.get("RTO_PROGRESS", "")
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stderr is not None and sys.stderr.isatty()


def plain_lines_wanted() -> bool:
    """Where there are no bars (stderr is a file or a pipe), a plain line now and then instead,
    unless progress is off altogether (RTO_PROGRESS=0)."""
    return not bars_enabled() and os.environ.get("RTO_PROGRESS", "") != "0"


def milestone(what: str, done: int, total: int, seconds: float, values: dict[str, float]) -> None:
    """Without bars, a plain line each tenth of the way and at the end: `[rto] WHAT 10/100, 12 s, kl 0.01`."""
    step = max(1, round(total / 10))
    if plain_lines_wanted() and (done == total or done % step == 0):
        shown = "".join(f", {k} {v:.3f}" for k, v in values.items())
        print(f"[rto] {what} {done}/{total}, {seconds:.0f} s{shown}", file=sys.stderr, flush=True)


def report(done: int, total: int) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps({"done": done, "total": total}))
    os.replace(tmp, path)


def read(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def trainer_callback():
    """A transformers TrainerCallback that reports the trainer's step count."""
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report(state.global_step, state.max_steps)

    return ReportProgress()
