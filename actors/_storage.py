"""The storage actor: the disk tier of the KV (the kv/ folder) and the catalog.

The KV in memory is the KV manager's (actors/_kv.py), which this actor holds as ``kv``:
a hot turn's checkout is a call to it, with no message. This actor does what needs the
disk: a checkout whose blocks only the catalog knows (``Checkout``), installing a restore
(``Install``; the turn's own task read the files, so restores of many agents overlap),
writing a turn's published blocks while it decodes (``WritePublished``) and recording a
turn (``Commit``). Each new block is written once (fsynced, checksummed) before the
catalog transaction that first names it, so a crash never leaves a row pointing at a
partial file; a file that fails its check is dropped from the store and its tokens are
prefilled again.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs

from .._actor import Actor, Request
from .._errors import StoreError, TroupeError
from ..storage._asyncio_thread import AsyncioThread
from ..storage._blocks import DEFAULT_BLOCK_SIZE, KVFile
from ..storage._catalog import AgentRecord, Catalog, TailRecord
from ..storage._faults import store_error
from ..storage._kvdir import (
    GENERATION_SHIFT,
    Entry,
    KVDir,
    KVFiles,
    block_file_name,
    garbage,
    tail_file_name,
)
from ..storage._lock import StoreLock
from ._engine import Engine
from ._kv import Ahead, ColdKV, Installed, KVManager, LoadedKV, TurnEnd, TurnLease
from ._mlx import BlockLayout, ModelInfo, block_bytes
from ._pool import Block, Tail

logger = logging.getLogger("troupe")


@attrs.frozen
class AddAgent(Request[None]):
    """A new agent; ``ephemeral``: one that the catalog never hears of and whose KV is
    never written (a stateless HTTP request's, deleted when it ends)."""

    agent_id: str
    system: str
    messages: tuple[tuple[str, str], ...] = ()
    ephemeral: bool = False


@attrs.frozen
class DeleteAgent(Request[None]):
    """An agent goes for good: its lease, its catalog rows, its tail file, and the files
    of its blocks that no other stored chain holds (in memory, blocks stay as cache)."""

    agent_id: str


@attrs.frozen
class ForkAgent(Request[int]):
    """Add ``new_id`` holding ``source_id``'s blocks (no KV copied; its tail is its own
    from now on) with the given transcript. Returns the tokens the new lease covers."""

    source_id: str
    new_id: str
    system: str
    messages: list[tuple[str, str]]
    turns: int


@attrs.frozen
class Activate(Request["AgentRecord | None"]):
    """Read a stored agent (None if the store has none of that id) and take up its lease."""

    agent_id: str


@attrs.frozen
class Deactivate(Request[None]):
    """An idle agent leaves memory: its lease is released (its KV stays where it is)."""

    agent_id: str


@attrs.frozen
class InstallAhead(Request[None]):
    """Take the KV ``Storage.prefetch`` loaded ahead of an agent's turns into the pool
    (sent by the storage's own prefetch task)."""

    agent_id: str
    plan: Ahead = attrs.field(repr=False)


READERS = 2
"""Worker threads that read and check one restore's files."""


async def load_cold(engine: Engine, kv: KVDir, layout: BlockLayout, block_size: int,
                    cold: ColdKV) -> LoadedKV:
    """Make the blocks' arrays on the engine thread, then read and check the files
    straight into them on worker threads.

    Runs in the task of the turn that needs them (many at once), not in the storage actor.
    Once a file fails, the prefix ends there, but the files after it are still checked:
    the turn prefills from the first bad one, and must write again every one that is bad.
    """
    items = cold.items
    counts = [block_size if isinstance(i, Block) else len(i.tokens) for i in items]
    if not items:
        return LoadedKV([], [], {})
    made = await engine.run(lambda: [(b, block_bytes(b)) for b in map(layout.empty, counts)])
    failures: dict[int, StoreError] = {}

    def read_every(first: int, stride: int) -> None:
        for i in range(first, len(items), stride):
            file = items[i].file
            try:
                if file is None:  # found bad by another turn meanwhile
                    raise StoreError("its KV file was found damaged and dropped")
                kv.read_into(file, made[i][1])
            except StoreError as exc:
                failures[i] = exc

    # Copying from the page cache and checksumming both release the GIL: two threads.
    readers = min(READERS, len(items))
    async with anyio.create_task_group() as group:
        for first in range(readers):
            group.start_soon(anyio.to_thread.run_sync, read_every, first, readers)
    end = min(failures, default=len(items))
    sizes = [sum(part.nbytes for part in parts) for _, parts in made[:end]]
    return LoadedKV([block for block, _ in made[:end]], sizes, failures)


@attrs.frozen
class Checkout(Request["TurnLease"]):
    """Pin the longest run of known blocks (and the agent's tail) that ``prompt`` starts
    with, restoring from disk what left memory; or, if another turn is computing the next
    block, say so (``Prefix.wait``)."""

    agent_id: str
    prompt: tuple[int, ...]


@attrs.frozen
class Install(Request["TurnLease"]):
    """Take the KV the agent's turn loaded (``Storage.load``) into the pool; returns the
    turn's lease again (covering fewer tokens, if a file failed its check)."""

    agent_id: str


@attrs.frozen
class WritePublished(Request[None]):
    """Write the blocks a turn's prompt handed over (``TurnSink.published``) while the
    turn decodes; its Commit records them."""

    agent_id: str


@attrs.frozen
class Commit(Request[int]):
    """Record a turn: new messages, and the KV its engine turn left (``TurnSink.finished``;
    none: the lease stands).

    Unpins ``prefix``. Returns how many tokens the agent's lease covers now. The KV is
    taken even when the catalog then refuses the turn (StoreError).
    """

    agent_id: str
    first_seq: int
    messages: list[tuple[str, str]]
    turns: int


def _prepare_store(root: Path) -> StoreLock:
    """Make the store's folders and take its lock: two runtimes on one store would corrupt it."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"store {root} exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = StoreLock(root)
    except OSError as exc:
        raise store_error(root, "make the store at", exc) from exc
    try:
        KVDir(root / "kv").make()  # kv/ a link out of the store: refused
    except BaseException:
        lock.release()
        raise
    return lock


def _collect(kv: KVDir, entries: list[Entry], names: set[str], generation: int) -> None:
    """Delete what the catalog names as garbage; a failure only costs disk space."""
    for entry in garbage(entries, names, generation):
        kv.remove(entry.name)
    strangers = [e.name for e in entries if e.parsed is None]
    if strangers:
        logger.warning("%s holds %d entries troupe did not write (left alone): %s", kv.path,
                       len(strangers), ", ".join(sorted(strangers)[:5]))


@attrs.frozen
class StoreStatistics:
    """A snapshot of the store's work: the part of RuntimeStatistics it owns."""

    caches_saved: int
    caches_loaded: int
    caches_unsaved: int
    blocks_on_disk: int
    restores: int
    prefetches: int
    rebuilds: int
    store_bytes_written: int
    store_bytes_read: int


class Storage(Actor):
    """One per runtime: the disk tier of the KV (kv/, the catalog) and the transcripts.
    ``open`` it before use and ``aclose`` it after the engine stops.

    The KV in memory is its ``kv`` manager's; what the manager cannot do without the disk
    (a checkout whose blocks only the catalog knows, installing a restore whose files
    failed, recording a turn) comes here as a message. Every failure of the disk or the
    catalog fails the one request that met it, as StoreError; the next request tries
    again, so a fault that passes heals by itself.
    """

    def __init__(
        self,
        root: Path | None,
        engine: Engine,
        info: ModelInfo,
        layout: BlockLayout | None,
        mailbox: int,
        *,
        budget: int,
        block_size: int | None,
    ) -> None:
        super().__init__("storage", mailbox)
        self.root = root
        self._asked_block_size = block_size
        self._engine = engine
        self._info = info
        self._layout = layout
        self._model_key = (
            f"{info.name}:{info.num_layers}:{info.vocab_size}:{info.kv_bytes_per_token}"
        )
        self.kv = KVManager(budget, block_size or DEFAULT_BLOCK_SIZE,
                            self._model_key.encode(), layout)
        """The KV in memory: blocks, leases, pins, running turns' prefixes."""
        self._sqlite: AsyncioThread | None = None
        self._catalog: Catalog | None = None
        self._lock: StoreLock | None = None
        self._files: KVDir | None = None
        self._serials = itertools.count(1)
        self._generation = 0
        self.caches_saved = 0
        self.caches_loaded = 0
        self.caches_unsaved = 0
        self.restores = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.blocks_on_disk = 0
        self.prefetches = 0
        # Block files written at a publish whose catalog rows are still to come: the first
        # commit that names the block records it (a crash leaves orphans, removed at open).
        self._staged: dict[bytes, KVFile] = {}
        # Agents the catalog never hears of (AddAgent.ephemeral): their KV stays in memory.
        self._ephemeral: set[str] = set()

    @property
    def block_size(self) -> int:
        """Tokens per block: the store's own once ``open`` has read it."""
        return self.kv.block_size

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            self.caches_saved, self.caches_loaded, self.caches_unsaved, self.blocks_on_disk,
            self.restores, self.prefetches, self.kv.rebuilds, self.bytes_written,
            self.bytes_read)

    @property
    def files(self) -> KVDir:
        """The store's kv/ folder."""
        assert self._files is not None
        return self._files

    def _serial(self) -> int:
        """A serial no file of this store has had: this opening's generation, a count."""
        return (self._generation << GENERATION_SHIFT) | next(self._serials)

    async def open(self) -> list[str]:
        """Open the store (if any) and return the ids of the agents it holds."""
        if self.root is None:
            return []
        self._lock = await anyio.to_thread.run_sync(_prepare_store, self.root)
        files = self._files = KVDir(self.root / "kv")
        entries = await anyio.to_thread.run_sync(files.entries)
        self._sqlite = AsyncioThread("troupe-sqlite")
        # Shielded: a connection abandoned half-open would keep its (non-daemon) thread.
        with anyio.CancelScope(shield=True):
            catalog, opened = await self._sqlite.run(
                Catalog.open, self.root / "catalog.sqlite", self._model_key,
                self._asked_block_size, KVFiles.of(files.path, entries),
            )
        self._catalog = catalog
        self.kv.block_size, self._generation = opened.block_size, opened.generation
        if not opened.fits:
            logger.warning("store %s was made with another model: its caches are dropped, "
                           "transcripts kept", self.root)
        ids = await self._sqlite.run(catalog.agent_ids)
        names = await self._sqlite.run(catalog.file_names)
        self.kv.stored_ids = await self._sqlite.run(catalog.block_ids)
        self.blocks_on_disk = len(self.kv.stored_ids)
        await anyio.to_thread.run_sync(_collect, files, entries, names, self._generation)
        return ids

    async def aclose(self) -> None:
        self.kv.let_go()
        if self._sqlite is not None:
            if self._catalog is not None:
                await self._sqlite.run(self._catalog.close)
            await self._sqlite.aclose()
        if self._lock is not None:
            self._lock.release()

    async def handle(self, message: Request[Any]) -> Any:
        try:
            # Shielded: a write cut off half-way would leave a transaction open.
            with anyio.CancelScope(shield=True):
                return await self._dispatch(message)
        except (OSError, sqlite3.Error) as exc:
            # Whatever slipped past the finer handlers fails this request, not the store.
            raise store_error(self.root or Path("."), "use the store", exc) from exc

    async def _dispatch(self, message: Request[Any]) -> Any:
        match message:
            case Checkout():
                return await self._checkout(message)
            case Install():
                return await self._install_turn(message)
            case WritePublished():
                return await self._write_published(message)
            case Commit():
                return await self._commit(message)
            case AddAgent():
                return await self._add(message)
            case ForkAgent():
                return await self._fork(message)
            case Activate():
                return await self._activate(message)
            case Deactivate():
                self.kv.release(message.agent_id)
                return None
            case InstallAhead():
                return await self._install_ahead(message)
            case DeleteAgent():
                return await self._delete(message)
        raise TypeError(f"storage cannot handle {message!r}")

    async def _add(self, message: AddAgent) -> None:
        if message.ephemeral:
            self._ephemeral.add(message.agent_id)
        elif self._catalog is not None:
            assert self._sqlite is not None
            await self._sqlite.run(self._catalog.add_agent, message.agent_id, message.system,
                                   list(message.messages))
        self.kv.add(message.agent_id)

    async def _delete(self, message: DeleteAgent) -> None:
        agent_id = message.agent_id
        self.kv.release(agent_id)
        self.kv.evict()
        if agent_id in self._ephemeral:
            self._ephemeral.discard(agent_id)
            return
        if self._catalog is not None:
            assert self._sqlite is not None
            tail, freed = await self._sqlite.run(self._catalog.delete_agent, agent_id)
            names = [tail] if tail is not None else []
            for block_id, name in freed:
                # No stored chain names it: its file goes; in memory it stays as cache.
                names.append(name)
                self.blocks_on_disk -= 1
                block = self.kv.pool.blocks.get(block_id)
                if block is not None:
                    self.kv.forget_block(block)
                else:
                    self.kv.stored_ids.discard(block_id)
            for name in names:
                await anyio.to_thread.run_sync(self.files.remove, name)

    async def _fork(self, message: ForkAgent) -> int:
        chain, tail, source_tail = self.kv.fork_of(message.source_id)
        if self._catalog is not None:
            assert self._sqlite is not None
            stored = self.kv.on_disk(chain)
            record: TailRecord | None = None
            if tail is not None and source_tail is not None and source_tail.file is not None \
                    and stored == chain:
                try:
                    serial = self._serial()
                    file = await anyio.to_thread.run_sync(
                        self.files.copy, source_tail.file,
                        tail_file_name(message.new_id, serial), serial)
                except StoreError as exc:
                    logger.warning("agent %r: its tail was not copied (%s)", message.new_id, exc)
                else:
                    tail.file = file
                    record = TailRecord(tail.tokens, file)
            try:
                await self._sqlite.run(
                    self._catalog.add_agent, message.new_id, message.system, message.messages,
                    message.turns, stored, record,
                )
            except BaseException:
                if record is not None:
                    await anyio.to_thread.run_sync(self.files.remove, record.file.name)
                raise
        if tail is not None and tail.data is None and tail.file is None:
            tail = None  # on disk only, and the copy failed: the fork prefills those tokens
        return self.kv.adopt(message.new_id, chain, tail)

    async def _activate(self, message: Activate) -> AgentRecord | None:
        """Read a stored agent and take up its lease (its KV stays where it is)."""
        if self._catalog is None:
            return None
        assert self._sqlite is not None
        record = await self._sqlite.run(self._catalog.load_agent, message.agent_id)
        if record is None:
            return None
        chain = list(record.chain)
        missing = self.kv.unknown(chain)
        if missing:
            self.kv.know(await self._sqlite.run(self._catalog.block_files, missing))
        tail = None
        if record.tail is not None:
            file = record.tail.file
            tail = Tail(record.tail.tokens, None, file.nbytes, file)
        # Each id of the chain has an entry now (one with no file is prefilled again).
        self.kv.adopt(message.agent_id, chain, tail)
        return record

    async def prefetch(self, agent_id: str, plan: Ahead) -> None:
        """Load what ``KVManager.plan_prefetch`` planned, in a task of its own (so this
        actor goes on serving meanwhile), and hand it over with ``InstallAhead``."""
        try:
            cold = plan.prefix.cold
            assert cold is not None
            plan.loaded = await self._load_cold(cold)
            with anyio.CancelScope(shield=True):
                await self.call(InstallAhead(agent_id, plan))
        except TroupeError as exc:  # the runtime is closing, or the engine failed
            logger.info("agent %r: its KV was not loaded ahead: %s", agent_id, exc)
        finally:
            self.kv.end_prefetch(agent_id, plan)

    async def _install_ahead(self, message: InstallAhead) -> None:
        installed = self.kv.install_ahead(message.agent_id, message.plan)
        if installed is not None:
            await self._installed(message.agent_id, installed)
            self.prefetches += 1
            self.kv.evict()

    async def load(self, agent_id: str) -> None:
        """Load what the agent's turn found only on disk, in the turn's own task (restores
        of many agents overlap); its ``Install`` takes it into the pool."""
        self.kv.loaded(agent_id, await self._load_cold(self.kv.cold(agent_id)))

    async def _load_cold(self, cold: ColdKV) -> LoadedKV:
        assert self._layout is not None
        return await load_cold(self._engine, self.files, self._layout, self.block_size, cold)

    async def _install_turn(self, message: Install) -> TurnLease:
        installed = self.kv.install_turn(message.agent_id)
        await self._installed(message.agent_id, installed)
        return TurnLease.of(installed.prefix)

    async def _installed(self, agent_id: str, installed: Installed) -> None:
        """Count a restore, and drop from the store every file that failed its check."""
        if installed.restored:
            self.caches_loaded += 1
        self.restores += installed.restored
        self.bytes_read += installed.bytes_read
        for i, (item, error) in enumerate(installed.bad):
            if i == 0:
                logger.warning("agent %r: %s; its context is prefilled from there",
                               agent_id, error)
            else:
                logger.warning("agent %r: %s", agent_id, error)
            if isinstance(item, Block):
                await self._forget_block(item)
            else:
                await self._forget_tail(agent_id, item)

    async def _forget_block(self, block: Block) -> None:
        """A block's file is bad: its row and file go (``KVManager.forget_block``)."""
        if self._catalog is not None and self._sqlite is not None and block.file is not None:
            name = block.file.name
            try:
                await self._sqlite.run(self._catalog.forget_block, block.block_id)
            except StoreError as exc:
                logger.warning("%s", exc)
            await anyio.to_thread.run_sync(self.files.remove, name)
            self.blocks_on_disk -= 1
        self.kv.forget_block(block)

    async def _forget_tail(self, agent_id: str, tail: Tail) -> None:
        """An agent's tail file is bad: it goes from the lease (if the agent still holds
        it), the catalog and the disk."""
        self.kv.forget_tail(agent_id, tail)
        file = tail.file
        if self._catalog is not None and self._sqlite is not None and file is not None:
            try:
                await self._sqlite.run(self._catalog.forget_tail, agent_id, file.name)
            except StoreError as exc:
                logger.warning("%s", exc)
            await anyio.to_thread.run_sync(self.files.remove, file.name)

    async def _checkout(self, message: Checkout) -> TurnLease:
        kv = self.kv
        unknown = kv.unknown(kv.prompt_ids(message.prompt))
        if unknown and self._catalog is not None:
            # Blocks on disk that no active agent holds (an idle agent's, a closed run's).
            assert self._sqlite is not None
            kv.know(await self._sqlite.run(self._catalog.block_files, unknown))
        return kv.checkout(message.agent_id, message.prompt)

    # -- writes

    async def _write_published(self, message: WritePublished) -> None:
        unwritten = self.kv.unwritten(message.agent_id)
        if self._catalog is not None and message.agent_id not in self._ephemeral:
            # Written now, while the turn decodes; recorded by the first commit naming them.
            for block, view in unwritten:
                if block.file is not None or block.block_id in self._staged:
                    continue
                name = block_file_name(block.block_id, serial := self._serial())
                try:
                    file = await self._put(name, view, serial)
                except StoreError as exc:
                    logger.info("a published block is left to its commit to write: %s", exc)
                    break
                self._staged[block.block_id] = file
        self.kv.evict()

    async def _commit(self, message: Commit) -> int:
        end = self.kv.end_turn(message.agent_id)
        try:
            if self._catalog is not None and message.agent_id not in self._ephemeral:
                await self._persist(message, end)
                if end.chain is not None and end.old_tail is not None:
                    await anyio.to_thread.run_sync(self.files.remove, end.old_tail.name)
        finally:
            self.kv.evict()
        return self.kv.covered(message.agent_id)

    async def _persist(self, message: Commit, end: TurnEnd) -> None:
        assert self._catalog is not None
        assert self._sqlite is not None
        lease, chain, kv = end.lease, end.chain, end.kv
        written: list[tuple[bytes, KVFile]] = []
        stored = chain
        tail: TailRecord | None = None
        if chain is not None:
            stored, written = await self._write_chain(message.agent_id, chain, end.views)
            if (stored == chain and lease.tail is not None and kv is not None
                    and kv.tail_views is not None):
                serial = self._serial()
                file = await self._write(message.agent_id,
                                         tail_file_name(message.agent_id, serial),
                                         kv.tail_views, serial)
                if file is not None:
                    lease.tail.file = file
                    tail = TailRecord(lease.tail.tokens, file)
        # What the turn published and no chain took (it failed, or was cut short): their
        # rows go in too, so the files are the store's (collected at open if unheld).
        written += [self._record(b) for b in end.published if b.block_id in self._staged]
        try:
            await self._sqlite.run(
                self._catalog.commit, message.agent_id, message.first_seq, message.messages,
                message.turns, stored, tail, written,
            )
        except BaseException:
            if tail is not None:
                await anyio.to_thread.run_sync(self.files.remove, tail.file.name)
                if lease.tail is not None:
                    lease.tail.file = None
            raise
        if chain is not None and stored == chain and (lease.tail is None or tail is not None):
            self.caches_saved += 1

    async def _write(
        self, agent_id: str, name: str, view: list[memoryview], serial: int
    ) -> KVFile | None:
        """Write one file of KV; None if the disk refused (logged, counted)."""
        try:
            return await self._put(name, view, serial)
        except StoreError as exc:
            self.caches_unsaved += 1
            logger.warning("agent %r: KV not saved (%s); the turn is kept, and after a reopen "
                           "those tokens are prefilled again", agent_id, exc)
            return None

    async def _put(self, name: str, parts: Sequence[memoryview], serial: int) -> KVFile:
        """Write a file of KV (StoreError if the disk refuses), noticing a lost kv/."""
        made = self.files.made
        file = await anyio.to_thread.run_sync(self.files.write, name, parts, serial)
        self.bytes_written += file.nbytes
        if self.files.made != made:
            await self._files_lost(keep=name)
        return file

    async def _files_lost(self, keep: str) -> None:
        """kv/ vanished and was made again: every file it held went with it. They are
        forgotten, so that no row points at a missing file and the KV still in memory is
        written again by the next commit that holds it (the rest is prefilled again)."""
        logger.warning("%s vanished: its KV files are gone; KV still in memory is written "
                       "again, the rest is prefilled again when needed", self.files.path)
        self.kv.files_lost(keep)
        self._staged = {b: f for b, f in self._staged.items() if f.name == keep}
        self.blocks_on_disk = 0
        if self._catalog is not None and self._sqlite is not None:
            try:
                await self._sqlite.run(self._catalog.forget_files)
            except StoreError as exc:
                logger.warning("%s", exc)

    async def _write_chain(
        self, agent_id: str, chain: list[bytes], views: dict[bytes, list[memoryview]]
    ) -> tuple[list[bytes], list[tuple[bytes, KVFile]]]:
        """Write the chain's blocks that are not on disk yet; returns the part of the chain
        now on disk and the files written. A write that fails ends the stored chain there
        (those tokens are prefilled after a reopen) but not the turn."""
        missing = self.kv.missing_blocks(chain)
        need_views = [b for b in missing if b.block_id not in views and b.data is not None
                      and b.block_id not in self._staged]
        if need_views:
            made = await self._engine.run(
                lambda: [block_bytes(b.data) for b in need_views if b.data is not None]
            )
            views.update({b.block_id: v for b, v in zip(need_views, made, strict=True)})
        written: list[tuple[bytes, KVFile]] = []
        for block in missing:
            if block.block_id not in self._staged:
                view = views.get(block.block_id)
                if view is None:
                    break
                serial = self._serial()
                file = await self._write(agent_id, block_file_name(block.block_id, serial),
                                         view, serial)
                if file is None:
                    break
                self._staged[block.block_id] = file
            written.append(self._record(block))
        return self.kv.on_disk(chain), written

    def _record(self, block: Block) -> tuple[bytes, KVFile]:
        """A staged file becomes the block's: the commit under way records its row."""
        file = block.file = self._staged.pop(block.block_id)
        self.kv.stored_ids.add(block.block_id)
        self.blocks_on_disk += 1
        return block.block_id, file
