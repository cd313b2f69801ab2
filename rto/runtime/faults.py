"""Fault injection for the reliability tests (tests/test_distributed.py, docs/reliability.md).

RTO_FAULT_DIE=RANK:ITERATION ends that process abruptly when it starts that iteration, as a
crash would; RTO_FAULT_KILL=RANK:ITERATION sends it SIGKILL (kill -9, the out-of-memory killer);
RTO_FAULT_HANG=RANK:ITERATION makes it stop responding instead (a hung device, a deadlock). Unset, nothing happens.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def inject_faults(rank: int, iteration: int) -> None:
    here = f"{rank}:{iteration}"
    if os.environ.get("RTO_FAULT_DIE", "") == here:
        print(f"[rto] fault injection: process {rank} dies at iteration {iteration}", file=sys.stderr, flush=True)
        os._exit(17)
    if os.environ.get("RTO_FAULT_KILL", "") == here:
        print(
            f"[rto] fault injection: process {rank} is killed (SIGKILL) at iteration {iteration}",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("RTO_FAULT_HANG", "") == here:
        print(f"[rto] fault injection: process {rank} hangs at iteration {iteration}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
