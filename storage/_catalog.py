"""The SQLite catalog: agents, transcripts, token histories and where each cache lives.

Asyncio code (aiosqlite); the storage actor runs it on its private asyncio loop. Every
turn is one transaction, so a reader sees a turn wholly or not at all.
"""

from __future__ import annotations

import array
import sqlite3
import threading
import time
from pathlib import Path

import aiosqlite
import attrs

from .._errors import StoreError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    system TEXT NOT NULL,
    created REAL NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    history BLOB NOT NULL DEFAULT x'',
    kv_file TEXT
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


class Catalog:
    """The catalog of one store. Open with ``await Catalog.open(path, model_key)``."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path, model_key: str) -> tuple[Catalog, bool]:
        """Open (creating) the catalog. Returns it and whether its caches fit ``model_key``."""
        try:
            db = await aiosqlite.connect(path)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(_SCHEMA)
            rows = {k: v for k, v in await db.execute_fetchall("SELECT key, value FROM meta")}
            version = int(rows.get("schema", SCHEMA_VERSION))
            if version != SCHEMA_VERSION:
                await db.close()
                raise StoreError(f"{path} has schema {version}; this troupe reads {SCHEMA_VERSION}")
            fits = rows.get("model", model_key) == model_key
            await db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema', ?), ('model', ?)",
                (str(SCHEMA_VERSION), model_key),
            )
            if not fits:
                # Caches of another model are useless here; transcripts still hold.
                await db.execute("UPDATE agents SET history = x'', kv_file = NULL")
            await db.commit()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the catalog {path}: {exc}") from exc
        return cls(db), fits

    async def load_agents(self) -> list[AgentRecord]:
        agents = await self._db.execute_fetchall(
            "SELECT id, system, turns, history, kv_file FROM agents ORDER BY created, id"
        )
        messages: dict[str, list[tuple[str, str]]] = {}
        for agent_id, role, content in await self._db.execute_fetchall(
            "SELECT agent_id, role, content FROM messages ORDER BY agent_id, seq"
        ):
            messages.setdefault(agent_id, []).append((role, content))
        return [
            AgentRecord(a, s, t, tuple(messages.get(a, ())), tuple(unpack_tokens(h)), f)
            for a, s, t, h, f in agents
        ]

    async def add_agent(self, agent_id: str, system: str) -> None:
        try:
            await self._db.execute(
                "INSERT INTO agents (id, system, created) VALUES (?, ?, ?)",
                (agent_id, system, time.time()),
            )
            await self._db.commit()
        except sqlite3.IntegrityError as exc:
            await self._db.rollback()
            raise StoreError(f"agent {agent_id!r} is already in the store") from exc

    async def commit_turn(
        self,
        agent_id: str,
        first_seq: int,
        new_messages: list[tuple[str, str]],
        turns: int,
        history: tuple[int, ...] | None,
        kv_file: str | None,
    ) -> None:
        """Append messages and set the agent's history and cache file, in one transaction.

        ``history`` None leaves the cache on record as it is.
        """
        db = self._db
        try:
            await db.executemany(
                "INSERT INTO messages (agent_id, seq, role, content) VALUES (?, ?, ?, ?)",
                [(agent_id, first_seq + i, r, c) for i, (r, c) in enumerate(new_messages)],
            )
            if history is None:
                await db.execute("UPDATE agents SET turns = ? WHERE id = ?", (turns, agent_id))
            else:
                await db.execute(
                    "UPDATE agents SET turns = ?, history = ?, kv_file = ? WHERE id = ?",
                    (turns, pack_tokens(history), kv_file, agent_id),
                )
            await db.commit()
        except sqlite3.Error as exc:
            await db.rollback()
            raise StoreError(f"cannot commit a turn of {agent_id!r}: {exc}") from exc

    async def drop_cache(self, agent_id: str) -> None:
        await self._db.execute(
            "UPDATE agents SET history = x'', kv_file = NULL WHERE id = ?", (agent_id,)
        )
        await self._db.commit()

    async def kv_files(self) -> set[str]:
        rows = await self._db.execute_fetchall(
            "SELECT kv_file FROM agents WHERE kv_file IS NOT NULL"
        )
        return {r[0] for r in rows}

    async def close(self) -> None:
        # aiosqlite stops its worker thread on close but does not join it; we promise
        # that a closed runtime has no threads left, so join it here (it is ending).
        worker = getattr(self._db, "_thread", None)
        await self._db.close()
        if isinstance(worker, threading.Thread):
            worker.join()
