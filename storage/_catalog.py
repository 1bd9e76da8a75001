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
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite
import attrs

from .._errors import AgentDamagedError, AgentExistsError, StoreError
from ._blocks import BLOCK_FORMAT, DEFAULT_BLOCK_SIZE, KVFile
from ._faults import failed_since_sync, store_error
from ._kvdir import KVFiles, block_file_name, check_tail_name

SCHEMA_VERSION = 4

logger = logging.getLogger("troupe")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    system TEXT NOT NULL,
    created REAL NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    chain BLOB NOT NULL DEFAULT x'',
    tail BLOB NOT NULL DEFAULT x'',
    tail_file TEXT,
    tail_nbytes INTEGER,
    tail_checksum TEXT,
    message_count INTEGER NOT NULL DEFAULT 0,
    checksum INTEGER
);
CREATE TABLE messages (
    agent_id TEXT NOT NULL REFERENCES agents(id),
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    checksum INTEGER,
    PRIMARY KEY (agent_id, seq)
);
CREATE TABLE blocks (
    id BLOB PRIMARY KEY,
    nbytes INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    serial INTEGER NOT NULL DEFAULT 0
);
"""

ID_BYTES = 16
ROLES = frozenset({"system", "user", "assistant", "tool"})


def pack_chain(chain: list[bytes]) -> bytes:
    return b"".join(chain)


def unpack_chain(blob: bytes) -> list[bytes]:
    # A damaged blob's last partial id matches no block: its tokens are prefilled again.
    return [blob[i : i + ID_BYTES] for i in range(0, len(blob) - ID_BYTES + 1, ID_BYTES)]


def _text(value: str) -> bytes:
    # Text read back from a damaged catalog may not be UTF-8 (see _connect): it still hashes.
    return value.encode("utf-8", "surrogateescape")


def message_checksum(agent_id: str, seq: int, role: str, content: str) -> int:
    """The CRC-32 each stored message carries, over where it belongs and what it says."""
    return zlib.crc32(b"\0".join([_text(agent_id), str(seq).encode(), _text(role),
                                   _text(content)]))


def agent_checksum(agent_id: str, system: str) -> int:
    """The CRC-32 of an agent's id and system prompt, stored in its row."""
    return zlib.crc32(b"\0".join([_text(agent_id), _text(system)]))


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
    values.frombytes(blob[: len(blob) - len(blob) % values.itemsize])
    return tuple(values)


def agent_problems(
    agent_id: str, system: str, checksum: int | None, count: int,
    messages: Sequence[tuple[int, str, str, int | None]],
) -> tuple[list[str], int]:
    """What is wrong with an agent's stored rows (``messages``: seq, role, content,
    checksum, by seq), and how many of its messages, from the first, are sound."""
    problems: list[str] = []
    if checksum != agent_checksum(agent_id, system):
        problems.append("its system prompt does not match its checksum")
    sound = None
    for i, (seq, role, content, crc) in enumerate(messages):
        if seq != i:
            problems.append(f"message {i} is missing" if seq > i else f"message {seq} repeats")
        elif role not in ROLES:
            problems.append(f"message {i} has no valid role ({role!r})")
        elif crc != message_checksum(agent_id, seq, role, content):
            problems.append(f"message {i} does not match its checksum")
        else:
            continue
        sound = i
        break
    if sound is None:
        sound = len(messages)
        if count != len(messages):
            problems.append(f"it should have {count} messages, the catalog holds "
                            f"{len(messages)}")
            sound = min(sound, count)
    return problems, sound


async def _insert_messages(
    db: aiosqlite.Connection, agent_id: str, first_seq: int, messages: list[tuple[str, str]]
) -> None:
    await db.executemany(
        "INSERT INTO messages (agent_id, seq, role, content, checksum) VALUES (?, ?, ?, ?, ?)",
        [(agent_id, seq, r, c, message_checksum(agent_id, seq, r, c))
         for seq, (r, c) in enumerate(messages, start=first_seq)],
    )


