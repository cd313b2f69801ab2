"""Importing a user's object named `pkg.module:Name` or `path/to/file.py:Name`.

The module is imported from exactly what the user named: a file path is loaded from
that file, a dotted name through the normal import system. Nothing else is searched.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from rto.io.errors import UserError


def import_object(spec: str, what: str):
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise UserError(f"{what} {spec!r}: expected pkg.module:Name or path/to/file.py:Name")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"{what} {spec!r}: file {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(f"rto_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:  # a user's module can fail in any way; report it in one line
        raise UserError(f"{what} {spec!r}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    if not hasattr(module, name):
        raise UserError(f"{what} {spec!r}: {module_name} has no {name}")
    return getattr(module, name)
