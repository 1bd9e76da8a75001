"""The SQLite catalog: agents, transcripts, each agent's chain of KV blocks, the blocks.

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
from ._blocks import BLOCK_FORMAT, KVFile, block_file_name
from ._faults import failed_since_sync, store_error

SCHEMA_VERSION = 3

logger = logging.getLogger("troupe")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    system TEXT NOT NULL,
    created REAL NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    chain BLOB NOT NULL DEFAULT x'',
    tail BLOB NOT NULL DEFAULT x'',
    tail_file TEXT,
    tail_nbytes INTEGER,
    tail_checksum TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    agent_id TEXT NOT NULL REFERENCES agents(id),
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
CREATE TABLE IF NOT EXISTS blocks (
    id BLOB PRIMARY KEY,
    nbytes INTEGER NOT NULL,
    checksum TEXT NOT NULL
);
"""

ID_BYTES = 16


def pack_chain(chain: list[bytes]) -> bytes:
    return b"".join(chain)


def unpack_chain(blob: bytes) -> list[bytes]:
    return [blob[i : i + ID_BYTES] for i in range(0, len(blob), ID_BYTES)]


@attrs.frozen
class TailRecord:
    """An agent's partial last block on disk: its tokens and its file."""

    tokens: tuple[int, ...]
    file: KVFile


@attrs.frozen
class AgentRecord:
    """An agent as the catalog has it: ``chain`` lists the ids of its KV blocks on disk,
    ``tail`` the KV of the tokens after them (None if not on disk)."""

    agent_id: str
    system: str
    turns: int
    messages: tuple[tuple[str, str], ...]
    chain: tuple[bytes, ...]
    tail: TailRecord | None


def pack_tokens(tokens: tuple[int, ...]) -> bytes:
    return array.array("I", tokens).tobytes()


