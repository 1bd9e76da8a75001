"""KV blocks: their identity (a chained content hash) and their file format.

A full block of ``block_size`` tokens is identified, as in vLLM, by a hash chained over
(model identity, the parent block's id, the block's tokens): the same tokens at the same
position under the same model are the same block, whoever computed them. Nothing here
touches MLX: files are written from and read into the arrays' memory, through views the
engine thread made, on worker threads.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import os
import secrets
import zlib
from collections.abc import Sequence
from pathlib import Path

import attrs

from .._errors import StoreError
from ._faults import store_error

BLOCK_FORMAT = "troupe-block/1"
"""Block and tail files: each layer's keys then values, raw, in the model's dtype (the
catalog records it under meta 'kv_format')."""
DEFAULT_BLOCK_SIZE = 128
ROOT = b"\0" * 16
"""The parent of a chain's first block."""


def block_ids(
    model_key: bytes, tokens: Sequence[int], block_size: int, *, count: int | None = None
) -> list[bytes]:
    """The ids of the full blocks of ``tokens`` (at most ``count`` of them)."""
    n = len(tokens) // block_size
    if count is not None:
        n = min(n, count)
    ids: list[bytes] = []
    parent = ROOT
    for i in range(n):
        digest = hashlib.blake2b(parent, digest_size=16, key=model_key[:64])
        digest.update(array.array("I", tokens[i * block_size : (i + 1) * block_size]).tobytes())
        parent = digest.digest()
        ids.append(parent)
    return ids


@attrs.frozen
class KVFile:
    """A file of KV bytes in the store's kv/ folder, as the catalog records it."""

    name: str
    nbytes: int
    checksum: str


def block_file_name(block_id: bytes) -> str:
    return block_id.hex() + ".kvb"


def tail_file_name(agent_id: str) -> str:
    # A fresh name each time: a tail on record is never overwritten in place.
    agent = hashlib.sha256(agent_id.encode()).hexdigest()[:20]
    return f"{agent}-{secrets.token_hex(8)}.kvt"


CRC32 = "crc32:"


def payload_checksum(parts: Sequence[memoryview | bytes]) -> str:
    """The checksum a KV file's bytes are recorded with: ``crc32:`` and 8 hex digits."""
    # A CRC-32 (Btrfs checksums data blocks with one by default) catches any damaged run
    # of up to 32 bits and misses other damage, or a file swapped for another of its
    # length, with odds of 2**-32; zlib's runs ~5 GB/s here against SHA-256's ~1.8, and a
    # restore checks every byte it reads on the cores the model decodes on.
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return f"{CRC32}{crc:08x}"


def checksum_matches(parts: Sequence[memoryview | bytes], recorded: str) -> bool:
    """Whether ``parts`` (a file's bytes, in order) have the checksum the catalog recorded
    for them."""
    if recorded.startswith(CRC32):
        return payload_checksum(parts) == recorded
    # Files recorded by earlier commits of this schema carry SHA-256 hex digests.
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest() == recorded


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_kv(directory: Path, name: str, parts: Sequence[memoryview]) -> KVFile:
    """Write KV bytes (each layer's keys then values) durably; any thread.

    Written to a temporary name, fsynced, renamed: a reader sees a whole file or none.
    StoreError if the disk refuses (nothing is left behind). Makes the folder if it
    vanished.
    """
    record = KVFile(name, sum(p.nbytes for p in parts), payload_checksum(parts))
    path = directory / name
    staging = path.with_suffix(".partial")
    try:
        directory.mkdir(exist_ok=True)
        with open(staging, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
        _fsync_dir(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
        raise store_error(path, "write the KV file", exc) from exc
    return record


def copy_kv(directory: Path, record: KVFile, name: str) -> KVFile:
    """A durable copy of a checked file under a new name; StoreError if either fails."""
    data = read_kv(directory, record)
    return write_kv(directory, name, [memoryview(data)])


def read_kv_into(directory: Path, record: KVFile, parts: Sequence[memoryview]) -> None:
    """Fill ``parts`` (writable, in file order) with a file's bytes, checked against the
    catalog's record; StoreError if the file is not whole or not the size of ``parts``.

    Reading straight into the memory the caller keeps copies each byte once (into bytes
    first, a restore copied them twice and faulted in twice the fresh pages).
    """
    path = directory / record.name
    expected = sum(part.nbytes for part in parts)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != record.nbytes or size != expected:
                raise StoreError(f"KV file {path} is damaged (size {size}, recorded "
                                 f"{record.nbytes}, expected {expected})")
            for part in parts:
                filled = 0
                while filled < part.nbytes:
                    n = f.readinto(part[filled:])
                    if not n:
                        raise StoreError(f"KV file {path} is damaged (shorter than its size)")
                    filled += n
    except OSError as exc:
        raise StoreError(f"unreadable KV file {path}: {exc}") from exc
    if not checksum_matches(parts, record.checksum):
        raise StoreError(f"KV file {path} is damaged (checksum mismatch)")


def read_kv(directory: Path, record: KVFile) -> bytearray:
    """A file's bytes, checked against the catalog's record; StoreError if not whole."""
    data = bytearray(record.nbytes)
    read_kv_into(directory, record, [memoryview(data)])
    return data
