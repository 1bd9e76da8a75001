"""The storage actor: the catalog in SQLite and each agent's KV cache on disk.

With a store directory, every turn is committed before its reply returns: the agent's new
messages, the token history its cache covers, and the cache itself (written by the engine
thread to a fresh file, which the catalog then points at). Without one it keeps nothing.
A cache file that is missing or damaged costs a re-prefill, never a transcript.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import re
import sqlite3
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread
import attrs

from .._actor import Actor, Request
from .._errors import StoreError
from ..storage._asyncio_thread import AsyncioThread
from ..storage._catalog import AgentRecord, Catalog
from ..storage._faults import store_error
from ..storage._kvfile import checksum, load_cache, save_cache, verify
from ._engine import Engine
from ._mlx import KVLayers, ModelInfo, cache_arrays, cache_from_arrays

logger = logging.getLogger("troupe")


@attrs.frozen
class AddAgent(Request[None]):
    agent_id: str
    system: str


@attrs.frozen
class KVRecord:
    """A cache file in the store's kv/ folder and the checksum the catalog keeps of it."""

    name: str
    checksum: str


@attrs.frozen
class CommitTurn(Request[KVRecord | None]):
    """Persist new messages, and a new cache covering ``history`` unless ``cache`` is None.

    Returns the cache file now on record (None if none).
    """

    agent_id: str
    first_seq: int
    messages: list[tuple[str, str]]
    turns: int
    history: tuple[int, ...]
    cache: KVLayers | None = attrs.field(repr=False)
    previous: KVRecord | None


@attrs.frozen
class RestoreCache(Request[KVLayers | None]):
    agent_id: str
    kv: KVRecord
    tokens: int


