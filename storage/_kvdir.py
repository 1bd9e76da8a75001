"""The store's kv/ folder: the names troupe gives its files, and access that stays inside.

Every name is made here from ids the catalog holds (a block's id, an agent's id) and a
*serial*: the store's generation (one per opening, recorded in the catalog) in the high 32
bits and a count within it below. A name read back is parsed against the same patterns
before anything touches the file, and every file is reached relative to kv/ opened with
``O_NOFOLLOW``: a damaged or tampered catalog can neither name a path outside the store nor
lead it through a symbolic link.

The generation in a name is what lets an opening tell garbage from the unknown: a file of
an earlier generation that the catalog does not name is left over from a turn that never
committed (or a block no chain holds), while a file of a generation the catalog never
issued means the catalog is not the one these files belong to.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from .._errors import StoreError
from ._blocks import KVFile, checksum_matches, payload_checksum
from ._faults import store_error

logger = logging.getLogger("troupe")

GENERATION_SHIFT = 32
"""A serial's low bits count the files of one generation (one opening of the store)."""


def agent_key(agent_id: str) -> str:
    """The part of an agent's tail file names derived from its id (any id, fixed length)."""
    return hashlib.sha256(agent_id.encode()).hexdigest()[:20]


def block_file_name(block_id: bytes, serial: int) -> str:
    """The file of a block written with ``serial`` (0: a store from before serials)."""
    if serial == 0:
        return f"{block_id.hex()}.kvb"
    return f"{block_id.hex()}.{serial:016x}.kvb"


def tail_file_name(agent_id: str, serial: int) -> str:
    """The file of an agent's tail written with ``serial``: a new name for every write."""
    return f"{agent_key(agent_id)}.{serial:016x}.kvt"


def generation_of(serial: int) -> int:
    return serial >> GENERATION_SHIFT


@attrs.frozen
class KVName:
    """A name troupe writes in kv/, parsed: ``kind`` is "block", "tail" or "legacy"
    (whole-cache files of schema 1 and 2), ``key`` the block id's hex or the agent key,
    ``generation`` 0 for names from before generations."""

    kind: str
    key: str
    generation: int
    partial: bool = False


_BLOCK = re.compile(r"([0-9a-f]{32})(?:\.([0-9a-f]{16}))?\.kvb")
_TAIL = re.compile(r"([0-9a-f]{20})\.([0-9a-f]{16})\.kvt")
# Names written before generations: tails with a random suffix, whole-cache files.
_OLD_TAIL = re.compile(r"([0-9a-f]{20})-[0-9a-f]{16}\.kvt")
_OLD_CACHE = re.compile(r"([0-9a-f]{20})-[0-9]{7}\.safetensors")
_OLD_PARTIAL = re.compile(
    r"[0-9a-f]{32}\.partial|[0-9a-f]{20}-[0-9a-f]{16}\.partial"
    r"|[0-9a-f]{20}-[0-9]{7}\.partial\.safetensors"
)


def parse_name(name: str) -> KVName | None:
    """What a name in kv/ is, or None if troupe never writes such a name."""
    partial = name.endswith(".partial")
    base = name[: -len(".partial")] if partial else name
    if (m := _BLOCK.fullmatch(base)) is not None:
        return KVName("block", m[1], generation_of(int(m[2], 16)) if m[2] else 0, partial)
    if (m := _TAIL.fullmatch(base)) is not None:
        return KVName("tail", m[1], generation_of(int(m[2], 16)), partial)
    if not partial and (m := _OLD_TAIL.fullmatch(name)) is not None:
        return KVName("tail", m[1], 0)
    if not partial and (m := _OLD_CACHE.fullmatch(name)) is not None:
        return KVName("legacy", m[1], 0)
    if _OLD_PARTIAL.fullmatch(name) is not None:
        return KVName("legacy", "", 0, partial=True)
    return None


def check_tail_name(agent_id: str, name: str) -> None:
    """StoreError unless ``name`` is one troupe gives ``agent_id``'s tail files."""
    parsed = parse_name(name)
    if parsed is None or parsed.kind != "tail" or parsed.partial or \
            parsed.key != agent_key(agent_id):
        raise StoreError(f"the catalog names {name!r} as the tail file of agent {agent_id!r}, "
                         "which is not a name troupe gives it; the tail is ignored")


@attrs.frozen
class Entry:
    """One entry of kv/ as listed: its name, what the name says, and whether it is a
    regular file (not a directory or a link)."""

    name: str
    parsed: KVName | None
    is_file: bool


@attrs.frozen
class KVFiles:
    """What an opening found in kv/: how many of troupe's files (temporaries aside), and
    the newest opening of the store that wrote one (0: none, or only older names)."""

    directory: Path
    count: int
    newest: int

    @classmethod
    def of(cls, directory: Path, entries: Sequence[Entry]) -> KVFiles:
        ours = [e.parsed for e in entries if e.parsed is not None and not e.parsed.partial]
        return cls(directory, len(ours), max((p.generation for p in ours), default=0))


def garbage(entries: Sequence[Entry], named: set[str], generation: int) -> list[Entry]:
    """The entries an opening of ``generation`` may delete: temporaries, and troupe's
    files of earlier openings that the catalog (``named``) does not name: turns that never
    committed, tails replaced, blocks no chain holds."""
    return [e for e in entries if e.parsed is not None and e.name not in named
            and (e.parsed.partial or e.parsed.generation < generation)]


