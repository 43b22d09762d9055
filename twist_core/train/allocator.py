"""Keep glibc from returning large tensor buffers to the kernel after every training step.

glibc serves allocations above its mmap threshold (at most 32 MiB by default) with a fresh ``mmap`` and gives
them back with ``munmap`` when freed, and it trims the heap top above the trim threshold. The patches stem makes
and frees maps of tens of MiB per slice of images every step, so each step paid for mapping, zero-filling and
unmapping them: on caltech20 at 64 px (2-core CPU) most of the run was system time. Raising both thresholds
once, before the heavy work, keeps those pages in the process and reuses them. Other C libraries (musl, macOS,
Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # buffers up to 1 GiB come from the reusable heap; larger ones are still mapped


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; returns whether the allocator took them."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