def _prepare_store(root: Path) -> IO[bytes]:
    """Make the store's folders and take its lock: two runtimes on one store would corrupt it."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"store {root} exists and is not a directory")
    try:
        (root / "kv").mkdir(parents=True, exist_ok=True)
        handle = open(root / "lock", "ab")  # noqa: SIM115 (held open until aclose)
    except OSError as exc:
        raise store_error(root, "make the store at", exc) from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise StoreError(f"store {root} is in use by another runtime") from exc
    return handle


_KV_NAME = re.compile(r"[0-9a-f]{20}-[0-9]{7}(\.partial)?\.safetensors")


def _remove_orphans(directory: Path, referenced: set[str]) -> None:
    """Delete the files of turns whose commit never happened (a crash between write and
    commit). Anything troupe did not write is left alone, and nothing here stops an open."""
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        logger.warning("cannot list %s: %s", directory, exc)
        return
    for path in entries:
        if path.name in referenced:
            continue
        if _KV_NAME.fullmatch(path.name) is None or not path.is_file() or path.is_symlink():
            logger.warning("skipping %s: not a KV file of this store", path)
            continue
        _remove(path)


def _remove(path: Path) -> None:
    """Delete a KV file; a failure is logged (an orphan costs disk space, not data)."""
    try:
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
        elif path.exists():
            logger.warning("not removing %s: it is not a file", path)
    except OSError as exc:
        logger.warning("cannot remove %s: %s", path, exc)


class Storage(Actor):
    """One per runtime. ``open`` it before use and ``aclose`` it after the engine stops.

    Every failure of the disk or the catalog fails the one request that met it, as
    StoreError; the next request tries again, so a fault that passes heals by itself.
    """

    def __init__(self, root: Path | None, engine: Engine, info: ModelInfo, mailbox: int) -> None:
        super().__init__("storage", mailbox)
        self.root = root
        self._engine = engine
        self._info = info
        self._sqlite: AsyncioThread | None = None
        self._catalog: Catalog | None = None
        self._lock: IO[bytes] | None = None
        self.caches_saved = 0
        self.caches_loaded = 0
        self.caches_unsaved = 0

    async def open(self) -> list[AgentRecord]:
        """Open the store (if any) and return the agents it holds."""
        if self.root is None:
            return []
        self._lock = await anyio.to_thread.run_sync(_prepare_store, self.root)
        self._sqlite = AsyncioThread("troupe-sqlite")
        info = self._info
        model_key = f"{info.name}:{info.num_layers}:{info.vocab_size}:{info.kv_bytes_per_token}"
        # Shielded: a connection abandoned half-open would keep its (non-daemon) thread.
        with anyio.CancelScope(shield=True):
            catalog, fits = await self._sqlite.run(
                Catalog.open, self.root / "catalog.sqlite", model_key
            )
        self._catalog = catalog
        if not fits:
            logger.warning("store %s was made with another model: its caches are dropped, "
                           "transcripts kept", self.root)
        records = await self._sqlite.run(catalog.load_agents)
        referenced = await self._sqlite.run(catalog.kv_files)
        await anyio.to_thread.run_sync(_remove_orphans, self.root / "kv", referenced)
        return records

    async def aclose(self) -> None:
        if self._sqlite is not None:
            if self._catalog is not None:
                await self._sqlite.run(self._catalog.close)
            await self._sqlite.aclose()
        if self._lock is not None:
            self._lock.close()  # releases the flock

    async def handle(self, message: Request[Any]) -> Any:
        try:
            # Shielded: a write cut off half-way would leave a transaction open.
            with anyio.CancelScope(shield=True):
                return await self._dispatch(message)
        except (OSError, sqlite3.Error) as exc:
            # Whatever slipped past the finer handlers fails this request, not the store.
            assert self.root is not None
            raise store_error(self.root, "use the store", exc) from exc

    async def _dispatch(self, message: Request[Any]) -> Any:
        if isinstance(message, CommitTurn):
            return await self._commit(message)
        if isinstance(message, RestoreCache):
            return await self._restore(message)
        if isinstance(message, AddAgent):
            return await self._add(message)
        raise TypeError(f"storage cannot handle {message!r}")

    async def _add(self, message: AddAgent) -> None:
        if self._catalog is None:
            return
        assert self._sqlite is not None
        await self._sqlite.run(self._catalog.add_agent, message.agent_id, message.system)

    def _file_name(self, agent_id: str, turns: int) -> str:
        digest = hashlib.sha256(agent_id.encode()).hexdigest()[:20]
        return f"{digest}-{turns:07d}.safetensors"

    async def _commit(self, message: CommitTurn) -> KVRecord | None:
        if self._catalog is None or self.root is None:
            return None
        assert self._sqlite is not None
        # No new cache: the file on record (if any) and the history it covers stand.
        record = message.previous
        history: tuple[int, ...] | None = None
        if message.cache is not None:
            record, history = None, ()
            if message.history and self._info.persistable_cache:
                record = await self._save(message)
                if record is not None:
                    history = message.history
        try:
            await self._sqlite.run(
                self._catalog.commit_turn, message.agent_id, message.first_seq,
                message.messages, message.turns, history,
                record.name if record else None, record.checksum if record else None,
            )
        except BaseException:
            if record is not None and record != message.previous:
                await anyio.to_thread.run_sync(_remove, self.root / "kv" / record.name)
            raise
        if message.previous is not None and message.previous != record:
            await anyio.to_thread.run_sync(_remove, self.root / "kv" / message.previous.name)
        return record

    async def _save(self, message: CommitTurn) -> KVRecord | None:
        """Write the turn's cache; None if it could not be written.

        The reply exists and the transcript can still be committed: a cache that cannot be
        written costs a prefill after a reopen, so it is not worth failing the turn for.
        """
        assert self.root is not None
        name = self._file_name(message.agent_id, message.turns)
        path, cache, tokens = self.root / "kv" / name, message.cache, len(message.history)
        assert cache is not None
        try:
            await self._engine.run(lambda: save_cache(path, cache, tokens, cache_arrays))
            digest = await anyio.to_thread.run_sync(checksum, path)
        except (StoreError, OSError) as exc:
            self.caches_unsaved += 1
            logger.warning("agent %r: its KV cache was not saved (%s); the turn is kept, and "
                           "after a reopen its context is prefilled again", message.agent_id, exc)
            await anyio.to_thread.run_sync(_remove, path)
            return None
        self.caches_saved += 1
        return KVRecord(name, digest)

    async def _restore(self, message: RestoreCache) -> KVLayers | None:
        if self.root is None:
            return None
        assert self._sqlite is not None
        assert self._catalog is not None
        path = self.root / "kv" / message.kv.name
        layers = self._info.num_layers
        try:
            await anyio.to_thread.run_sync(verify, path, message.kv.checksum)
            cache = await self._engine.run(
                lambda: load_cache(path, layers, message.tokens, cache_from_arrays)
            )
        except StoreError as exc:
            logger.warning("agent %r: %s; its context will be prefilled again",
                           message.agent_id, exc)
            try:
                await self._sqlite.run(self._catalog.drop_cache, message.agent_id)
            except StoreError as drop:
                # The agent's next commit replaces the record; until then, nothing is lost.
                logger.warning("agent %r: %s", message.agent_id, drop)
            await anyio.to_thread.run_sync(_remove, path)
            return None
        self.caches_loaded += 1
        return cache
