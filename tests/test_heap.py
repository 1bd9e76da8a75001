"""The engine hands the heap's free pages back to the OS (glibc's malloc_trim): when idle,
and while busy once the heap holds more free than a threshold."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from conftest import PYTHON
from troupe.actors._heap import heap_free_bytes, malloc_trim

# In a fresh process, so the heap starts in a known state. MLX's CPU arrays come from this
# malloc: once a 24 MiB buffer is freed, glibc serves buffers up to that size from the
# heap, and those freed between buffers still in use (as the batch's KV buffers are, between
# blocks and prompts) keep their pages resident.
FRAGMENT = textwrap.dedent("""
    import ctypes, json, os
    from troupe.actors._heap import heap_free_bytes, trim_heap_above

    MiB = 1 << 20
    def resident():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(24 * MiB))
    buffers = []
    for _ in range(96):
        buffers.append(libc.malloc(4 * MiB))
        ctypes.memset(buffers[-1], 1, 4 * MiB)
    figures = {"held": resident()}
    for pointer in buffers[::2]:  # every other one: the holes cannot merge
        libc.free(pointer)
    figures["freed"] = resident()
    figures["free"] = heap_free_bytes()
    # A busy engine trims only past a threshold (the KV budget).
    figures["trimmed_above_free"] = trim_heap_above(figures["free"] + MiB)
    figures["kept"] = resident()
    figures["trimmed_at_all"] = trim_heap_above(64 * MiB)
    figures["trimmed"] = resident()
    print(json.dumps(figures))
""")


@pytest.mark.skipif(malloc_trim() is None or heap_free_bytes() is None,
                    reason="malloc_trim and mallinfo2 are glibc's (2.33 on)")
def test_trimming_gives_the_pages_of_freed_buffers_back_to_the_os() -> None:
    done = subprocess.run([PYTHON, "-c", FRAGMENT], capture_output=True, text=True,
                          check=True)
    figures = json.loads(done.stdout)
    mib = 1 << 20
    assert figures["freed"] > figures["held"] - 64 * mib  # freed, still resident
    assert figures["free"] >= 48 * 4 * mib
    assert not figures["trimmed_above_free"]
    assert figures["kept"] > figures["held"] - 64 * mib
    assert figures["trimmed_at_all"]
    assert figures["trimmed"] < figures["held"] - 128 * mib
