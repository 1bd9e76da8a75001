"""The lock that gives one runtime (or one offline tool) a store at a time."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .._errors import StoreError


class StoreLock:
    """A store held by one runtime: an exclusive flock on the store's directory itself
    (a lock file can be deleted, and a second process would lock a new one), and on its
    ``lock`` file, which troupes before 0.2 lock."""

    def __init__(self, root: Path) -> None:
        self._fds: list[int] = []
        try:
            for path, flags in ((root, os.O_RDONLY | os.O_DIRECTORY),
                                (root / "lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND)):
                self._fds.append(os.open(path, flags | os.O_CLOEXEC, 0o644))
                try:
                    fcntl.flock(self._fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    raise StoreError(f"store {root} is in use by another runtime") from exc
        except BaseException:
            self.release()
            raise

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())  # releases its flock
