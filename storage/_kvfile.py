"""The on-disk KV cache format: one safetensors file per agent cache.

Each layer's keys and values, sliced to the tokens they cover (never the growth slack),
plus metadata naming the format, the layer count and the token count. Files are written
to a temporary name, fsynced and renamed, so a reader sees a whole file or none.
Call these on the engine thread: they make and evaluate MLX arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

from .._errors import StoreError
from ._faults import store_error

FORMAT = "troupe-kv/1"

# (cache) -> arrays, and (arrays, num_layers) -> cache: the adapter's converters.
ToArrays = Callable[[list[Any]], dict[str, mx.array]]
FromArrays = Callable[[dict[str, mx.array], int], list[Any]]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checksum(path: Path) -> str:
    """The checksum the catalog keeps of a whole KV file (any thread; OSError if unreadable)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    """StoreError unless the file at ``path`` is whole and is the one the catalog recorded."""
    try:
        actual = checksum(path)
    except OSError as exc:
        raise StoreError(f"unreadable KV file {path}: {exc}") from exc
    if actual != expected:
        raise StoreError(f"KV file {path} is damaged or not this agent's (checksum mismatch)")


def save_cache(path: Path, cache: list[Any], tokens: int, to_arrays: ToArrays) -> int:
    """Write ``cache`` (covering ``tokens`` tokens) to ``path``; returns the file's size.

    Makes the folder if it vanished; StoreError if the write fails (no file is left).
    """
    arrays = to_arrays(cache)
    metadata = {"format": FORMAT, "layers": str(len(cache)), "tokens": str(tokens)}
    # Ends in .safetensors: mx.save_safetensors would append the suffix otherwise.
    staging_file = path.with_name(path.stem + ".partial.safetensors")
    try:
        path.parent.mkdir(exist_ok=True)
        mx.save_safetensors(str(staging_file), arrays, metadata=metadata)
        with open(staging_file, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(staging_file, path)
        _fsync_dir(path.parent)
        return path.stat().st_size
    except (OSError, RuntimeError) as exc:  # MLX reports I/O failures as RuntimeError
        with contextlib.suppress(OSError):
            staging_file.unlink(missing_ok=True)
        raise store_error(path, "write the KV file", exc) from exc


def load_cache(path: Path, num_layers: int, tokens: int, from_arrays: FromArrays) -> list[Any]:
    """Read a cache written by ``save_cache``; StoreError if it is missing or misshapen.

    ``verify`` the file against the catalog's checksum first: this checks shapes only.
    """
    try:
        loaded = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise StoreError(f"unreadable KV file {path}: {exc}") from exc
    arrays, metadata = cast(tuple[dict[str, mx.array], dict[str, str]], loaded)
    if metadata.get("format") != FORMAT:
        raise StoreError(f"{path} is not a {FORMAT} file")
    if metadata.get("layers") != str(num_layers) or metadata.get("tokens") != str(tokens):
        raise StoreError(
            f"{path} holds {metadata.get('layers')} layers x {metadata.get('tokens')} tokens, "
            f"expected {num_layers} x {tokens}"
        )
    for i in range(num_layers):
        for part in ("keys", "values"):
            array = arrays.get(f"{i}.{part}")
            if array is None or array.ndim != 4 or array.shape[2] != tokens:
                raise StoreError(f"{path}: layer {i} {part} is missing or misshapen")
    try:
        mx.eval(list(arrays.values()))
    except Exception as exc:
        raise StoreError(f"unreadable KV file {path}: {exc}") from exc
    return from_arrays(arrays, num_layers)
