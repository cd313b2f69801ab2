"""Crash-safe training state: tensors in safetensors, everything else in JSON, nothing pickled.

A checkpoint is a directory `step_XXXXXXXX/` holding `state.safetensors` and `meta.json`. It is
written under a temporary name, flushed to disk, then renamed into place, so a kill at any
moment leaves either the new checkpoint whole or the previous ones untouched; a leftover
temporary directory is ignored and cleared by the next save. Optimizer state is flattened into
named tensors plus JSON scalars, so loading never unpickles anything.

Fault injection for the tests: RTO_FAULT_KILL_IN_SAVE=N kills the process (SIGKILL) in the
middle of writing checkpoint N, after its tensors are on disk and before the rename.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from rto.io.errors import UserError

PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def checkpoint_staging(root: str | Path, step: int) -> Path:
    """The empty temporary directory checkpoint `step` is written into before its rename."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{PREFIX}{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def save_checkpoint(
    root: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    keep_last: int = 0,
    extra_dirs: dict[str, Path] | None = None,
    staged: Path | None = None,
) -> Path:
    """`extra_dirs` {name: directory}: copied into the checkpoint as name/, inside the same atomic
    rename (PPO's dev-selected policy, which a resume must find as it was). `staged`: the
    `checkpoint_staging` directory where other files already lie (the processes' DCP shards)."""
    from safetensors.torch import save

    root = Path(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = staged if staged is not None else checkpoint_staging(root, step)
    _write(tmp / "state.safetensors", save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    if os.environ.get("RTO_FAULT_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    for name, src in (extra_dirs or {}).items():
        shutil.copytree(src, tmp / name)
    _write(tmp / "meta.json", json.dumps(meta).encode())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").is_file())


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    path = Path(path)
    state, meta_file = path / "state.safetensors", path / "meta.json"
    if not state.is_file() or not meta_file.is_file():
        raise UserError(f"checkpoint {path}: not a checkpoint (needs state.safetensors and meta.json)")
    try:
        tensors = load_file(str(state))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise UserError(f"checkpoint {state}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as e:
        raise UserError(f"checkpoint {meta_file}: unreadable JSON ({e})") from None
    return tensors, meta


# --- flattening state into (tensors, JSON) -----------------------------------------------------
def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            pid, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(generator: torch.Generator | None = None) -> tuple[dict, dict]:
    """Every random stream the training loop draws from: Python, NumPy, torch (CPU, CUDA), ours."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if generator is not None:
        tensors["rng.generator"] = generator.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, meta


def load_rng_state(tensors: dict, meta: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if generator is not None and "rng.generator" in tensors:
        generator.set_state(tensors["rng.generator"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, keys, gauss = meta["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
