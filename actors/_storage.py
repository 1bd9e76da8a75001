"""The storage actor: owns every KV block, in memory and on disk, and the catalog.

Agents hold leases (a chain of block ids and a tail of their own); a turn checks out the
blocks that match its prompt (``lookup``, at once on the event loop when they are in
memory; pinned, restored from disk if they left memory, shared with any agent whose prompt
starts the same) and holds only an opaque ``TurnLease``: the storage keeps the turn's KV,
and the engine reads it and hands back what it cuts through the turn's ``TurnSink`` (the
prompt's new blocks when its prefill ends, so turns waiting for them start then; the rest
when it finishes), which its Commit records. With a store directory each
new block is written once (fsynced, checksummed) before the catalog transaction that first
names it, so a crash never leaves a row pointing at a partial file. The hot bytes are kept
under the budget by evicting unpinned KV, least recently used first: with a store it is on
disk already; without one, the next turn prefills it again.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs

from .._actor import Actor, Request
from .._errors import StoreError, TroupeError
from ..storage._asyncio_thread import AsyncioThread
from ..storage._blocks import DEFAULT_BLOCK_SIZE, ROOT, KVFile, block_ids
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
from ._engine import CachedPrefix, CutKV, Engine
from ._mlx import BlockLayout, KVBlock, ModelInfo, block_bytes, block_nbytes
from ._pool import Block, BlockPool, Lease, Tail, common_prefix

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


@attrs.define(eq=False)
class Ahead:
    """A prefetch: the KV it loads ahead of an agent's turns (pinned until installed) and,
    once loaded, the arrays; ``done`` is set when it is over, installed or not."""

    prefix: Prefix = attrs.field(repr=False)
    loaded: LoadedKV | None = attrs.field(default=None, repr=False)
    done: anyio.Event = attrs.field(factory=anyio.Event, repr=False)


@attrs.frozen
class InstallAhead(Request[None]):
    """Take the KV ``Storage.prefetch`` loaded ahead of an agent's turns into the pool
    (sent by the storage's own prefetch task)."""

    agent_id: str
    plan: Ahead = attrs.field(repr=False)


@attrs.frozen
class ColdKV:
    """What a checkout found only on disk, for the turn to load: the blocks ``known`` (a
    run of the prompt's ``ids``) and the ``tail`` after them (the agent's own, or another
    agent's block or tail it borrows from, which is in memory); ``items`` are those not in
    memory, in order."""

    agent_id: str
    ids: tuple[bytes, ...]
    known: tuple[Block, ...] = attrs.field(repr=False)
    tail: Tail | Block | None = attrs.field(repr=False)
    tail_tokens: int
    items: tuple[Block | Tail, ...] = attrs.field(repr=False)

    @classmethod
    def of(
        cls, agent_id: str, ids: tuple[bytes, ...], known: tuple[Block, ...],
        tail: Tail | Block | None, tail_tokens: int,
    ) -> ColdKV:
        # Fixed now: another turn may load some of them before this one's Install.
        items: list[Block | Tail] = [b for b in known if b.data is None]
        if isinstance(tail, Tail) and tail.data is None:
            items.append(tail)
        return cls(agent_id, ids, known, tail, tail_tokens, tuple(items))


READERS = 2
"""Worker threads that read and check one restore's files."""


@attrs.frozen
class LoadedKV:
    """The arrays ``load_cold`` made, in order, until the first file that failed; and
    every file that failed, by its index in ``ColdKV.items``."""

    blocks: list[KVBlock] = attrs.field(repr=False)
    sizes: list[int]
    failures: dict[int, StoreError]


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


@attrs.frozen(eq=False)
class Claim:
    """Blocks a turn is the one to compute: turns that need them wait for ``done``, set
    when the turn's prefill publishes them (or, failing that, at its Commit)."""

    ids: tuple[bytes, ...]
    done: anyio.Event = attrs.field(factory=anyio.Event, repr=False)


@attrs.frozen
class Prefix:
    """The KV a turn starts from, pinned until the turn's ``Commit`` hands it back."""

    tokens: int
    cached: CachedPrefix | None
    pinned: tuple[Block, ...] = attrs.field(repr=False)
    pinned_tail: Tail | Block | None = attrs.field(repr=False)
    """The partial KV after ``pinned``: the agent's tail, or another agent's block or
    tail whose first tokens the prompt shares (``BlockPool.donor``)."""
    computing: Claim | None = None
    """Blocks this turn is the one to compute."""
    wait: anyio.Event | None = attrs.field(default=None, repr=False)
    """Set instead of a prefix: another turn is computing the next block this prompt
    needs; check out again once it is set."""
    cold: ColdKV | None = attrs.field(default=None, repr=False)
    """Set while part of the prefix is only on disk: ``load_cold`` it, then ``Install``."""


NO_PREFIX = Prefix(0, None, (), None)


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


@attrs.frozen(eq=False)
class TurnLease:
    """What an agent holds for a turn, opaque: how many of the prompt's tokens its KV
    covers, whether part of it must be loaded first (``cold``), or, instead, the claim of
    another turn to wait for (``wait``). The storage keeps the turn's blocks until its
    Commit."""

    tokens: int
    cold: bool = False
    wait: anyio.Event | None = attrs.field(default=None, repr=False)

    @classmethod
    def of(cls, prefix: Prefix) -> TurnLease:
        return cls(prefix.tokens, prefix.cold is not None, prefix.wait)


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


@attrs.frozen(eq=False)
class TurnSink:
    """A turn's way to the storage for the engine: the KV it starts from, and the KV it
    cuts, handed over on the event loop as the engine routes the turn's events. The agent
    holds it without reading it, so KV goes from the storage to the engine and back."""

    agent_id: str
    prefix: Prefix = attrs.field(repr=False)
    _storage: Storage = attrs.field(repr=False)

    @property
    def cached(self) -> CachedPrefix | None:
        return self.prefix.cached

    def published(self, kv: CutKV) -> None:
        self._storage.take_published(self.agent_id, self.prefix.computing, kv)

    def finished(self, kv: CutKV | None) -> None:
        self._storage.take_finished(self.agent_id, kv)


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
    """One per runtime. ``open`` it before use and ``aclose`` it after the engine stops.

    Every failure of the disk or the catalog fails the one request that met it, as
    StoreError; the next request tries again, so a fault that passes heals by itself.
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
        self.block_size = block_size or DEFAULT_BLOCK_SIZE
        """Tokens per block: the store's own once ``open`` has read it."""
        self._engine = engine
        self._info = info
        self._layout = layout
        self._model_key = (
            f"{info.name}:{info.num_layers}:{info.vocab_size}:{info.kv_bytes_per_token}"
        )
        self._hash_key = self._model_key.encode()
        self._sqlite: AsyncioThread | None = None
        self._catalog: Catalog | None = None
        self._lock: StoreLock | None = None
        self._kv: KVDir | None = None
        self._serials = itertools.count(1)
        self._generation = 0
        self.pool = BlockPool(budget)
        self.caches_saved = 0
        self.caches_loaded = 0
        self.caches_unsaved = 0
        self.restores = 0
        self.rebuilds = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.blocks_on_disk = 0
        self.prefetches = 0
        self._computing: dict[bytes, anyio.Event] = {}
        # Blocks turns published, pinned until the turn's Commit, by agent (one turn each).
        self._published: dict[str, list[Block]] = {}
        # The partial last block of a running turn's prompt, by agent, until its Commit:
        # the pool holds donors weakly.
        self._lent: dict[str, Tail] = {}
        # Block files written at a publish whose catalog rows are still to come: the first
        # commit that names the block records it (a crash leaves orphans, removed at open).
        self._staged: dict[bytes, KVFile] = {}
        # Published blocks to write, and the KV turns left, by agent, until the turn's
        # WritePublished and Commit take them (handed over by the engine on the loop).
        self._unwritten: dict[str, list[tuple[Block, list[memoryview]]]] = {}
        self._finished: dict[str, CutKV | None] = {}
        # Ids of the blocks the catalog has files for: a lookup asks the catalog only when
        # one it needs is among them and not in memory.
        self._disk_ids: set[bytes] = set()
        # Each running turn's prefix (pinned) and what its task loaded, by agent (one turn
        # each), from its checkout until its Commit: the agent holds a TurnLease only.
        self._turns: dict[str, Prefix] = {}
        self._loaded: dict[str, LoadedKV] = {}
        # The prefetch under way for an agent, if any (its turns wait for it).
        self._ahead: dict[str, Ahead] = {}
        # Agents the catalog never hears of (AddAgent.ephemeral): their KV stays in memory.
        self._ephemeral: set[str] = set()

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            self.caches_saved, self.caches_loaded, self.caches_unsaved, self.blocks_on_disk,
            self.restores, self.prefetches, self.rebuilds, self.bytes_written, self.bytes_read)

    @property
    def kv(self) -> KVDir:
        assert self._kv is not None
        return self._kv

    def _serial(self) -> int:
        """A serial no file of this store has had: this opening's generation, a count."""
        return (self._generation << GENERATION_SHIFT) | next(self._serials)

    async def open(self) -> list[str]:
        """Open the store (if any) and return the ids of the agents it holds."""
        if self.root is None:
            return []
        self._lock = await anyio.to_thread.run_sync(_prepare_store, self.root)
        kv = self._kv = KVDir(self.root / "kv")
        entries = await anyio.to_thread.run_sync(kv.entries)
        self._sqlite = AsyncioThread("troupe-sqlite")
        # Shielded: a connection abandoned half-open would keep its (non-daemon) thread.
        with anyio.CancelScope(shield=True):
            catalog, opened = await self._sqlite.run(
                Catalog.open, self.root / "catalog.sqlite", self._model_key,
                self._asked_block_size, KVFiles.of(kv.path, entries),
            )
        self._catalog = catalog
        self.block_size, self._generation = opened.block_size, opened.generation
        if not opened.fits:
            logger.warning("store %s was made with another model: its caches are dropped, "
                           "transcripts kept", self.root)
        ids = await self._sqlite.run(catalog.agent_ids)
        names = await self._sqlite.run(catalog.file_names)
        self._disk_ids = await self._sqlite.run(catalog.block_ids)
        self.blocks_on_disk = len(self._disk_ids)
        await anyio.to_thread.run_sync(_collect, kv, entries, names, self._generation)
        return ids

    async def aclose(self) -> None:
        self.pool.let_go()
        self._lent.clear()
        self._unwritten.clear()
        self._finished.clear()
        self._turns.clear()
        self._loaded.clear()
        self._ahead.clear()
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
        handlers: dict[type[Request[Any]], Callable[[Any], Awaitable[Any]]] = {
            Checkout: self._checkout, Install: self._install_loaded,
            WritePublished: self._write_published, Commit: self._commit,
            AddAgent: self._add, ForkAgent: self._fork, Activate: self._activate,
            DeleteAgent: self._delete,
            Deactivate: self._deactivate, InstallAhead: self._install_ahead,
        }
        handler = handlers.get(type(message))
        if handler is not None:
            return await handler(message)
        raise TypeError(f"storage cannot handle {message!r}")

    async def _add(self, message: AddAgent) -> None:
        if message.ephemeral:
            self._ephemeral.add(message.agent_id)
        elif self._catalog is not None:
            assert self._sqlite is not None
            await self._sqlite.run(self._catalog.add_agent, message.agent_id, message.system,
                                   list(message.messages))
        self.pool.lease(message.agent_id)

    async def _delete(self, message: DeleteAgent) -> None:
        agent_id = message.agent_id
        self.pool.release_lease(agent_id)
        self.pool.evict()
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
                self._disk_ids.discard(block_id)
                self.blocks_on_disk -= 1
                block = self.pool.blocks.get(block_id)
                if block is not None:
                    if block.data is not None:
                        block.file = None
                    else:
                        self.pool.drop(block)
            for name in names:
                await anyio.to_thread.run_sync(self.kv.remove, name)

    async def _fork(self, message: ForkAgent) -> int:
        pool = self.pool
        source = pool.lease(message.source_id)
        chain = list(source.chain)
        tail: Tail | None = None
        if source.tail is not None:
            # The arrays are immutable, so the two tails share them until either agent's
            # next turn replaces its own; counted once per lease (a conservative budget).
            old = source.tail
            tail = Tail(old.tokens, old.data, old.nbytes)
        if self._catalog is not None:
            assert self._sqlite is not None
            stored = pool.on_disk(chain)
            record: TailRecord | None = None
            if tail is not None and source.tail is not None and source.tail.file is not None \
                    and stored == chain:
                try:
                    serial = self._serial()
                    file = await anyio.to_thread.run_sync(
                        self.kv.copy, source.tail.file, tail_file_name(message.new_id, serial),
                        serial)
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
                    await anyio.to_thread.run_sync(self.kv.remove, record.file.name)
                raise
        if tail is not None and tail.data is None and tail.file is None:
            tail = None  # on disk only, and the copy failed: the fork prefills those tokens
        lease = pool.lease(message.new_id)
        pool.set_chain(lease, chain)
        pool.set_tail(lease, tail)
        pool.evict()
        return self.covered(message.new_id)

    async def _deactivate(self, message: Deactivate) -> None:
        self.pool.release_lease(message.agent_id)

    async def _activate(self, message: Activate) -> AgentRecord | None:
        """Read a stored agent and take up its lease (its KV stays where it is)."""
        if self._catalog is None:
            return None
        assert self._sqlite is not None
        record = await self._sqlite.run(self._catalog.load_agent, message.agent_id)
        if record is None:
            return None
        pool = self.pool
        chain = list(record.chain)
        missing = [b for b in chain if b not in pool.blocks]
        files = await self._sqlite.run(self._catalog.block_files, missing) if missing else {}
        for block_id in missing:
            pool.known(block_id, files.get(block_id))
        lease = pool.lease(message.agent_id)
        pool.set_chain(lease, chain)
        if record.tail is not None:
            pool.set_tail(lease, Tail(record.tail.tokens, None, record.tail.file.nbytes,
                                      record.tail.file))
        return record

    def prefetch_soon(self, agent_id: str) -> Ahead | None:
        """Plan loading what of ``agent_id``'s KV is only on disk, ahead of its turns
        (pinned meanwhile): the plan, for ``prefetch`` to run, or None if there is nothing
        to load. The agent's turns wait for it rather than load the same files."""
        lease = self.pool.leases.get(agent_id)
        if lease is None or self._catalog is None or self._layout is None:
            return None
        if agent_id in self._ahead:
            return None  # one is under way still (the agent was retired and came back)
        blocks = self.pool.available(lease.chain)
        tail = lease.tail if len(blocks) == len(lease.chain) else None
        cold = ColdKV.of(agent_id, tuple(lease.chain), tuple(blocks), tail,
                         len(tail.tokens) if tail else 0)
        if not cold.items:
            return None
        for block in blocks:
            block.pins += 1
        if tail is not None:
            tail.pins += 1
        plan = self._ahead[agent_id] = Ahead(Prefix(0, None, tuple(blocks), tail, cold=cold))
        return plan

    async def prefetch(self, agent_id: str, plan: Ahead) -> None:
        """Load what ``prefetch_soon`` planned, in a task of its own (so the storage actor
        goes on serving meanwhile), and hand it over with ``InstallAhead``."""
        try:
            cold = plan.prefix.cold
            assert cold is not None
            assert self._layout is not None
            plan.loaded = await load_cold(self._engine, self.kv, self._layout,
                                          self.block_size, cold)
            with anyio.CancelScope(shield=True):
                await self.call(InstallAhead(agent_id, plan))
        except TroupeError as exc:  # the runtime is closing, or the engine failed
            logger.info("agent %r: its KV was not loaded ahead: %s", agent_id, exc)
        finally:
            if self._ahead.get(agent_id) is plan:  # not installed: let its blocks go
                del self._ahead[agent_id]
                self._unpin(plan.prefix)
            plan.done.set()

    def _unpin(self, prefix: Prefix) -> None:
        for block in prefix.pinned:
            block.pins -= 1
        if prefix.pinned_tail is not None:
            prefix.pinned_tail.pins -= 1

    async def _install_ahead(self, message: InstallAhead) -> None:
        plan = message.plan
        if self._ahead.get(message.agent_id) is not plan or plan.loaded is None:
            return
        del self._ahead[message.agent_id]
        self._unpin(await self._install(message.agent_id, plan.prefix, plan.loaded,
                                        turn=False))
        self.prefetches += 1
        self.pool.evict()

    async def load(self, agent_id: str) -> None:
        """Load what the agent's turn found only on disk, in the turn's own task (restores
        of many agents overlap); its ``Install`` takes it into the pool."""
        assert self._layout is not None
        cold = self._turns[agent_id].cold
        assert cold is not None
        self._loaded[agent_id] = await load_cold(self._engine, self.kv, self._layout,
                                                 self.block_size, cold)

    async def _install_loaded(self, message: Install) -> TurnLease:
        prefix = self._turns[message.agent_id]
        loaded = self._loaded.pop(message.agent_id, LoadedKV([], [], {}))
        prefix = self._turns[message.agent_id] = await self._install(
            message.agent_id, prefix, loaded)
        return TurnLease.of(prefix)

    def covered(self, agent_id: str) -> int:
        lease = self.pool.leases.get(agent_id)
        if lease is None:
            return 0
        tail = len(lease.tail.tokens) if lease.tail is not None else 0
        return len(lease.chain) * self.block_size + tail

    # -- checkout

    def lookup(self, agent_id: str, prompt: tuple[int, ...]) -> TurnLease | None:
        """The checkout of a turn, done at once on the event loop (no message): its lease
        (the prefix pinned), or a claim to wait for; None if some block it needs is on disk
        and only the catalog knows its file (then send ``Checkout``)."""
        ahead = self._ahead.get(agent_id)
        if ahead is not None:
            return TurnLease(0, wait=ahead.done)
        if self._layout is None:
            return self._lease(agent_id, NO_PREFIX)  # a cache troupe cannot cut into blocks
        ids = self._prompt_ids(prompt)
        if self._catalog is not None and any(
                b in self._disk_ids and b not in self.pool.blocks for b in ids):
            return None
        return self._lease(agent_id, self._pick(agent_id, prompt, ids))

    def _lease(self, agent_id: str, prefix: Prefix) -> TurnLease:
        if prefix.wait is None:
            self._turns[agent_id] = prefix  # until the turn's Commit
        return TurnLease.of(prefix)

    async def _checkout(self, message: Checkout) -> TurnLease:
        if self._layout is None:
            return self._lease(message.agent_id, NO_PREFIX)
        ids = self._prompt_ids(message.prompt)
        unknown = [b for b in ids if b not in self.pool.blocks]
        if unknown and self._catalog is not None:
            # Blocks on disk that no active agent holds (an idle agent's, a closed run's).
            assert self._sqlite is not None
            files = await self._sqlite.run(self._catalog.block_files, unknown)
            for block_id, file in files.items():
                self.pool.known(block_id, file)
        return self._lease(message.agent_id, self._pick(message.agent_id, message.prompt, ids))

    def _prompt_ids(self, prompt: tuple[int, ...]) -> list[bytes]:
        limit = len(prompt) - 1  # at least one token must be new
        return block_ids(self._hash_key, prompt, self.block_size,
                         count=limit // self.block_size)

    def _pick(self, agent_id: str, prompt: tuple[int, ...], ids: list[bytes]) -> Prefix:
        """Pin the longest known run of ``ids`` (no await: one step of the event loop)."""
        known = self.pool.available(ids)
        if len(known) < len(ids) and ids[len(known)] in self._computing:
            return Prefix(0, None, (), None, wait=self._computing[ids[len(known)]])
        computing: Claim | None = None
        claimed = tuple(b for b in ids[len(known) :] if b not in self._computing)
        if claimed:
            computing = Claim(claimed)
            for block_id in claimed:
                self._computing[block_id] = computing.done
        try:
            return self._pin_prefix(agent_id, prompt, ids, known, computing)
        except BaseException:
            self._computed(computing)  # no turn will follow: nobody must wait for it
            raise

    def _computed(self, claim: Claim | None) -> None:
        if claim is None or claim.done.is_set():
            return  # published already: the ids may be another turn's claim by now
        for block_id in claim.ids:
            if self._computing.get(block_id) is claim.done:
                del self._computing[block_id]
        claim.done.set()

    def _pin_prefix(
        self, agent_id: str, prompt: tuple[int, ...], ids: list[bytes], known: list[Block],
        computing: Claim | None,
    ) -> Prefix:
        size = self.block_size
        limit = len(prompt) - 1
        lease = self.pool.lease(agent_id)
        tail = lease.tail
        start = len(known) * size
        tail_tokens = 0
        if tail is not None and lease.chain == [b.block_id for b in known]:
            # The tail follows the chain it was cut with, and only that one.
            tail_tokens = common_prefix(tail.tokens, prompt[start:limit])
        # The blocks matched become donors too (after a reopen the index starts empty).
        self._offer(ids, prompt, 0, known)
        partial: Tail | Block | None = tail if tail_tokens else None
        if partial is None:
            # No tail of its own goes on: take the first tokens of a block or tail that
            # follows the same blocks, if one starts as this prompt goes on (another
            # agent's, whose prompt shared more than these blocks: a world prompt's end).
            partial, tail_tokens = self.pool.donor(
                known[-1].block_id if known else ROOT, prompt[start:limit])
        # Pinned until the turn's Commit: eviction must not take them meanwhile.
        for block in known:
            block.pins += 1
        if partial is not None:
            partial.pins += 1
        cold = ColdKV.of(agent_id, tuple(ids), tuple(known), partial, tail_tokens)
        if cold.items:
            # Loaded by the turn's own task (load_cold), so that restores of many agents
            # overlap instead of queueing here; handed back with Install.
            return Prefix(0, None, tuple(known), partial, computing, cold=cold)
        return self._finish(cold, list(known), partial, computing)

    def _finish(
        self, cold: ColdKV, matched: list[Block], tail: Tail | Block | None,
        computing: Claim | None, *, turn: bool = True,
    ) -> Prefix:
        size = self.block_size
        # A prefetch's agent may have been retired meanwhile: no lease is made for it.
        lease = self.pool.leases.get(cold.agent_id)
        chain = lease.chain if lease is not None else []
        tail_tokens = cold.tail_tokens if tail is not None else 0
        held = 0
        while held < min(len(chain), len(cold.ids)) and chain[held] == cold.ids[held]:
            held += 1
        if turn and held > len(matched):
            self.rebuilds += 1  # the agent's own blocks were lost: prefilled again
        self.pool.touch(matched, tail)
        if not matched and tail is None:
            return Prefix(0, None, (), None, computing)
        cached = CachedPrefix([b.data for b in matched if b.data is not None],
                              tail.data if tail else None, tail_tokens)
        return Prefix(len(matched) * size + tail_tokens, cached, tuple(matched), tail,
                      computing)

    async def _install(
        self, agent_id: str, prefix: Prefix, loaded: LoadedKV, *, turn: bool = True
    ) -> Prefix:
        """Take the KV a turn (or a prefetch: ``turn`` False) loaded for its checkout; a
        file that failed its check ends the prefix there (the turn prefills the rest) and
        is dropped from the store."""
        cold = prefix.cold
        assert cold is not None
        items = cold.items
        if loaded.blocks:
            self.caches_loaded += 1
        for item, data, nbytes in zip(items, loaded.blocks, loaded.sizes, strict=False):
            if isinstance(item, Block):
                self.pool.load(item, data)
            else:
                self.pool.load_tail(item, data)
            self.restores += 1
            self.bytes_read += nbytes
        matched, tail = list(cold.known), cold.tail
        if loaded.failures:
            first = min(loaded.failures)
            logger.warning("agent %r: %s; its context is prefilled from there",
                           cold.agent_id, loaded.failures[first])
            if tail is not None:
                tail.pins -= 1
                tail = None
            bad = items[first]
            if isinstance(bad, Block):
                cut = matched.index(bad)
                for block in matched[cut:]:
                    block.pins -= 1
                matched = matched[:cut]
            else:
                # Its own tail was lost: its next turn prefills those tokens again (counted
                # now: the prefetch that found it leaves that turn nothing to tell).
                self.rebuilds += 1
            # Every bad file goes, not only the first: the turn that prefills from the first
            # writes the blocks after it again, and a bad row left would cost a rebuild at
            # every later opening.
            for i in sorted(loaded.failures):
                if i > first:
                    logger.warning("agent %r: %s", cold.agent_id, loaded.failures[i])
                item = items[i]
                if isinstance(item, Block):
                    await self._forget_block(item)
                else:
                    await self._forget_tail(cold.agent_id, item)
        return self._finish(cold, matched, tail, prefix.computing, turn=turn)

    async def _forget_block(self, block: Block) -> None:
        """A block's file is bad: its row and file go; its KV, if some turn loaded it
        meanwhile, stays in memory and is written again by the next commit that holds it."""
        if self._catalog is not None and self._sqlite is not None and block.file is not None:
            name = block.file.name
            try:
                await self._sqlite.run(self._catalog.forget_block, block.block_id)
            except StoreError as exc:
                logger.warning("%s", exc)
            await anyio.to_thread.run_sync(self.kv.remove, name)
            self._disk_ids.discard(block.block_id)
            self.blocks_on_disk -= 1
        if block.data is not None:
            block.file = None
        else:
            self.pool.drop(block)

    async def _forget_tail(self, agent_id: str, tail: Tail) -> None:
        """An agent's tail file is bad: it goes from the lease (if the agent still holds
        it), the catalog and the disk."""
        lease = self.pool.leases.get(agent_id)
        if lease is not None and lease.tail is tail:
            self.pool.set_tail(lease, None)
        file = tail.file
        if self._catalog is not None and self._sqlite is not None and file is not None:
            try:
                await self._sqlite.run(self._catalog.forget_tail, agent_id, file.name)
            except StoreError as exc:
                logger.warning("%s", exc)
            await anyio.to_thread.run_sync(self.kv.remove, file.name)

    # -- publish and commit

    def sink(self, agent_id: str) -> TurnSink:
        """Where the engine takes the agent's turn's prefix from and hands its cut KV
        back."""
        return TurnSink(agent_id, self._turns.get(agent_id, NO_PREFIX), self)

    def take_published(self, agent_id: str, computing: Claim | None, kv: CutKV) -> None:
        """A turn's prefill ended: take the prompt's new full blocks now (pinned until the
        turn's Commit), so the turns waiting for them start at once. On the event loop, as
        the engine routes the turn's events: no await."""
        pool = self.pool
        _, blocks, tail = self._take_cut(kv)
        if tail is not None:
            # The prompt's partial last block, lent (held until the turn's Commit) to the
            # turns that wait for these blocks and whose prompts go on alike.
            self._lent[agent_id] = tail
        for block in blocks:
            block.pins += 1  # until the turn's Commit puts them in the agent's chain
        self._published.setdefault(agent_id, []).extend(blocks)
        self._unwritten.setdefault(agent_id, []).extend(zip(blocks, kv.views, strict=True))
        pool.touch(blocks, None)
        self._computed(computing)

    def take_finished(self, agent_id: str, kv: CutKV | None) -> None:
        """A turn left the engine: keep the KV it cut for its Commit (on the event loop)."""
        self._finished[agent_id] = kv

    async def _write_published(self, message: WritePublished) -> None:
        pool = self.pool
        unwritten = self._unwritten.pop(message.agent_id, [])
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
        pool.evict()

    def _take_cut(self, kv: CutKV) -> tuple[list[bytes], list[Block], Tail | None]:
        """Put cut KV in the pool, its blocks and tail offered as donors: the tokens'
        chain of block ids, the blocks added, and the tail (not yet anyone's)."""
        chain = block_ids(self._hash_key, kv.tokens, self.block_size)
        blocks = [self.pool.add(chain[kv.first_block + j], kv.first_block + j, data)
                  for j, data in enumerate(kv.blocks)]
        self._offer(chain, kv.tokens, kv.first_block, blocks)
        tail = None
        if kv.tail is not None:
            tail = Tail(kv.tokens[len(chain) * self.block_size :], kv.tail,
                        block_nbytes(kv.tail))
            self.pool.offer(chain[-1] if chain else ROOT, tail, tail.tokens)
        return chain, blocks, tail

    def _offer(
        self, chain: list[bytes], tokens: Sequence[int], first: int, blocks: list[Block]
    ) -> None:
        """Offer ``blocks`` (chain positions ``first`` on) as donors of partial prefixes
        (``BlockPool.offer``)."""
        size = self.block_size
        for i, block in enumerate(blocks, start=first):
            self.pool.offer(chain[i - 1] if i else ROOT, block,
                            tokens[i * size : (i + 1) * size])

    async def _commit(self, message: Commit) -> int:
        pool = self.pool
        prefix = self._turns.pop(message.agent_id, NO_PREFIX)
        self._loaded.pop(message.agent_id, None)
        self._computed(prefix.computing)  # committed below, or not at all
        for block in prefix.pinned:
            block.pins -= 1
        if prefix.pinned_tail is not None:
            prefix.pinned_tail.pins -= 1
        published = self._published.pop(message.agent_id, [])
        self._unwritten.pop(message.agent_id, None)
        self._lent.pop(message.agent_id, None)
        for block in published:
            block.pins -= 1
        lease = pool.lease(message.agent_id)
        old_tail = lease.tail.file if lease.tail is not None else None
        chain: list[bytes] | None = None
        views: dict[bytes, list[memoryview]] = {}
        kv = self._finished.pop(message.agent_id, None)
        if kv is not None:
            chain, added, tail = self._take_cut(kv)
            views = {block.block_id: view
                     for block, view in zip(added, kv.views, strict=True)}
            pool.set_tail(lease, tail)
            pool.set_chain(lease, chain)
            pool.touch([pool.blocks[b] for b in chain], tail)
        try:
            if self._catalog is not None and message.agent_id not in self._ephemeral:
                await self._persist(message, lease, chain, views, kv, published)
                if chain is not None and old_tail is not None:
                    await anyio.to_thread.run_sync(self.kv.remove, old_tail.name)
        finally:
            pool.evict()
        return self.covered(message.agent_id)

    async def _persist(
        self,
        message: Commit,
        lease: Lease,
        chain: list[bytes] | None,
        views: dict[bytes, list[memoryview]],
        kv: CutKV | None,
        published: list[Block],
    ) -> None:
        assert self._catalog is not None
        assert self._sqlite is not None
        written: list[tuple[bytes, KVFile]] = []
        stored = chain
        tail: TailRecord | None = None
        if chain is not None:
            stored, written = await self._write_chain(message.agent_id, chain, views)
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
        written += [self._record(b) for b in published if b.block_id in self._staged]
        try:
            await self._sqlite.run(
                self._catalog.commit, message.agent_id, message.first_seq, message.messages,
                message.turns, stored, tail, written,
            )
        except BaseException:
            if tail is not None:
                await anyio.to_thread.run_sync(self.kv.remove, tail.file.name)
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
        made = self.kv.made
        file = await anyio.to_thread.run_sync(self.kv.write, name, parts, serial)
        self.bytes_written += file.nbytes
        if self.kv.made != made:
            await self._files_lost(keep=name)
        return file

    async def _files_lost(self, keep: str) -> None:
        """kv/ vanished and was made again: every file it held went with it. They are
        forgotten, so that no row points at a missing file and the KV still in memory is
        written again by the next commit that holds it (the rest is prefilled again)."""
        logger.warning("%s vanished: its KV files are gone; KV still in memory is written "
                       "again, the rest is prefilled again when needed", self.kv.path)
        pool = self.pool
        for block in list(pool.blocks.values()):
            if block.file is not None and block.file.name != keep:
                if block.data is not None:
                    block.file = None
                else:
                    pool.drop(block)
        self._staged = {b: f for b, f in self._staged.items() if f.name == keep}
        for lease in pool.leases.values():
            tail = lease.tail
            if tail is not None and tail.file is not None and tail.file.name != keep:
                tail.file = None
                if tail.data is None:
                    pool.set_tail(lease, None)
        self.blocks_on_disk = 0
        self._disk_ids.clear()
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
        pool = self.pool
        missing = [pool.blocks[b] for b in chain if pool.blocks[b].file is None]
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
        return pool.on_disk(chain), written

    def _record(self, block: Block) -> tuple[bytes, KVFile]:
        """A staged file becomes the block's: the commit under way records its row."""
        file = block.file = self._staged.pop(block.block_id)
        self._disk_ids.add(block.block_id)
        self.blocks_on_disk += 1
        return block.block_id, file
