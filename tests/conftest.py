"""Shared fixtures: the embedded tiny model, made once per session in a private cache."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# A private model cache for the whole session (and the subprocesses it starts).
_CACHE = tempfile.mkdtemp(prefix="troupe-test-cache-")
os.environ["TROUPE_CACHE_DIR"] = _CACHE

import troupe  # noqa: E402  (loads OpenBLAS before anything imports MLX)
from troupe._embedded import embedded_model_path  # noqa: E402

TINY = "embedded:tiny"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The embedded tiny model's directory (made on first use)."""
    return embedded_model_path("tiny")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def troupe_env() -> Iterator[dict[str, str]]:
    """Environment for subprocesses: the session's model cache, unbuffered output."""
    env = dict(os.environ, TROUPE_CACHE_DIR=_CACHE, PYTHONUNBUFFERED="1")
    return env


class SmallDisk:
    """A real file system that a test can fill up and free again.

    As root: a 16 MB tmpfs mounted for the test (``kind == "tmpfs"``), which fills up
    for real (ENOSPC). Otherwise the same effect through RLIMIT_FSIZE (``kind ==
    "rlimit"``): while "full", no file of this process may grow (EFBIG).
    """

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self._filler = path / "filler"
        self._limit = resource.getrlimit(resource.RLIMIT_FSIZE)

    def fill(self) -> None:
        if self.kind == "rlimit":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, self._limit[1]))
            return
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        block = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, block)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0")
        os.close(fd)

    def free(self) -> None:
        if self.kind == "rlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, self._limit)
            return
        self._filler.unlink(missing_ok=True)


def _mount_tmpfs(target: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True)
    return done.returncode == 0


def _unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True, check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    target = tmp_path / "disk"
    if _mount_tmpfs(target, "size=16m"):
        disk = SmallDisk(target, "tmpfs")
        try:
            yield disk
        finally:
            _unmount(target)
    else:
        target.mkdir(exist_ok=True)
        disk = SmallDisk(target, "rlimit")
        try:
            yield disk
        finally:
            disk.free()


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a read-only file system (a tmpfs as root; /proc's root otherwise)."""
    target = tmp_path / "ro"
    if _mount_tmpfs(target, "ro,size=1m"):
        try:
            yield target
        finally:
            _unmount(target)
    else:
        yield Path("/proc")


PYTHON = sys.executable
assert troupe.__version__
