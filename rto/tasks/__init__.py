"""Tasks: the built-in `keyed` testbed and loading of a user's `pkg.module:Class`."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

from rto.errors import UserError
from rto.tasks.base import Task
from rto.tasks.keyed import KeyedTask

BUILTIN = {"keyed": KeyedTask}


def load_task(spec: str, seed: int = 0) -> Task:
    """`keyed`, `pkg.module:Class` (imported from sys.path) or `path/to/file.py:Class`."""
    if spec in BUILTIN:
        return BUILTIN[spec](seed=seed)
    if ":" not in spec:
        raise UserError(f"--task {spec!r}: not a built-in task ({', '.join(BUILTIN)}) and not of the form pkg.module:Class")
    module_name, _, class_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"--task {spec!r}: file {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(f"rto_user_task_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:  # a user's module can fail in any way; report it in one line
        raise UserError(f"--task {spec!r}: cannot import {module_name}: {type(e).__name__}: {e}") from e
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise UserError(f"--task {spec!r}: {class_name} is not a subclass of rto.tasks.Task in {module_name}")
    return cls(seed=seed)


__all__ = ["Task", "KeyedTask", "load_task", "BUILTIN"]
