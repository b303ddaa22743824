"""The C heap: handing freed memory back to the system where the engine's memory bound needs it."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to do
        return None


def return_free_heap() -> None:
    """Hand the free pages of every malloc arena back to the system (glibc's ``malloc_trim``).

    glibc serves blocks below its mmap threshold (which rises to the size of each larger block freed, up to 32 MiB)
    from per-thread arenas, and keeps them resident once freed. The engine calls this before a tensor of the largest
    size, once smaller tensors' copies are freed (model_stock, 0.1B, N = 8: 120-250 MiB resident at the output
    head's start, beside its (N + 2) copies); a method that works on extra threads, after each thread's task
    (TSV-M's float64 row blocks held 0.47 GiB more). Fixing the thresholds instead (``mallopt``) cost other methods
    memory or time: 16 MiB / 64 MiB left slerp's peak 1.13-1.19 of the bound against 1.02-1.07 without."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
