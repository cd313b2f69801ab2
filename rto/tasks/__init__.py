"""Tasks: the `Task` interface, the built-in testbeds (`keyed`, `ordered`, `count`) with their exact gold
rewards, and loading a user's `pkg.module:Class`.

Imports `rto.io` (errors, plugins) and torch/transformers for the testbeds' tiny models; nothing else of rto.
"""

from __future__ import annotations

import inspect

from rto.io.errors import UserError
from rto.io.plugins import import_object
from rto.tasks.base import Task
from rto.tasks.count import CountTask
from rto.tasks.keyed import KeyedTask
from rto.tasks.ordered import OrderedTask

BUILTIN = {"keyed": KeyedTask, "ordered": OrderedTask, "count": CountTask}


TUNED = "tuned"  # --preset tuned: a built-in task's preset file written by `rto tune` (rto/tasks/presets/)


def tuned_preset_file(task: Task) -> str:
    """The packaged `rto tune` preset of a built-in task ("" for other tasks or where none was written)."""
    from pathlib import Path

    path = Path(__file__).parent / "presets" / f"{task.name}.yaml"
    return str(path) if BUILTIN.get(task.name) is type(task) and path.is_file() else ""


def load_task(spec: str, seed: int = 0) -> Task:
    """`keyed`, `pkg.module:Class` (imported from sys.path) or `path/to/file.py:Class`."""
    if spec in BUILTIN:
        return BUILTIN[spec](seed=seed)
    if ":" not in spec:
        raise UserError(
            f"--task {spec!r}: not a built-in task ({', '.join(BUILTIN)}) and not of the form pkg.module:Class"
        )
    cls = import_object(spec, "--task")
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise UserError(f"--task {spec!r}: {spec.rpartition(':')[2]} is not a subclass of rto.tasks.Task")
    try:
        return cls(seed=seed)
    except Exception as e:
        raise UserError(f"--task {spec!r}: cannot construct it: {type(e).__name__}: {e}") from None


__all__ = ["Task", "KeyedTask", "OrderedTask", "CountTask", "load_task", "BUILTIN", "TUNED", "tuned_preset_file"]
