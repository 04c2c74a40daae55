"""One thread count for both math libraries of the engine: torch's pool and the BLAS that numpy links
(numpy's and scipy's OpenBLAS, for any numpy matrix product). The compiled decoder (`models.kernels`)
is single-threaded. On a shared 2-core machine every pool must be pinned: one oversubscribed pool
made a small model 25x slower here."""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_limits


def set_threads(n: int) -> None:
    """Use n threads in torch and in numpy's BLAS from now on (for the whole process)."""
    torch.set_num_threads(n)
    threadpool_limits(n, user_api="blas")
