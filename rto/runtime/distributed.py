"""Several processes for `rto ppo`, under `accelerate launch` (or torchrun): every process samples
its share of the rollout, and the processes agree through a few collectives; the models are
sharded or replicated by rto/runtime/sharding.py.

accelerate (its PartialState) reads the launcher's environment, sets up the process group and
picks each process's device; this module adds what PPO needs on top:
- `all_sum` for whitening advantages over the global rollout (rto.core.advantages.whiten);
- `broadcast_` of the trained weights at start (a new value head is random per process);
  gradients are averaged by FSDP2 (rto/runtime/sharding.py), whether the models are sharded or not;
- `all_true` so every guard decision (skip a step, stop) is taken by all processes alike;
- `mean_metrics` for logging and the adaptive KL controller;
- `failure`: a collective that fails because a process died or stopped answering becomes one
  clear line (a timeout bounds how long the others wait: --dist-timeout).
One process: every method is the identity and nothing is imported.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from datetime import timedelta

import torch

from rto.io.errors import UserError


def launched_world_size() -> int:
    """Processes the launcher started (accelerate launch / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def refuse_launcher(what: str) -> None:
    """For commands that start their own processes (pipeline, reproduce): a multi-process launch
    would run each of them once per process, all writing the same files."""
    if launched_world_size() > 1:
        raise UserError(
            f"{what}: it starts its stages as processes of its own; do not launch it with accelerate "
            "launch or torchrun - launch single stages instead (accelerate launch -m rto ppo ...; "
            "see examples/accelerate)"
        )


_last_run_ended_well = False  # the latest run in this process went to its end


def _end_group_at_exit() -> None:
    """Destroys the process group rto set up, at exit while the interpreter is still whole, as
    torch.distributed asks (a caller of the Python API exits this way). Not after a run that
    failed: the other processes are then stopped by the launcher or --dist-timeout, not waited
    for. At exit rather than at the end of each run: under torchrun a group set up again in the
    same process (a second run through the Python API) can hang connecting to the first one's
    addresses, which the launcher's store still holds."""
    import torch.distributed as dist

    if _last_run_ended_well and dist.is_initialized():
        dist.destroy_process_group()


def exit_if_launched(code: int) -> None:
    """Ends a process of a multi-process command (`accelerate launch -m rto ppo`, torchrun) with
    `code` once the command has returned: the exit handlers run (libraries' own, such as a
    tracker's final flush, and the process group's end), the output is flushed, and the process
    leaves without the interpreter's teardown. There gloo's threads abort the process now and then
    ('terminate called without an active exception', SIGABRT) after a run that finished and wrote
    everything: 1 in about 80 two-process runs on a loaded 2-core machine, with or without
    destroy_process_group, since FSDP2's modules keep the process groups alive until the
    interpreter tears them down. Every file is written and renamed into place before this point."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        atexit._run_exitfuncs()  # what a normal exit runs first; the rest of the teardown is skipped
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Dist:
    def __init__(self, cpu: bool, timeout_s: float, what: str = "ppo"):
        self.what = what
        self.world = launched_world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))  # processes on this machine
        self.device = None
        self._reported = False
        global _last_run_ended_well
        _last_run_ended_well = False
        if self.world > 1:
            import torch.distributed as dist
            from accelerate import PartialState

            if not dist.is_initialized():  # a group the caller made is the caller's to end
                atexit.register(_end_group_at_exit)
            state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))
            self.world, self.rank, self.device = state.num_processes, state.process_index, state.device
            # The launcher stops the remaining processes with SIGTERM when one fails: say so in one
            # line instead of dying silently (or with a traceback from inside a collective).
            signal.signal(signal.SIGTERM, self._stopped_by_launcher)

    def _stopped_by_launcher(self, signum, frame):
        # Exit at once, whatever this process was doing (a collective, or already its own exit
        # after reporting a failure, when raising would print a traceback from atexit handlers).
        if not self._reported:
            print(
                f"rto: error: {self.what}: process {self.rank} of {self.world}: stopped by the launcher because "
                "another process failed (its output says why)",
                file=sys.stderr,
                flush=True,
            )
        os._exit(2)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # --- collectives (identity in one process) ---------------------------------------------
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return t
        import torch.distributed as dist

        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    def all_true(self, flag: bool, device) -> bool:
        if not self.active:
            return flag
        return bool(self.all_sum(torch.tensor([0.0 if flag else 1.0], device=device)).item() == 0)

    def mean_metrics(self, metrics: dict[str, float], device) -> dict[str, float]:
        """Mean over processes of each numeric metric (every process logs the same keys)."""
        if not self.active:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        total = self.all_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device))
        return {**metrics, **{k: float(v) / self.world for k, v in zip(keys, total.tolist())}}

    def broadcast_(self, params: list[torch.Tensor]) -> None:
        """Process 0's values into every process (in place); CPU tensors travel through the device
        where the backend cannot send them (NCCL)."""
        if not self.active:
            return
        import torch.distributed as dist

        via_device = self.device is not None and self.device.type != "cpu"
        for p in params:
            if via_device and p.device.type == "cpu":
                moved = p.data.to(self.device)
                dist.broadcast(moved, 0)
                p.data.copy_(moved.cpu())
            else:
                dist.broadcast(p.data, 0)

    def broadcast_object(self, obj):
        """Process 0's (picklable, self-made) object in every process."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def ended_well(self) -> None:
        """The run went to its end in this process: the process group may be ended at exit."""
        global _last_run_ended_well
        _last_run_ended_well = True

    def failure(self, error: BaseException) -> UserError:
        """The one-line error for a collective that failed because another process went away."""
        self._reported = True
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return UserError(
            f"{self.what}: process {self.rank} of {self.world}: another process died or stopped "
            f"responding ({first[:200]}); stopping. The failed process's own output says why."
        )


def is_collective_failure(error: BaseException) -> bool:
    """A distributed-backend error: a peer closed its connection, or a collective timed out."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text
        for s in (
            "connection closed by peer",
            "connection reset",
            "timed out",
            "timeout",
            "broken pipe",
            "gloo",
            "nccl",
            "socket",
        )
    )
