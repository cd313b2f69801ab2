"""Progress for a parent process: a child stage writes {done, total} to the JSON file named
by the RTO_PROGRESS_FILE environment variable (set by `rto pipeline` for parallel jobs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "RTO_PROGRESS_FILE"


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
