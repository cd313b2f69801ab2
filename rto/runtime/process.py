"""One process's setup (threads, seeds) and the settings every command has for it (seed, threads, trackers)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from rto.io.config import opt
from rto.runtime.tracking import TRACKERS


def setup(seed: int, threads: int) -> None:
    """Seed every RNG; pin torch's thread count when asked (0 = torch's default).

    Processes that run side by side should each use 1 thread: two processes with two
    threads each on two cores can be many times slower than one thread each.
    """
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Fields every stage config has.
def seed_field():
    return opt(0, "random seed", ge=0)


def report_to_field():
    return opt(
        ["none"],
        f"experiment trackers besides OUT/metrics.jsonl: none, {', '.join(TRACKERS)}",
        choices=["none", *TRACKERS],
    )


def threads_field():
    return opt(0, "torch threads (0 = torch's default; use 1 per process when processes share cores)", ge=0)
