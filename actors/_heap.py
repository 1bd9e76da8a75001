"""Giving the heap's free pages back to the OS when the engine goes idle.

On CPU, MLX allocates its arrays with ``malloc``. Once a buffer of some size is freed,
glibc serves buffers up to that size from the heap (its mmap threshold slides up to
32 MiB), and a heap keeps the pages of what is freed between buffers still in use: after
a busy spell, a runtime holds hundreds of megabytes it no longer uses. ``malloc_trim``
hands them back. The pages come back as page faults when the heap grows again, so the
engine trims when it has nothing to do, and while busy only when the heap holds much free
(``trim_heap_above``). Where the C library has no ``malloc_trim`` (macOS, musl) nothing is
done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Any, cast


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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        info: Any = ctypes.CDLL(name).mallinfo2  # glibc 2.33 and later
    except (OSError, AttributeError):
        return None
    info.restype = _MallInfo2
    return cast(Callable[[], _MallInfo2], info)


def heap_free_bytes() -> int | None:
    """Bytes the heap holds free (glibc's arenas), or None where that cannot be known."""
    info = _mallinfo2()
    return None if info is None else int(info().fordblks)


def trim_heap_above(free_bytes: int) -> bool:
    """Trim if the heap holds more than ``free_bytes`` free; True if it trimmed."""
    free = heap_free_bytes()
    return free is not None and free > free_bytes and trim_heap()


def trim_heap() -> bool:
    """Hand the heap's free pages back to the OS; False where that cannot be done."""
    trim = malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
