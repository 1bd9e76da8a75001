"""The SQLite catalog: agents, transcripts, token histories and where each cache lives.

Asyncio code (aiosqlite); the storage actor runs it on its private asyncio loop. Every
turn is one transaction, so a reader sees a turn wholly or not at all.
"""

from __future__ import annotations

import array
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite
import attrs

from .._errors import AgentExistsError, StoreError
from ._faults import store_error

SCHEMA_VERSION = 2

logger = logging.getLogger("troupe")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    system TEXT NOT NULL,
    created REAL NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    history BLOB NOT NULL DEFAULT x'',
    kv_file TEXT,
    kv_checksum TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    agent_id TEXT NOT NULL REFERENCES agents(id),
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
"""


def pack_tokens(tokens: list[int] | tuple[int, ...]) -> bytes:
    return array.array("I", tokens).tobytes()


def unpack_tokens(blob: bytes) -> list[int]:
    values = array.array("I")
    values.frombytes(blob)
    return values.tolist()


@attrs.frozen
class AgentRecord:
    """An agent as the catalog has it."""

    agent_id: str
    system: str
    turns: int
    messages: tuple[tuple[str, str], ...]
    history: tuple[int, ...]
    kv_file: str | None
    kv_checksum: str | None


async def _connect(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path)
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
    except BaseException:
        await db.close()
        raise
    return db


class Catalog:
    """The catalog of one store. Open with ``await Catalog.open(path, model_key)``.

    Every method turns a SQLite failure into StoreError (a full disk says so) and leaves
    no transaction open, so the next call works once the cause is gone.
    """

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    @asynccontextmanager
    async def _transaction(self, action: str) -> AsyncIterator[aiosqlite.Connection]:
        try:
            yield self._db
            await self._db.commit()
        except sqlite3.Error as exc:
            # Nothing was begun, or the connection will say so on the next call.
            with contextlib.suppress(sqlite3.Error):
                await self._db.rollback()
            raise store_error(self._path, action, exc) from exc

    @classmethod
    async def open(cls, path: Path, model_key: str) -> tuple[Catalog, bool]:
        """Open (creating) the catalog. Returns it and whether its caches fit ``model_key``."""
        try:
            db = await _connect(path)
        except sqlite3.Error as exc:
            raise store_error(path, "open the catalog", exc) from exc
        catalog = cls(db, path)
        try:
            fits = await catalog._prepare(model_key)
        except BaseException:
            await catalog.close()
            raise
        return catalog, fits

    async def _prepare(self, model_key: str) -> bool:
        async with self._transaction("open the catalog") as db:
            await db.executescript(_SCHEMA)
            rows = {k: v for k, v in await db.execute_fetchall("SELECT key, value FROM meta")}
            version = int(rows.get("schema", SCHEMA_VERSION))
            if version == 1:
                # Version 1 kept no checksums: its cache files cannot be verified, so they
                # are dropped (a re-prefill each) and the transcripts kept.
                await db.execute("ALTER TABLE agents ADD COLUMN kv_checksum TEXT")
                await db.execute("UPDATE agents SET history = x'', kv_file = NULL")
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self._path} has schema {version}; this troupe reads {SCHEMA_VERSION}"
                )
            fits: bool = rows.get("model", model_key) == model_key
            await db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema', ?), ('model', ?)",
                (str(SCHEMA_VERSION), model_key),
            )
            if not fits:
                # Caches of another model are useless here; transcripts still hold.
                await db.execute(
                    "UPDATE agents SET history = x'', kv_file = NULL, kv_checksum = NULL"
                )
        return fits

    async def load_agents(self) -> list[AgentRecord]:
        async with self._transaction("read the catalog") as db:
            agents = await db.execute_fetchall(
                "SELECT id, system, turns, history, kv_file, kv_checksum FROM agents "
                "ORDER BY created, id"
            )
            messages: dict[str, list[tuple[str, str]]] = {}
            for agent_id, role, content in await db.execute_fetchall(
                "SELECT agent_id, role, content FROM messages ORDER BY agent_id, seq"
            ):
                messages.setdefault(agent_id, []).append((role, content))
        return [
            AgentRecord(a, s, t, tuple(messages.get(a, ())), tuple(unpack_tokens(h)), f, c)
            for a, s, t, h, f, c in agents
        ]

    async def add_agent(self, agent_id: str, system: str) -> None:
        """AgentExistsError if the store has an agent of this id."""
        try:
            async with self._transaction(f"add agent {agent_id!r} to") as db:
                await db.execute(
                    "INSERT INTO agents (id, system, created) VALUES (?, ?, ?)",
                    (agent_id, system, time.time()),
                )
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise AgentExistsError(f"agent {agent_id!r} exists in the store") from None
            raise

    async def commit_turn(
        self,
        agent_id: str,
        first_seq: int,
        new_messages: list[tuple[str, str]],
        turns: int,
        history: tuple[int, ...] | None,
        kv_file: str | None,
        kv_checksum: str | None,
    ) -> None:
        """Append messages and set the agent's history and cache file, in one transaction.

        ``history`` None leaves the cache on record as it is.
        """
        async with self._transaction(f"commit a turn of {agent_id!r} to") as db:
            await db.executemany(
                "INSERT INTO messages (agent_id, seq, role, content) VALUES (?, ?, ?, ?)",
                [(agent_id, first_seq + i, r, c) for i, (r, c) in enumerate(new_messages)],
            )
            if history is None:
                await db.execute("UPDATE agents SET turns = ? WHERE id = ?", (turns, agent_id))
            else:
                await db.execute(
                    "UPDATE agents SET turns = ?, history = ?, kv_file = ?, kv_checksum = ? "
                    "WHERE id = ?",
                    (turns, pack_tokens(history), kv_file, kv_checksum, agent_id),
                )

    async def drop_cache(self, agent_id: str) -> None:
        async with self._transaction(f"drop the cache of {agent_id!r} from") as db:
            await db.execute(
                "UPDATE agents SET history = x'', kv_file = NULL, kv_checksum = NULL "
                "WHERE id = ?", (agent_id,)
            )

    async def kv_files(self) -> set[str]:
        async with self._transaction("read the catalog") as db:
            rows = await db.execute_fetchall(
                "SELECT kv_file FROM agents WHERE kv_file IS NOT NULL"
            )
        return {r[0] for r in rows}

    async def close(self) -> None:
        # aiosqlite stops its worker thread on close but does not join it; we promise
        # that a closed runtime has no threads left, so join it here (it is ending).
        worker = getattr(self._db, "_thread", None)
        try:
            await self._db.close()
        except sqlite3.Error as exc:
            # Committed data is safe in the WAL; the worker stops all the same.
            logger.warning("closing the catalog %s: %s", self._path, exc)
        finally:
            if isinstance(worker, threading.Thread):
                worker.join()
