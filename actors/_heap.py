"""Giving the heap's free pages back to the OS when the engine goes idle.

On CPU, MLX allocates its arrays with ``malloc``. Once a buffer of some size is freed,
glibc serves buffers up to that size from the heap (its mmap threshold slides up to
32 MiB), and a heap keeps the pages of what is freed between buffers still in use: after
a busy spell, a runtime holds hundreds of megabytes it no longer uses. ``malloc_trim``
hands them back. Trimming while the batch runs cost more time than it saved memory (the
pages come back as page faults), so the engine trims when it has nothing to do. Where the
C library has no ``malloc_trim`` (macOS, musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def trim_heap() -> bool:
    """Hand the heap's free pages back to the OS; False where that cannot be done."""
    trim = malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
