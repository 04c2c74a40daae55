"""One thread count for both math libraries of the engine: torch's pool and the BLAS that numpy links
(numpy's and scipy's OpenBLAS, for any numpy matrix product). The compiled decoder (`models.kernels`)
is single-threaded. On a shared 2-core machine every pool must be pinned: one oversubscribed pool
made a small model 25x slower here.

Torch's count (OpenMP) is kept per thread: a thread that sets it changes its own, and a thread
started later begins with the last count set anywhere. The speech service's engine thread sets the
count it was built with; its vocoder thread takes the cores left (`vocoder_threads`)."""

from __future__ import annotations

import os

import torch
from threadpoolctl import threadpool_limits


def set_threads(n: int) -> None:
    """Use n threads in torch and in numpy's BLAS from now on (for the whole process)."""
    torch.set_num_threads(n)
    threadpool_limits(n, user_api="blas")


def vocoder_threads(engine_threads: int, cores: int | None = None) -> int:
    """Torch intra-op threads for the vocoder thread beside an engine thread that uses
    `engine_threads`: the cores the engine leaves, at most as many as the engine's, at least one
    (so the process runs no more compute threads than there are cores, where it can)."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, min(engine_threads, cores - engine_threads))
