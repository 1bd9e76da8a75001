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
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread
import attrs

from .._actor import Actor, Request
from .._errors import AgentExistsError, StoreError
from ..storage._asyncio_thread import AsyncioThread
from ..storage._catalog import AgentRecord, Catalog
from ..storage._kvfile import load_cache, save_cache
from ._engine import Engine
from ._mlx import KVLayers, ModelInfo, cache_arrays, cache_from_arrays

logger = logging.getLogger("troupe")


@attrs.frozen
class AddAgent(Request[None]):
    agent_id: str
    system: str


@attrs.frozen
class CommitTurn(Request[str | None]):
    """Persist new messages, and a new cache covering ``history`` unless ``cache`` is None.

    Returns the cache file now on record (None if none).
    """

    agent_id: str
    first_seq: int
    messages: list[tuple[str, str]]
    turns: int
    history: tuple[int, ...]
    cache: KVLayers | None = attrs.field(repr=False)
    previous_file: str | None


@attrs.frozen
class RestoreCache(Request[KVLayers | None]):
    agent_id: str
    kv_file: str
    tokens: int


def _prepare_store(root: Path) -> IO[bytes]:
    """Make the store's folders and take its lock: two runtimes on one store would corrupt it."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"store {root} exists and is not a directory")
    (root / "kv").mkdir(parents=True, exist_ok=True)
    handle = open(root / "lock", "ab")  # noqa: SIM115 (held open until aclose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise StoreError(f"store {root} is in use by another runtime") from exc
    return handle


def _remove_orphans(directory: Path, referenced: set[str]) -> None:
    # Files of turns whose commit never happened (a crash between write and commit).
    for path in directory.iterdir():
        if path.name not in referenced:
            path.unlink(missing_ok=True)


async def _unlink(path: Path) -> None:
    await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))


class Storage(Actor):
    """One per runtime. ``open`` it before use and ``aclose`` it after the engine stops."""

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
        except OSError as exc:
            # A full disk or a vanished directory fails this request, not the store.
            raise StoreError(f"store {self.root}: {exc}") from exc

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
        try:
            await self._sqlite.run(self._catalog.add_agent, message.agent_id, message.system)
        except StoreError as exc:
            raise AgentExistsError(f"agent {message.agent_id!r} exists in the store") from exc

    def _file_name(self, agent_id: str, turns: int) -> str:
        digest = hashlib.sha256(agent_id.encode()).hexdigest()[:20]
        return f"{digest}-{turns:07d}.safetensors"

    async def _commit(self, message: CommitTurn) -> str | None:
        if self._catalog is None or self.root is None:
            return None
        assert self._sqlite is not None
        # No new cache: the file on record (if any) and the history it covers stand.
        kv_file = message.previous_file
        history: tuple[int, ...] | None = None
        cache = message.cache
        if cache is not None:
            kv_file, history = None, ()
            if message.history and self._info.persistable_cache:
                kv_file, history = self._file_name(message.agent_id, message.turns), message.history
                path, tokens = self.root / "kv" / kv_file, len(history)
                await self._engine.run(lambda: save_cache(path, cache, tokens, cache_arrays))
                self.caches_saved += 1
        await self._sqlite.run(
            self._catalog.commit_turn, message.agent_id, message.first_seq,
            message.messages, message.turns, history, kv_file,
        )
        if message.previous_file and message.previous_file != kv_file:
            await _unlink(self.root / "kv" / message.previous_file)
        return kv_file

    async def _restore(self, message: RestoreCache) -> KVLayers | None:
        if self.root is None:
            return None
        assert self._sqlite is not None
        assert self._catalog is not None
        path = self.root / "kv" / message.kv_file
        layers = self._info.num_layers
        try:
            cache = await self._engine.run(
                lambda: load_cache(path, layers, message.tokens, cache_from_arrays)
            )
        except StoreError as exc:
            logger.warning("agent %r: %s; its context will be prefilled again",
                           message.agent_id, exc)
            await self._sqlite.run(self._catalog.drop_cache, message.agent_id)
            await _unlink(path)
            return None
        self.caches_loaded += 1
        return cache
