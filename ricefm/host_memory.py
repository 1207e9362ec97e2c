"""Keep freed host memory for the next step instead of handing it back to the OS after every step.

A training step allocates the same large buffers every step: XLA's temporary buffer (2.9 GB for 8
cells of 600 + 600 tokens on CPU) and torch's activations. glibc serves every allocation above
32 MiB, and every one above 64 MiB made by a thread other than the main one (XLA runs on its own
thread pool), with a fresh ``mmap`` and unmaps it on ``free``, so the next step faults in and zeroes
every page again: measured here (2 cores, base config, batch 8), 0.5-1.2 million minor page faults
and 1-4 s of system time per JAX CPU step, about a quarter of its CPU time. With
:func:`keep_freed_memory` steps run without faults once the heap has grown (``bench_throughput.py``
reports the gain and peak memory as ``host memory keep / release``). The price is memory: the
process keeps its peak, and a freed buffer too small for the next shape stays in its heap.

The trainers' ``__main__``, the ``ricefm`` command and the benchmarks call it first thing (before
JAX or torch start their threads); ``--config.train.host_memory=release`` turns it off for a run.
From Python, call it before the first JAX or torch computation.
"""

from __future__ import annotations

import ctypes
import platform

HOST_MEMORY = ("keep", "release")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def glibc() -> ctypes.CDLL | None:
    """The running glibc, or None under another C library (where nothing here applies)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory: one heap for all threads (the main heap is the only one
    that grows past 64 MiB without ``mmap``), no ``mmap`` allocations and no trimming. Returns
    whether it applied (False on other C libraries, where it does nothing)."""
    libc = glibc()
    if libc is None:
        return False
    # arenas first: a thread picks its heap at its first allocation, so this must precede the threads
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))  # -1: never trim


def release_free_pages() -> None:
    """Hand the heap's free pages back to the OS now (``malloc_trim``), kept heap or not: for a process
    that idles at its peak while others need the memory."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def check_host_memory(mode: str) -> None:
    from ricefm.errors import RiceFMInputError

    if mode not in HOST_MEMORY:
        raise RiceFMInputError(f"--config.train.host_memory={mode!r}: choose one of {', '.join(HOST_MEMORY)}")


def apply_host_memory(mode: str) -> bool:
    """``keep``: :func:`keep_freed_memory`; ``release``: glibc's defaults (returns whether it changed them)."""
    check_host_memory(mode)
    return keep_freed_memory() if mode == "keep" else False