def unpack_tokens(blob: bytes) -> tuple[int, ...]:
    values = array.array("I")
    values.frombytes(blob)
    return tuple(values)


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
    no transaction open, so the next call works once the cause is gone. A block row is
    written only after its file is whole on disk, in the transaction that first puts it
    in a chain, so no row ever points at a missing or partial file.
    """

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._path = path
        self._stopped: str | None = None

    @asynccontextmanager
    async def _transaction(self, action: str) -> AsyncIterator[aiosqlite.Connection]:
        if self._stopped is not None:
            raise StoreError(f"cannot {action} {self._path}: {self._stopped}; the store is "
                             f"stopped until it is reopened")
        try:
            yield self._db
            wrote = self._db.in_transaction
            await self._db.commit()
        except sqlite3.Error as exc:
            # Nothing was begun, or the connection will say so on the next call.
            with contextlib.suppress(sqlite3.Error):
                await self._db.rollback()
            raise store_error(self._path, action, exc) from exc
        if wrote and (failure := failed_since_sync(self._path)) is not None:
            # The WAL's fsync said yes, but the file system failed meanwhile and may not
            # keep what it said yes to: the caller is told no. And this connection takes no
            # more: the commit may have checkpointed the WAL into the catalog on the same
            # false word, and the next would start the WAL afresh (an overwrite that needs
            # no journal, so it can still reach the disk), dropping frames the catalog may
            # not hold.
            self._stopped = failure
            raise StoreError(f"cannot {action} {self._path}: {failure}, so it may not be "
                             f"on disk")

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
            if version in (1, 2):
                # Whole-cache files of earlier versions are dropped (a re-prefill each; the
                # files go as orphans); transcripts are kept.
                for column in ("chain BLOB NOT NULL DEFAULT x''", "tail BLOB NOT NULL DEFAULT x''",
                               "tail_file TEXT", "tail_nbytes INTEGER", "tail_checksum TEXT"):
                    await db.execute(f"ALTER TABLE agents ADD COLUMN {column}")
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self._path} has schema {version}; this troupe reads {SCHEMA_VERSION}"
                )
            fits: bool = rows.get("model", model_key) == model_key
            await db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema', ?), ('model', ?), ('kv_format', ?)",
                (str(SCHEMA_VERSION), model_key, BLOCK_FORMAT),
            )
            if not fits:
                # Blocks of another model are useless here; transcripts still hold.
                await db.execute("UPDATE agents SET chain = x'', tail = x'', tail_file = NULL")
            # Blocks no chain holds any more (agents moved on, or rebuilt differently): the
            # store collects them here, when no agent is active to race with.
            held = {
                block_id
                for (blob,) in await db.execute_fetchall("SELECT chain FROM agents")
                for block_id in unpack_chain(blob)
            }
            stored = {r[0] for r in await db.execute_fetchall("SELECT id FROM blocks")}
            await db.executemany(
                "DELETE FROM blocks WHERE id = ?", [(b,) for b in stored - held]
            )
        return fits

    async def agent_ids(self) -> list[str]:
        """Every agent's id, oldest first: all that opening a store reads of its agents."""
        async with self._transaction("read the catalog") as db:
            rows = await db.execute_fetchall("SELECT id FROM agents ORDER BY created, id")
        return [r[0] for r in rows]

    async def load_agent(self, agent_id: str) -> AgentRecord | None:
        async with self._transaction("read the catalog") as db:
            rows = list(await db.execute_fetchall(
                "SELECT id, system, turns, chain, tail, tail_file, tail_nbytes, tail_checksum "
                "FROM agents WHERE id = ?", (agent_id,)
            ))
            messages = await db.execute_fetchall(
                "SELECT role, content FROM messages WHERE agent_id = ? ORDER BY seq",
                (agent_id,),
            )
        if not rows:
            return None
        a, s, t, c, tt, tf, tn, tc = rows[0]
        return AgentRecord(
            a, s, t, tuple((r, m) for r, m in messages), tuple(unpack_chain(c)),
            TailRecord(unpack_tokens(tt), KVFile(tf, tn, tc)) if tf else None,
        )

    async def block_files(self, block_ids: list[bytes]) -> dict[bytes, KVFile]:
        """The files of those of ``block_ids`` that are on disk."""
        found: dict[bytes, KVFile] = {}
        async with self._transaction("read the catalog") as db:
            for i in range(0, len(block_ids), 500):
                part = block_ids[i : i + 500]
                rows = await db.execute_fetchall(
                    f"SELECT id, nbytes, checksum FROM blocks WHERE id IN "
                    f"({','.join('?' * len(part))})", part,
                )
                found.update(
                    {bytes(b): KVFile(block_file_name(bytes(b)), n, c) for b, n, c in rows}
                )
        return found

    async def file_names(self) -> set[str]:
        """Every file the catalog points at (blocks and tails)."""
        async with self._transaction("read the catalog") as db:
            blocks = await db.execute_fetchall("SELECT id FROM blocks")
            tails = await db.execute_fetchall(
                "SELECT tail_file FROM agents WHERE tail_file IS NOT NULL"
            )
        return {block_file_name(bytes(b)) for (b,) in blocks} | {t for (t,) in tails}

    async def add_agent(
        self,
        agent_id: str,
        system: str,
        messages: list[tuple[str, str]] | None = None,
        turns: int = 0,
        chain: list[bytes] | None = None,
        tail: TailRecord | None = None,
    ) -> None:
        """A new agent (a fork: with a transcript, chain and tail), in one transaction.

        AgentExistsError if the store has an agent of this id.
        """
        try:
            async with self._transaction(f"add agent {agent_id!r} to") as db:
                await db.execute(
                    "INSERT INTO agents (id, system, created, turns, chain, tail, tail_file, "
                    "tail_nbytes, tail_checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (agent_id, system, time.time(), turns, pack_chain(chain or []),
                     pack_tokens(tail.tokens) if tail else b"", tail.file.name if tail else None,
                     tail.file.nbytes if tail else None, tail.file.checksum if tail else None),
                )
                await db.executemany(
                    "INSERT INTO messages (agent_id, seq, role, content) VALUES (?, ?, ?, ?)",
                    [(agent_id, i, r, c) for i, (r, c) in enumerate(messages or [])],
                )
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise AgentExistsError(f"agent {agent_id!r} exists in the store") from None
            raise

    async def commit(
        self,
        agent_id: str,
        first_seq: int,
        new_messages: list[tuple[str, str]],
        turns: int,
        chain: list[bytes] | None,
        tail: TailRecord | None,
        new_blocks: list[tuple[bytes, KVFile]],
    ) -> None:
        """One transaction: append messages, and record the agent's chain and tail (chain
        None: both unchanged) with the rows of its new blocks."""
        async with self._transaction(f"commit a turn of {agent_id!r} to") as db:
            await db.executemany(
                "INSERT OR IGNORE INTO blocks (id, nbytes, checksum) VALUES (?, ?, ?)",
                [(block_id, f.nbytes, f.checksum) for block_id, f in new_blocks],
            )
            await db.executemany(
                "INSERT INTO messages (agent_id, seq, role, content) VALUES (?, ?, ?, ?)",
                [(agent_id, first_seq + i, r, c) for i, (r, c) in enumerate(new_messages)],
            )
            if chain is None:
                await db.execute("UPDATE agents SET turns = ? WHERE id = ?", (turns, agent_id))
            else:
                await db.execute(
                    "UPDATE agents SET turns = ?, chain = ?, tail = ?, tail_file = ?, "
                    "tail_nbytes = ?, tail_checksum = ? WHERE id = ?",
                    (turns, pack_chain(chain), pack_tokens(tail.tokens) if tail else b"",
                     tail.file.name if tail else None, tail.file.nbytes if tail else None,
                     tail.file.checksum if tail else None, agent_id),
                )

    async def forget_block(self, block_id: bytes) -> None:
        """Delete a damaged block's row (chains keep its id; a rebuild writes it again)."""
        async with self._transaction("drop a damaged block from") as db:
            await db.execute("DELETE FROM blocks WHERE id = ?", (block_id,))

    async def forget_tail(self, agent_id: str) -> None:
        """Drop an agent's damaged tail from the record."""
        async with self._transaction("drop a damaged tail from") as db:
            await db.execute(
                "UPDATE agents SET tail = x'', tail_file = NULL WHERE id = ?", (agent_id,)
            )

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