class KVDir:
    """The kv/ folder of one store. Methods run on worker threads; each opens kv/ afresh
    (a folder deleted mid-run is made again by the next write) without following links."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.made = 0
        """How many times a write found kv/ gone and made it again (its files went with it)."""

    @contextlib.contextmanager
    def _opened(self, *, create: bool) -> Iterator[int]:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.path)
                self.made += 1
            fd = os.open(self.path, flags)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and self.path.is_symlink():
                raise StoreError(f"{self.path} is a symbolic link: troupe keeps KV files in "
                                 "the store itself and follows no link out of it") from exc
            raise
        try:
            yield fd
        finally:
            os.close(fd)

    def make(self) -> None:
        """Make kv/ if it is missing; StoreError if it is a link out of the store."""
        with self._opened(create=True):
            pass

    def write(self, name: str, parts: Sequence[memoryview | bytes], serial: int = 0) -> KVFile:
        """Write KV bytes durably under ``name``: to a temporary name, fsynced, renamed, the
        folder fsynced, so a reader sees a whole file or none. StoreError if the disk
        refuses (nothing is left behind)."""
        _check(name)
        record = KVFile(name, sum(memoryview(p).nbytes for p in parts), payload_checksum(parts),
                        serial)
        staging = name + ".partial"
        try:
            with self._opened(create=True) as folder:
                fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=folder)
                try:
                    with open(fd, "wb", closefd=False) as f:
                        for part in parts:
                            f.write(part)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(staging, name, src_dir_fd=folder, dst_dir_fd=folder)
                os.fsync(folder)
        except OSError as exc:
            with contextlib.suppress(OSError), self._opened(create=False) as folder:
                os.unlink(staging, dir_fd=folder)
            raise store_error(self.path / name, "write the KV file", exc) from exc
        return record

    def read_into(self, record: KVFile, parts: Sequence[memoryview]) -> None:
        """Fill ``parts`` (writable, in file order) with a file's bytes, checked against the
        catalog's record; StoreError if the file is not whole or not the size of ``parts``.

        Reading straight into the memory the caller keeps copies each byte once.
        """
        _check(record.name)
        path = self.path / record.name
        expected = sum(part.nbytes for part in parts)
        try:
            with self._opened(create=False) as folder:
                fd = os.open(record.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=folder)
            with open(fd, "rb", buffering=0) as f:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise StoreError(f"KV file {path} is damaged (not a regular file)")
                size = info.st_size
                if size != record.nbytes or size != expected:
                    raise StoreError(f"KV file {path} is damaged (size {size}, recorded "
                                     f"{record.nbytes}, expected {expected})")
                for part in parts:
                    filled = 0
                    while filled < part.nbytes:
                        n = f.readinto(part[filled:])
                        if not n:
                            raise StoreError(f"KV file {path} is damaged (shorter than its "
                                             "size)")
                        filled += n
        except OSError as exc:
            raise StoreError(f"unreadable KV file {path}: {_why(exc)}") from exc
        if not checksum_matches(parts, record.checksum):
            raise StoreError(f"KV file {path} is damaged (checksum mismatch)")

    def read(self, record: KVFile) -> bytearray:
        """A file's bytes, checked against the catalog's record; StoreError if not whole."""
        data = bytearray(record.nbytes)
        self.read_into(record, [memoryview(data)])
        return data

    def copy(self, record: KVFile, name: str, serial: int) -> KVFile:
        """A durable copy of a checked file under a new name; StoreError if either fails."""
        return self.write(name, [memoryview(self.read(record))], serial)

    def remove(self, name: str) -> None:
        """Delete one of troupe's files; a failure is left to the next opening's collection
        (an orphan costs disk space, not data). What is not a file is set aside."""
        _check(name)
        try:
            with self._opened(create=False) as folder:
                info = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    self._set_aside(folder, name)
                else:
                    os.unlink(name, dir_fd=folder)  # a link goes, not what it points at
        except FileNotFoundError:
            pass
        except (OSError, StoreError) as exc:
            logger.warning("cannot remove %s: %s", self.path / name, exc)

    def _set_aside(self, folder: int, name: str) -> None:
        """Move a directory that stands where a KV file should be to ``damaged/`` beside
        kv/, so that it no longer takes the name and nothing in it is lost."""
        aside = self.path.parent / "damaged"
        aside.mkdir(exist_ok=True)
        target = aside / name
        n = 1
        while target.exists():
            target = aside / f"{name}.{n}"
            n += 1
        os.rename(name, target, src_dir_fd=folder)
        logger.warning(
            "a directory stood where the KV file %s should be: moved to %s",
            self.path / name, target)

    def entries(self) -> list[Entry]:
        """Everything in kv/ (none if it is missing)."""
        try:
            with self._opened(create=False) as folder:
                found = []
                with os.scandir(folder) as listing:
                    for item in listing:
                        found.append(Entry(item.name, parse_name(item.name),
                                           item.is_file(follow_symlinks=False)))
                return found
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise store_error(self.path, "list", exc) from exc


def _check(name: str) -> None:
    parsed = parse_name(name)
    if parsed is None:
        raise StoreError(f"{name!r} is not the name of a KV file troupe writes")


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link, which troupe does not follow"
    if exc.errno == errno.EISDIR:
        return "a directory stands where the file should be"
    return exc.strerror or str(exc)
