"""Turning OS and SQLite failures into one StoreError that says what is wrong.

SQLite reports a full disk in several ways ("database or disk is full", but also "disk I/O
error" when the WAL index cannot grow), and OSError's text names an errno, not a cause: so
the message is built from what the file system says about itself.
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


def _file_system_says(path: Path) -> str | None:
    """'the disk is full' or 'the file system is read-only' when statvfs shows it."""
    try:
        stats = os.statvfs(_nearest_existing(path))
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return "the file system is read-only"
    if stats.f_bavail == 0:
        return "the disk is full"
    return None


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
