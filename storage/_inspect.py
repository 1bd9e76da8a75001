"""A store, looked at offline: ``troupe store check``, ``ls`` and ``repair``.

Plain sqlite3 (no event loop, no model): these run while no runtime holds the store,
except ``ls``, which only reads and may run beside one.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import attrs

from .._errors import StoreError
from ._blocks import DEFAULT_BLOCK_SIZE, KVFile
from ._catalog import (
    SCHEMA_VERSION,
    agent_checksum,
    agent_problems,
    unpack_chain,
    unpack_tokens,
)
from ._kvdir import KVDir, block_file_name, check_tail_name
from ._lock import StoreLock


@attrs.frozen
class Finding:
    """One line of a check: ``problem`` False for what needs no action (a note)."""

    text: str
    problem: bool = True


@attrs.frozen
class AgentSummary:
    """One agent as ``troupe store ls`` shows it."""

    agent_id: str
    turns: int
    messages: int
    kv_tokens: int
    kv_bytes: int


def _is_store(root: Path) -> None:
    if not root.is_dir() or not ((root / "catalog.sqlite").exists() or (root / "kv").exists()):
        raise StoreError(f"{root} is not a troupe store (no catalog.sqlite, no kv/)")


@contextlib.contextmanager
def _catalog(root: Path, *, write: bool) -> Iterator[sqlite3.Connection]:
    path = root / "catalog.sqlite"
    mode = "rw" if write else "ro"
    try:
        db = sqlite3.connect(f"file:{path}?mode={mode}", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the catalog {path}: {exc}") from exc
    db.text_factory = lambda data: data.decode("utf-8", "surrogateescape")
    try:
        yield db
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the catalog {path}: {exc}") from exc
    finally:
        db.close()


def _meta(db: sqlite3.Connection) -> dict[str, str]:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" not in tables:
        return {}
    return dict(db.execute("SELECT key, value FROM meta").fetchall())


def _messages(db: sqlite3.Connection, agent_id: str) -> list[tuple[int, str, str, int | None]]:
    return [(s, r, c, k) for s, r, c, k in db.execute(
        "SELECT seq, role, content, checksum FROM messages WHERE agent_id = ? ORDER BY seq",
        (agent_id,))]


def check_store(root: Path) -> list[Finding]:
    """Everything wrong with a store: the catalog's integrity, each agent's rows, each
    block's and tail's file (size and checksum), files the catalog does not know.

    StoreError if it is not a store or a runtime holds it (its files are changing)."""
    _is_store(root)
    with StoreLock(root):
        return _check(root)


def _check(root: Path) -> list[Finding]:
    kv = KVDir(root / "kv")
    entries = kv.entries()
    ours = [e for e in entries if e.parsed is not None and not e.parsed.partial]
    if not (root / "catalog.sqlite").exists() or (root / "catalog.sqlite").stat().st_size == 0:
        return _without_catalog(len(ours))
    findings: list[Finding] = []
    with _catalog(root, write=False) as db:
        integrity = [r[0] for r in db.execute("PRAGMA integrity_check")]
        if integrity != ["ok"]:
            return [Finding(f"the catalog is damaged: {line}") for line in integrity]
        meta = _meta(db)
        if not meta:
            return _without_catalog(len(ours))
        if int(meta.get("schema", 0)) != SCHEMA_VERSION:
            findings.append(Finding(
                f"the catalog has schema {meta.get('schema')}; the next opening upgrades it "
                f"to {SCHEMA_VERSION}", problem=False))
            return findings
        generation = int(meta.get("generation", 0))
        named: set[str] = set()
        for (agent_id, system, crc, count, tail_file, tail_nbytes, tail_checksum) in \
                db.execute("SELECT id, system, checksum, message_count, tail_file, "
                           "tail_nbytes, tail_checksum FROM agents ORDER BY created, id"):
            problems, _ = agent_problems(agent_id, system, crc, count,
                                         _messages(db, agent_id))
            findings += [Finding(f"agent {agent_id!r}: {p}") for p in problems]
            if tail_file is not None:
                named.add(tail_file)
                try:
                    check_tail_name(agent_id, tail_file)
                except StoreError as exc:
                    findings.append(Finding(str(exc)))
                    continue
                findings += _file_findings(kv, KVFile(tail_file, tail_nbytes, tail_checksum),
                                           f"agent {agent_id!r}'s tail")
        for block_id, nbytes, checksum, serial in db.execute(
                "SELECT id, nbytes, checksum, serial FROM blocks"):
            name = block_file_name(bytes(block_id), serial)
            named.add(name)
            findings += _file_findings(kv, KVFile(name, nbytes, checksum, serial), "block")
    for entry in entries:
        if entry.name in named:
            continue
        if entry.parsed is None:
            findings.append(Finding(f"kv/{entry.name}: not a file troupe writes (troupe leaves "
                                    "it alone; move it out of kv/)"))
        elif entry.parsed.generation > generation:
            findings.append(Finding(
                f"kv/{entry.name}: written by opening {entry.parsed.generation}, which the "
                f"catalog (at {generation}) has not recorded: the catalog is older than its "
                "files (`troupe store repair` sets such files aside)"))
        elif not entry.is_file:
            findings.append(Finding(f"kv/{entry.name}: not a regular file (the next opening "
                                    "moves it to damaged/)"))
        else:
            findings.append(Finding(f"kv/{entry.name}: not in the catalog (left by a turn that "
                                    "never committed; the next opening deletes it)",
                                    problem=False))
    return findings


def _without_catalog(files: int) -> list[Finding]:
    if files:
        return [Finding(f"the catalog is empty or missing, but kv/ holds {files} KV files: "
                        "put the store's catalog.sqlite back (with its -wal file)")]
    return [Finding("the store is empty", problem=False)]


def _file_findings(kv: KVDir, record: KVFile, what: str) -> list[Finding]:
    try:
        kv.read(record)
    except StoreError as exc:
        return [Finding(f"{what} {record.name}: {exc} (the next turn that needs it prefills "
                        "those tokens again and rewrites it)")]
    return []


def list_agents(root: Path) -> list[AgentSummary]:
    """Every agent with its turns, messages, and the KV the store holds for it."""
    _is_store(root)
    with _catalog(root, write=False) as db:
        meta = _meta(db)
        if not meta:
            return []
        block_size = int(meta.get("block_size", DEFAULT_BLOCK_SIZE))
        sizes = {bytes(b): n for b, n in db.execute("SELECT id, nbytes FROM blocks")}
        found = []
        for agent_id, turns, count, chain, tail, tail_nbytes in db.execute(
                "SELECT id, turns, message_count, chain, tail, tail_nbytes FROM agents "
                "ORDER BY created, id"):
            stored = [sizes[b] for b in unpack_chain(chain) if b in sizes]
            tail_tokens = len(unpack_tokens(tail)) if tail_nbytes is not None else 0
            found.append(AgentSummary(
                agent_id, turns, count, len(stored) * block_size + tail_tokens,
                sum(stored) + (tail_nbytes or 0)))
    return found


def repair_store(root: Path) -> list[str]:
    """Make a store consistent again; returns what was done, a line each.

    Each damaged agent keeps its transcript up to its first bad message (the rest is
    printed, not lost silently) and starts its KV afresh (its blocks stay on disk and are
    found again by their tokens); rows of bad block files go; files of openings the
    catalog never recorded are set aside in ``orphaned/``.
    """
    _is_store(root)
    with StoreLock(root):
        return _repair(root)


def _repair(root: Path) -> list[str]:
    done: list[str] = []
    kv = KVDir(root / "kv")
    with _catalog(root, write=True) as db, db:
        meta = _meta(db)
        if not meta:
            raise StoreError(f"{root}: the catalog is empty or missing; there is nothing to "
                             "repair. Put the store's catalog.sqlite back, or move kv/ aside")
        generation = int(meta.get("generation", 0))
        for agent_id, system, crc, count in db.execute(
                "SELECT id, system, checksum, message_count FROM agents").fetchall():
            messages = _messages(db, agent_id)
            problems, sound = agent_problems(agent_id, system, crc, count, messages)
            if not problems:
                continue
            for seq, role, content, _ in messages[sound:]:
                done.append(f"agent {agent_id!r}: dropped message {seq} ({role}): "
                            f"{content[:80]!r}")
            kept = messages[:sound]
            db.execute("DELETE FROM messages WHERE agent_id = ? AND seq >= ?",
                       (agent_id, kept[-1][0] + 1 if kept else -1))
            db.execute(
                "UPDATE agents SET message_count = ?, turns = ?, checksum = ?, chain = x'', "
                "tail = x'', tail_file = NULL WHERE id = ?",
                (len(kept), sum(1 for _, r, _, _ in kept if r == "assistant"),
                 agent_checksum(agent_id, system), agent_id))
            done.append(f"agent {agent_id!r}: kept {len(kept)} of its messages "
                        f"({'; '.join(problems)})")
        for block_id, nbytes, checksum, serial in db.execute(
                "SELECT id, nbytes, checksum, serial FROM blocks").fetchall():
            name = block_file_name(bytes(block_id), serial)
            if _file_findings(kv, KVFile(name, nbytes, checksum, serial), "block"):
                db.execute("DELETE FROM blocks WHERE id = ?", (block_id,))
                kv.remove(name)
                done.append(f"block {name}: damaged or missing; its row is dropped (the next "
                            "turn that needs it prefills it again)")
        for agent_id, tail_file in db.execute(
                "SELECT id, tail_file FROM agents WHERE tail_file IS NOT NULL").fetchall():
            try:
                check_tail_name(agent_id, tail_file)
            except StoreError:
                db.execute("UPDATE agents SET tail = x'', tail_file = NULL WHERE id = ?",
                           (agent_id,))
                done.append(f"agent {agent_id!r}: its tail named {tail_file!r}, not a name "
                            "troupe gives it; dropped")
    aside = root / "orphaned"
    for entry in kv.entries():
        parsed = entry.parsed
        if parsed is not None and not parsed.partial and parsed.generation > generation:
            aside.mkdir(exist_ok=True)
            (kv.path / entry.name).rename(aside / entry.name)
            done.append(f"kv/{entry.name}: written by an opening the catalog never recorded; "
                        f"moved to {aside / entry.name}")
    return done

