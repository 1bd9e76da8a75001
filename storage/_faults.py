"""Turning OS and SQLite failures into one StoreError that says what is wrong.

SQLite reports a full disk in several ways ("database or disk is full", but also "disk I/O
error" when the WAL index cannot grow), and a file system the kernel turned read-only after
an error as "disk I/O error" too; OSError's text names an errno, not a cause: so the
message is built from what the file system says about itself.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from .._errors import StoreError

_BY_ERRNO = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "a file grew past the size limit of this process (RLIMIT_FSIZE)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted here",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "a directory stands where a file should be",
    errno.ENOENT: "a file or directory is missing",
}


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _write_refused(directory: Path) -> OSError | None:
    """How the file system under ``directory`` refuses to create a file now, or None.

    An unnamed O_TMPFILE leaves no trace; on a journalling file system it takes a journal
    handle, which ext4 refuses (EROFS) once its journal has aborted.
    """
    if not directory.is_dir():
        directory = directory.parent
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError as exc:
        return exc
    os.close(fd)
    return None


def _file_system_says(path: Path) -> str | None:
    """'the disk is full' or 'the file system is read-only' when the file system shows it."""
    existing = _nearest_existing(path)
    try:
        stats = os.statvfs(existing)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return "the file system is read-only"
    refused = _write_refused(existing)
    if refused is not None and refused.errno == errno.EROFS:
        # After an error, ext4 with errors=remount-ro (Linux 6.18 here) marks itself
        # "emergency_ro": the mount stays rw and statvfs shows no ST_RDONLY, SQLite says
        # "disk I/O error", and only a write tells. Nothing but an unmount undoes it.
        return ("the file system is read-only: the kernel stopped its writes after an error; "
                "see the kernel log, then unmount and fsck it")
    if stats.f_bavail == 0:
        return "the disk is full"
    return None


def failed_since_sync(path: Path) -> str | None:
    """Call after an fsync on ``path``'s file system succeeded: why that success is not to
    be trusted (the file system has failed since the fsync began), or None.

    ext4 (Linux 6.18 here): an error aborts the journal first and marks the file system
    read-only only later (after writing its superblock). An fsync that passes its own check
    in between returns 0, though the journal transaction holding the file's new size was
    thrown away by the abort (jbd2_complete_transaction takes a discarded transaction for
    a committed one): after e2fsck the appended data is gone, in about one trial in six of
    a plain append-and-fdatasync loop. A journal handle taken after the fsync is refused
    once the journal has aborted, so an fsync followed by this check passing was kept.
    """
    refused = _write_refused(_nearest_existing(path))
    if refused is None or refused.errno not in (errno.EROFS, errno.EIO):
        return None
    said = _file_system_says(path) or refused.strerror
    return f"the file system failed as it was written ({said})"


def reason(exc: BaseException, path: Path) -> str:
    """Why ``exc`` happened, in words, checking the file system ``path`` lives on."""
    if isinstance(exc, OSError) and exc.errno in _BY_ERRNO:
        return f"{_BY_ERRNO[exc.errno]} ({exc.strerror})"
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            return f"the disk is full ({exc})"
        if code is not None and code & 0xFF == sqlite3.SQLITE_READONLY:
            return f"the file system is read-only or the catalog is not writable ({exc})"
    said = _file_system_says(path)
    return f"{said} ({exc})" if said else str(exc)


def store_error(path: Path, action: str, exc: BaseException) -> StoreError:
    """A StoreError for ``action`` on ``path``, chained to ``exc`` by the caller."""
    return StoreError(f"cannot {action} {path}: {reason(exc, path)}")
