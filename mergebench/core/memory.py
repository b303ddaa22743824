"""The C library's memory calls: handing freed heap back to the system where the engine's memory bound needs it,
and starting the write-back of an output's pages while the merge goes on."""

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


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting (Linux's ``sync_file_range``), so that the fsync
    that makes the output durable does not write the whole shard at the end (0.1B, one 212 MB shard: 85-97 ms ->
    24-48 ms). Elsewhere, or where the file system refuses it, nothing happens: the fsync does it all."""
    libc = _libc()
    sync_file_range = getattr(libc, "sync_file_range", None) if libc is not None else None
    if sync_file_range is not None:
        sync_file_range(ctypes.c_int(fd), ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))
