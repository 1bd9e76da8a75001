"""Shared fixtures: the embedded tiny model, made once per session in a private cache."""

from __future__ import annotations

import os
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


PYTHON = sys.executable
assert troupe.__version__
