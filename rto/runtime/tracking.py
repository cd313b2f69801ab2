"""Metrics: OUT/metrics.jsonl always (one JSON object per logged step), and the experiment
trackers a user asks for with --report-to (tensorboard, wandb, trackio, mlflow).

`rto ppo` logs through accelerate's trackers; the TRL stages hand the same names to
transformers' `report_to` and add `JsonlCallback` for the local file. Only the main process
writes. A tracker whose package is missing is a one-line error before any training starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from rto.io.errors import UserError

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # each is also the name of its pip package


def trackers(report_to: list[str], what: str) -> list[str]:
    """The trackers asked for, each checked to be installed ("none" alone or empty: no tracker)."""
    names = [t for t in report_to if t != "none"]
    if "none" in report_to and names:
        raise UserError(f"{what}: --report-to none cannot be combined with {', '.join(names)}")
    import accelerate.utils as au

    for name in names:
        available = getattr(au, f"is_{name}_available")()
        if not available:
            raise UserError(
                f"{what}: --report-to {name}: the {name} package is not installed (pip install {name}, "
                f"or pip install 'rto-rlhf[{name}]')"
            )
    return names


class MetricsLog:
    """OUT/metrics.jsonl plus accelerate's trackers, written by the main process only."""

    def __init__(
        self,
        out: str | Path,
        project: str,
        config: dict,
        report_to: list[str],
        what: str,
        main: bool = True,
        history: list[dict] | None = None,
    ):
        self.main = main
        self.names = trackers(report_to, what)
        self.accelerator = None
        if not main:
            return
        self.file = open(Path(out) / "metrics.jsonl", "w")
        for row in history or []:  # a resumed run's file holds exactly the steps it kept
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.names:
            from accelerate import Accelerator

            self.accelerator = Accelerator(log_with=self.names, project_dir=str(Path(out) / "trackers"))
            # Trackers take flat scalar configs; lists and dicts are shown as text.
            flat = {
                k: v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
                for k, v in config.items()
            }
            self.accelerator.init_trackers(project, config=flat)

    def log(self, metrics: dict, step: int) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if not self.main:
            return
        self.file.close()
        if self.accelerator is not None:
            self.accelerator.end_training()


def jsonl_callback(out: str | Path):
    """A transformers TrainerCallback that appends every log (loss, learning rate, ...) to a
    metrics.jsonl file; the TRL stages write it to their scratch directory and copy it beside
    the saved model."""
    from transformers import TrainerCallback

    class JsonlCallback(TrainerCallback):
        def __init__(self):
            self.path = Path(out)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": state.epoch, **logs}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    return JsonlCallback()