async def _upgrade(db: aiosqlite.Connection, version: int) -> None:
    """Bring a catalog of schema ``version - 1`` to ``version``, in the open transaction."""
    if version == 3:
        # Whole-cache files of schemas 1 and 2 are dropped (a re-prefill each; the files
        # are collected as garbage); transcripts are kept.
        for column in ("chain BLOB NOT NULL DEFAULT x''", "tail BLOB NOT NULL DEFAULT x''",
                       "tail_file TEXT", "tail_nbytes INTEGER", "tail_checksum TEXT"):
            await db.execute(f"ALTER TABLE agents ADD COLUMN {column}")
        await db.execute("CREATE TABLE IF NOT EXISTS blocks (id BLOB PRIMARY KEY, "
                         "nbytes INTEGER NOT NULL, checksum TEXT NOT NULL)")
    elif version == 4:
        # Checksums and counts: the rows as they stand are taken as sound from here on.
        await db.execute("ALTER TABLE agents ADD COLUMN message_count INTEGER NOT NULL "
                         "DEFAULT 0")
        await db.execute("ALTER TABLE agents ADD COLUMN checksum INTEGER")
        await db.execute("ALTER TABLE messages ADD COLUMN checksum INTEGER")
        await db.execute("ALTER TABLE blocks ADD COLUMN serial INTEGER NOT NULL DEFAULT 0")
        for agent_id, system in await db.execute_fetchall("SELECT id, system FROM agents"):
            await db.execute(
                "UPDATE agents SET checksum = ?, message_count = "
                "(SELECT count(*) FROM messages WHERE agent_id = ?) WHERE id = ?",
                (agent_checksum(agent_id, system), agent_id, agent_id))
        rows = await db.execute_fetchall("SELECT agent_id, seq, role, content FROM messages")
        await db.executemany(
            "UPDATE messages SET checksum = ? WHERE agent_id = ? AND seq = ?",
            [(message_checksum(a, seq, r, c), a, seq) for a, seq, r, c in rows])


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


async def _connect(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path)
    try:
        # A damaged catalog's text may not be UTF-8: read it anyway, and let the checksums
        # (which hash it the same way) say it is damaged.
        db.text_factory = _decode
        await db.execute("PRAGMA synchronous=FULL")
    except BaseException:
        await db.close()
        raise
    return db


@attrs.frozen
class Opened:
    """What opening a catalog established: whether its caches fit the model, the block
    size its chains were cut with, and this opening's generation (file names carry it)."""

    fits: bool
    block_size: int
    generation: int


