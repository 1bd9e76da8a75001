"""KV blocks: their identity (a chained content hash) and their file format.

A full block of ``block_size`` tokens is identified, as in vLLM, by a hash chained over
(model identity, the parent block's id, the block's tokens): the same tokens at the same
position under the same model are the same block, whoever computed them. Nothing here
touches MLX or the disk: storage/_kvdir.py writes and reads the files.
"""

from __future__ import annotations

import array
import hashlib
import zlib
from collections.abc import Sequence

import attrs

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
    serial: int = 0
    """The write it came from: the store's opening in the high bits (see _kvdir)."""


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
