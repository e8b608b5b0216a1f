"""Keep the memory a CPU training step frees for the next step (glibc's malloc, Linux).

Every training step allocates and frees the same large tensors: the block buffers, their gradients and
workspaces, tens of MB each at CIFAR sizes. By default glibc hands large blocks back to the kernel when
they are freed (blocks over its mmap threshold are unmapped; free memory at the top of the heap beyond
its trim threshold is trimmed), so the next step gets fresh pages and pays a page fault for every 4 KiB
it first touches. On a 2-core VM those faults cost more than the arithmetic of the passes that touch the
memory (``bench/bench_page_faults.py``). :func:`keep_freed_memory` tells malloc to serve every block from
its heap (``M_MMAP_MAX = 0``) and never to trim it (``M_TRIM_THRESHOLD``): from the second step on, the
step's tensors come from pages the process already holds.

Measured (2026-12-08, 2-core AMD EPYC Zen 3, float32, batch 64, ``python bench/bench_levers.py``; the
figures are in ``docs/speed.md``): BC-100 1.28x the step, DenseNet-40 1.16x, for 8% and 18% more peak
resident memory (the heap keeps its high-water mark). ``densenet train`` sets it on the CPU except with
``--memory-efficient`` (whose point is the smallest peak); ``DENSENET_KEEP_FREED_MEMORY=0`` turns it off, and
a user's own ``MALLOC_*`` settings are left alone. On another C library (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "status"]

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top before trimming, i.e. never in practice
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_state: dict[str, str] = {"status": ""}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks in the process for reuse (see the module's docstring).
    Returns whether it did; :func:`status` then says so in one phrase for the plan line."""
    if os.environ.get("DENSENET_KEEP_FREED_MEMORY", "1") == "0" or any(k in os.environ for k in USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        return False
    _state["status"] = "freed memory kept for reuse (DENSENET_KEEP_FREED_MEMORY=0 to turn off)"
    return True


def status() -> str:
    """One phrase for the plan line when :func:`keep_freed_memory` is in effect, else ''."""
    return _state["status"]