class Catalog:
    """The catalog of one store. Open with ``await Catalog.open(...)``.

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
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await self._db.rollback()
            raise
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
    async def open(
        cls, path: Path, model_key: str, block_size: int | None, files: KVFiles,
    ) -> tuple[Catalog, Opened]:
        """Open (creating) the catalog, checked against the ``files`` kv/ holds: a catalog
        that cannot account for them is a StoreError, and nothing is changed then."""
        try:
            db = await _connect(path)
        except sqlite3.Error as exc:
            raise store_error(path, "open the catalog", exc) from exc
        catalog = cls(db, path)
        try:
            opened = await catalog._prepare(model_key, block_size, files)
        except BaseException:
            await catalog.close()
            raise
        return catalog, opened

    async def _prepare(self, model_key: str, block_size: int | None, files: KVFiles) -> Opened:
        try:
            tables = {r[0] for r in await self._db.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            raise store_error(self._path, "open the catalog", exc) from exc
        if "meta" not in tables and files.count:
            # Checked before anything is written: a refused opening leaves the file as it was.
            raise StoreError(
                f"the catalog {self._path} is empty or missing, but {files.directory} holds "
                f"{files.count} KV files: this is not their catalog. Put the store's "
                "catalog.sqlite back (with its -wal file), or move kv/ aside to start an "
                "empty store; nothing was changed"
            )
        try:
            await self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise store_error(self._path, "open the catalog", exc) from exc
        async with self._transaction("open the catalog") as db:
            if "meta" not in tables:
                await db.executescript(_SCHEMA)
                rows: dict[str, str] = {}
            else:
                rows = {k: v for k, v in await db.execute_fetchall("SELECT key, value FROM meta")}
            version = int(rows.get("schema", SCHEMA_VERSION))
            if version > SCHEMA_VERSION or version < 1:
                raise StoreError(
                    f"{self._path} has schema {version}; this troupe reads {SCHEMA_VERSION}"
                )
            for added in range(version + 1, SCHEMA_VERSION + 1):
                await _upgrade(db, added)
            generation = int(rows.get("generation", 0))
            if files.newest > generation:
                raise StoreError(
                    f"{files.directory} holds KV files of the store's opening {files.newest}, "
                    f"but the catalog {self._path} has recorded only {generation}: it is older "
                    "than its files (restored from a backup, or its -wal file lost). Put the "
                    "right catalog back, or run `troupe store repair` to keep this one and "
                    "set the newer files aside; nothing was changed"
                )
            stored_size = int(rows["block_size"]) if "block_size" in rows else None
            if block_size is not None and stored_size is not None and block_size != stored_size:
                raise StoreError(
                    f"the store {self._path.parent} cuts KV into blocks of {stored_size} "
                    f"tokens, not {block_size}: open it with block_size={stored_size} (or "
                    "leave block_size out to use the store's)"
                )
            size = block_size or stored_size or DEFAULT_BLOCK_SIZE
            fits: bool = rows.get("model", model_key) == model_key
            await db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("schema", str(SCHEMA_VERSION)), ("model", model_key),
                 ("kv_format", BLOCK_FORMAT), ("generation", str(generation + 1)),
                 ("block_size", str(size))],
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
        return Opened(fits, size, generation + 1)

    async def agent_ids(self) -> list[str]:
        """Every agent's id, oldest first: all that opening a store reads of its agents."""
        async with self._transaction("read the catalog") as db:
            rows = await db.execute_fetchall("SELECT id FROM agents ORDER BY created, id")
        return [r[0] for r in rows]

    async def load_agent(self, agent_id: str) -> AgentRecord | None:
        """The agent's record, checked: AgentDamagedError if its rows do not agree.

        A tail whose file name is not one troupe gives this agent is dropped (logged): a
        catalog never leads the store to a file of its choosing.
        """
        async with self._transaction("read the catalog") as db:
            rows = list(await db.execute_fetchall(
                "SELECT id, system, turns, chain, tail, tail_file, tail_nbytes, tail_checksum, "
                "message_count, checksum FROM agents WHERE id = ?", (agent_id,)
            ))
            messages: list[tuple[int, str, str, int | None]] = [
                (seq, role, content, crc) for seq, role, content, crc in
                await db.execute_fetchall(
                    "SELECT seq, role, content, checksum FROM messages WHERE agent_id = ? "
                    "ORDER BY seq", (agent_id,))
            ]
        if not rows:
            return None
        a, s, t, c, tt, tf, tn, tc, count, crc = rows[0]
        problems, _ = agent_problems(a, s, crc, count, messages)
        if problems:
            raise AgentDamagedError(agent_id, problems)
        tail = None
        if tf is not None:
            try:
                check_tail_name(agent_id, tf)
                tail = TailRecord(unpack_tokens(tt), KVFile(tf, int(tn), str(tc)))
            except (StoreError, TypeError, ValueError) as exc:
                logger.warning("agent %r: %s", agent_id, exc)
        return AgentRecord(
            a, s, t, tuple((r, m) for _, r, m, _ in messages), tuple(unpack_chain(c)), tail,
        )

    async def block_files(self, block_ids: list[bytes]) -> dict[bytes, KVFile]:
        """The files of those of ``block_ids`` that are on disk."""
        found: dict[bytes, KVFile] = {}
        async with self._transaction("read the catalog") as db:
            for i in range(0, len(block_ids), 500):
                part = block_ids[i : i + 500]
                rows = await db.execute_fetchall(
                    f"SELECT id, nbytes, checksum, serial FROM blocks WHERE id IN "
                    f"({','.join('?' * len(part))})", part,
                )
                found.update({
                    bytes(b): KVFile(block_file_name(bytes(b), serial), n, c, serial)
                    for b, n, c, serial in rows
                })
        return found

    async def block_ids(self) -> set[bytes]:
        """The ids of every block the store has a file for."""
        async with self._transaction("read the catalog") as db:
            return {bytes(b) for (b,) in await db.execute_fetchall("SELECT id FROM blocks")}

    async def file_names(self) -> set[str]:
        """Every file the catalog points at (blocks and tails)."""
        async with self._transaction("read the catalog") as db:
            blocks = await db.execute_fetchall("SELECT id, serial FROM blocks")
            tails = await db.execute_fetchall(
                "SELECT tail_file FROM agents WHERE tail_file IS NOT NULL"
            )
        return {block_file_name(bytes(b), serial) for b, serial in blocks} | {
            t for (t,) in tails}

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
        messages = messages or []
        try:
            async with self._transaction(f"add agent {agent_id!r} to") as db:
                await db.execute(
                    "INSERT INTO agents (id, system, created, turns, chain, tail, tail_file, "
                    "tail_nbytes, tail_checksum, message_count, checksum) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (agent_id, system, time.time(), turns, pack_chain(chain or []),
                     pack_tokens(tail.tokens) if tail else b"", tail.file.name if tail else None,
                     tail.file.nbytes if tail else None, tail.file.checksum if tail else None,
                     len(messages), agent_checksum(agent_id, system)),
                )
                await _insert_messages(db, agent_id, 0, messages)
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
        None: both unchanged) with the rows of its new blocks.

        AgentDamagedError if the store's count of the agent's messages is not
        ``first_seq`` (rows lost, or another writer): nothing is written then.
        """
        async with self._transaction(f"commit a turn of {agent_id!r} to") as db:
            count = first_seq + len(new_messages)
            if chain is None:
                cursor = await db.execute(
                    "UPDATE agents SET turns = ?, message_count = ? "
                    "WHERE id = ? AND message_count = ?", (turns, count, agent_id, first_seq))
            else:
                cursor = await db.execute(
                    "UPDATE agents SET turns = ?, message_count = ?, chain = ?, tail = ?, "
                    "tail_file = ?, tail_nbytes = ?, tail_checksum = ? "
                    "WHERE id = ? AND message_count = ?",
                    (turns, count, pack_chain(chain), pack_tokens(tail.tokens) if tail else b"",
                     tail.file.name if tail else None, tail.file.nbytes if tail else None,
                     tail.file.checksum if tail else None, agent_id, first_seq),
                )
            if cursor.rowcount != 1:
                raise AgentDamagedError(agent_id, [
                    f"the store does not hold the {first_seq} messages this turn follows"])
            await db.executemany(
                "INSERT OR IGNORE INTO blocks (id, nbytes, checksum, serial) VALUES (?, ?, ?, ?)",
                [(block_id, f.nbytes, f.checksum, f.serial) for block_id, f in new_blocks],
            )
            await _insert_messages(db, agent_id, first_seq, new_messages)

    async def delete_agent(
        self, agent_id: str
    ) -> tuple[str | None, list[tuple[bytes, str]]]:
        """Delete an agent's row and messages, and the rows of its blocks that no other
        agent's chain holds, in one transaction. Returns the agent's tail file and the
        freed blocks' ids and files, for the caller to remove."""
        async with self._transaction(f"delete agent {agent_id!r} from") as db:
            rows = await db.execute_fetchall(
                "SELECT tail_file, chain FROM agents WHERE id = ?", (agent_id,))
            tail: str | None = None
            freed: set[bytes] = set()
            for name, chain in rows:
                tail = str(name) if name is not None else None
                freed = set(unpack_chain(bytes(chain)))
            if tail is not None:
                try:
                    check_tail_name(agent_id, tail)  # never another agent's file
                except StoreError as exc:
                    logger.warning("%s", exc)
                    tail = None
            await db.execute("DELETE FROM messages WHERE agent_id = ?", (agent_id,))
            await db.execute("DELETE FROM agents WHERE id = ?", (agent_id,))
            if freed:
                # Blocks are shared: only those no remaining chain names go.
                async with db.execute("SELECT chain FROM agents") as cursor:
                    async for (chain,) in cursor:
                        freed.difference_update(unpack_chain(bytes(chain)))
                        if not freed:
                            break
            files: list[tuple[bytes, str]] = []
            ids = sorted(freed)
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                marks = ",".join("?" * len(part))
                found = await db.execute_fetchall(
                    f"SELECT id, serial FROM blocks WHERE id IN ({marks})", part)
                files += [(bytes(b), block_file_name(bytes(b), serial)) for b, serial in found]
                await db.execute(f"DELETE FROM blocks WHERE id IN ({marks})", part)
        return tail, files

    async def forget_block(self, block_id: bytes) -> None:
        """Delete a damaged block's row (chains keep its id; a rebuild writes it again)."""
        async with self._transaction("drop a damaged block from") as db:
            await db.execute("DELETE FROM blocks WHERE id = ?", (block_id,))

    async def forget_files(self) -> None:
        """kv/ was lost: no block or tail file the catalog names exists any more."""
        async with self._transaction("drop the lost KV files from") as db:
            await db.execute("DELETE FROM blocks")
            await db.execute("UPDATE agents SET tail = x'', tail_file = NULL "
                             "WHERE tail_file IS NOT NULL")

    async def forget_tail(self, agent_id: str, name: str) -> None:
        """Drop an agent's damaged tail, the file ``name``, from the record (unless the
        agent has another tail by now)."""
        async with self._transaction("drop a damaged tail from") as db:
            await db.execute(
                "UPDATE agents SET tail = x'', tail_file = NULL WHERE id = ? AND tail_file = ?",
                (agent_id, name),
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
