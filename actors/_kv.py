"""The KV manager: the one owner of the KV in memory, with a small synchronous interface.

It owns the block pool (blocks, tails, leases, the budget), the pins of running turns,
the claims of blocks a turn is computing, the blocks a turn published and the partial
block it lends, and each running turn's prefix. Everything here runs on the event loop
and never awaits, as vLLM's scheduler talks to its KVCacheManager: a hot turn's checkout
(``lookup``) is a call, not a message. What needs the disk (reading files, writing them,
the catalog) is the storage actor's (actors/_storage.py), which calls in here.

Agents hold an opaque ``TurnLease``; the engine reads a turn's prefix and hands back the
KV it cuts through the turn's ``TurnSink``. No KV array crosses an actor that does not
use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
import attrs

from .._errors import StoreError
from ..storage._blocks import ROOT, KVFile, block_ids
from ._engine import CachedPrefix, CutKV
from ._mlx import BlockLayout, KVBlock, block_nbytes
from ._pool import Block, BlockPool, Lease, PoolStatistics, Tail, common_prefix


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


@attrs.frozen
class LoadedKV:
    """The arrays a restore made for ``ColdKV.items``, in order, until the first file that
    failed; and every file that failed, by its index in ``ColdKV.items``."""

    blocks: list[KVBlock] = attrs.field(repr=False)
    sizes: list[int]
    failures: dict[int, StoreError]


@attrs.frozen(eq=False)
class Claim:
    """Blocks a turn is the one to compute: turns that need them wait for ``done``, set
    when the turn's prefill publishes them (or, failing that, when it ends)."""

    ids: tuple[bytes, ...]
    done: anyio.Event = attrs.field(factory=anyio.Event, repr=False)


@attrs.frozen
class Prefix:
    """The KV a turn starts from, pinned until the turn ends (``KVManager.end_turn``)."""

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
    """Set while part of the prefix is only on disk: load it, then install it."""


NO_PREFIX = Prefix(0, None, (), None)


@attrs.define(eq=False)
class Ahead:
    """A prefetch: the KV it loads ahead of an agent's turns (pinned until installed) and,
    once loaded, the arrays; ``done`` is set when it is over, installed or not."""

    prefix: Prefix = attrs.field(repr=False)
    loaded: LoadedKV | None = attrs.field(default=None, repr=False)
    done: anyio.Event = attrs.field(factory=anyio.Event, repr=False)


@attrs.frozen(eq=False)
class TurnLease:
    """What an agent holds for a turn, opaque: how many of the prompt's tokens its KV
    covers, whether part of it must be loaded first (``cold``), or, instead, the claim of
    another turn to wait for (``wait``). The KV manager keeps the turn's blocks until the
    turn ends."""

    tokens: int
    cold: bool = False
    wait: anyio.Event | None = attrs.field(default=None, repr=False)

    @classmethod
    def of(cls, prefix: Prefix) -> TurnLease:
        return cls(prefix.tokens, prefix.cold is not None, prefix.wait)


@attrs.frozen(eq=False)
class TurnSink:
    """A turn's way to the KV manager for the engine: the KV it starts from, and the KV
    it cuts, handed over on the event loop as the engine routes the turn's events. The
    agent passes it on without reading it, so KV goes from its owner to the engine and
    back."""

    agent_id: str
    prefix: Prefix = attrs.field(repr=False)
    _manager: KVManager = attrs.field(repr=False)

    @property
    def cached(self) -> CachedPrefix | None:
        return self.prefix.cached

    def published(self, kv: CutKV) -> None:
        self._manager.take_published(self.agent_id, self.prefix.computing, kv)

    def finished(self, kv: CutKV | None) -> None:
        self._manager.take_finished(self.agent_id, kv)


@attrs.frozen(eq=False)
class TurnEnd:
    """What a turn's end did to the agent's lease, for the storage to persist: the chain
    it holds now and the views of the blocks the turn cut (``chain`` None: the lease
    stands), the cut KV, the blocks the turn had published, and the tail file the agent
    held before (replaced if ``chain`` is not None)."""

    lease: Lease = attrs.field(repr=False)
    chain: list[bytes] | None
    views: dict[bytes, list[memoryview]] = attrs.field(repr=False)
    kv: CutKV | None = attrs.field(repr=False)
    published: list[Block] = attrs.field(repr=False)
    old_tail: KVFile | None


@attrs.frozen(eq=False)
class Installed:
    """What installing a restore did: the turn's prefix now, the items whose files failed
    their check (for the storage to forget), and the bytes restored."""

    prefix: Prefix = attrs.field(repr=False)
    bad: list[tuple[Block | Tail, StoreError]] = attrs.field(repr=False)
    restored: int
    bytes_read: int


class KVManager:
    """Every KV block and tail in memory, the agents' leases on them, and each running
    turn's prefix. One per runtime; used only on the event loop (no call awaits)."""

    def __init__(self, budget: int, block_size: int, hash_key: bytes,
                 layout: BlockLayout | None) -> None:
        self.pool = BlockPool(budget)
        self.block_size = block_size
        """Tokens per block (the store's own: the storage sets it when it opens)."""
        self._hash_key = hash_key
        self._layout = layout
        self.stored_ids: set[bytes] = set()
        """Ids of the blocks the catalog has files for (kept by the storage actor): a
        lookup needs the catalog only when one it needs is among them and not in memory."""
        self.rebuilds = 0
        """Turns that prefilled again an agent's own blocks that were lost."""
        self._computing: dict[bytes, anyio.Event] = {}
        # Blocks turns published, pinned until the turn ends, by agent (one turn each).
        self._published: dict[str, list[Block]] = {}
        # The partial last block of a running turn's prompt, by agent, until the turn ends:
        # the pool holds donors weakly.
        self._lent: dict[str, Tail] = {}
        # Published blocks to write, and the KV turns left, by agent, until the storage's
        # WritePublished and Commit take them (handed over by the engine on the loop).
        self._unwritten: dict[str, list[tuple[Block, list[memoryview]]]] = {}
        self._finished: dict[str, CutKV | None] = {}
        # Each running turn's prefix (pinned) and what its task loaded, by agent (one turn
        # each), from its checkout until it ends: the agent holds a TurnLease only.
        self._turns: dict[str, Prefix] = {}
        self._loaded: dict[str, LoadedKV] = {}
        # The prefetch under way for an agent, if any (its turns wait for it).
        self._ahead: dict[str, Ahead] = {}

    def statistics(self) -> PoolStatistics:
        return self.pool.statistics()

    def over_budget(self) -> bool:
        """Whether the KV in memory exceeds the budget (what eviction could not take is
        pinned by turns under way)."""
        return self.pool.hot_bytes > self.pool.budget

    def covered(self, agent_id: str) -> int:
        """How many tokens of the agent's transcript its lease covers."""
        lease = self.pool.leases.get(agent_id)
        if lease is None:
            return 0
        tail = len(lease.tail.tokens) if lease.tail is not None else 0
        return len(lease.chain) * self.block_size + tail

    def settled(self) -> bool:
        """Nothing in flight: no turn, claim, publish, prefetch or pin left."""
        pool = self.pool
        return (not (self._computing or self._published or self._lent or self._unwritten
                     or self._finished or self._turns or self._loaded or self._ahead)
                and all(b.pins == 0 for b in pool.blocks.values())
                and all(lease.tail is None or lease.tail.pins == 0
                        for lease in pool.leases.values()))

    def let_go(self) -> None:
        """The runtime closed: no KV is held any more, whoever still holds this."""
        self.pool.let_go()
        for held in (self._lent, self._unwritten, self._finished, self._turns, self._loaded,
                     self._ahead, self._published):
            held.clear()

    # -- leases

    def add(self, agent_id: str) -> None:
        self.pool.lease(agent_id)

    def release(self, agent_id: str) -> None:
        """An agent deactivates: its lease leaves memory (its blocks stay, as a cache)."""
        self.pool.release_lease(agent_id)

    def fork_of(self, source_id: str) -> tuple[list[bytes], Tail | None, Tail | None]:
        """A fork of ``source_id``'s lease: its chain, a tail of the fork's own sharing the
        source's arrays (immutable), and the source's tail."""
        source = self.pool.lease(source_id)
        tail: Tail | None = None
        if source.tail is not None:
            # The two tails share arrays until either agent's next turn replaces its own;
            # counted once per lease (a conservative budget).
            old = source.tail
            tail = Tail(old.tokens, old.data, old.nbytes)
        return list(source.chain), tail, source.tail

    def adopt(self, agent_id: str, chain: list[bytes], tail: Tail | None) -> int:
        """Give ``agent_id`` a lease on ``chain`` and ``tail``; the tokens it covers."""
        pool = self.pool
        lease = pool.lease(agent_id)
        pool.set_chain(lease, chain)
        pool.set_tail(agent_id, lease, tail)
        pool.evict()
        return self.covered(agent_id)

    def on_disk(self, chain: list[bytes]) -> list[bytes]:
        return self.pool.on_disk(chain)

    def unknown(self, ids: list[bytes]) -> list[bytes]:
        """Those of ``ids`` memory has no entry for (the catalog may know their files)."""
        return [b for b in ids if b not in self.pool.blocks]

    def know(self, files: dict[bytes, KVFile]) -> None:
        """Blocks on disk the catalog knows, entered for a checkout or an activation."""
        for block_id, file in files.items():
            self.pool.known(block_id, file)

    # -- checkout

    def lookup(self, agent_id: str, prompt: tuple[int, ...]) -> TurnLease | None:
        """The checkout of a turn, done at once: its lease (the prefix pinned), or a claim
        to wait for; None if some block it needs is on disk and only the catalog knows its
        file (the storage's ``Checkout`` asks it, then calls ``checkout``)."""
        ahead = self._ahead.get(agent_id)
        if ahead is not None:
            return TurnLease(0, wait=ahead.done)
        if self._layout is None:
            return self._lease(agent_id, NO_PREFIX)  # a cache troupe cannot cut into blocks
        ids = self.prompt_ids(prompt)
        if any(b in self.stored_ids and b not in self.pool.blocks for b in ids):
            return None
        return self._lease(agent_id, self._pick(agent_id, prompt, ids))

    def checkout(self, agent_id: str, prompt: tuple[int, ...]) -> TurnLease:
        """As ``lookup``, once the catalog's files for the prompt's blocks are known."""
        if self._layout is None:
            return self._lease(agent_id, NO_PREFIX)
        return self._lease(agent_id, self._pick(agent_id, prompt, self.prompt_ids(prompt)))

    def prompt_ids(self, prompt: tuple[int, ...]) -> list[bytes]:
        limit = len(prompt) - 1  # at least one token must be new
        return block_ids(self._hash_key, prompt, self.block_size,
                         count=limit // self.block_size)

    def _lease(self, agent_id: str, prefix: Prefix) -> TurnLease:
        if prefix.wait is None:
            self._turns[agent_id] = prefix  # until the turn ends
        return TurnLease.of(prefix)

    def _pick(self, agent_id: str, prompt: tuple[int, ...], ids: list[bytes]) -> Prefix:
        """Pin the longest known run of ``ids``."""
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
        # Pinned until the turn ends: eviction must not take them meanwhile.
        self.pool.pin(known, partial)
        cold = ColdKV.of(agent_id, tuple(ids), tuple(known), partial, tail_tokens)
        if cold.items:
            # Loaded by the turn's own task, so that restores of many agents overlap
            # instead of queueing in the storage actor; installed after.
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

    # -- restores

    def cold(self, agent_id: str) -> ColdKV:
        """What the agent's running turn must load (its lease said ``cold``)."""
        cold = self._turns[agent_id].cold
        assert cold is not None
        return cold

    def loaded(self, agent_id: str, loaded: LoadedKV) -> None:
        """The agent's turn loaded its cold KV: kept for its install."""
        self._loaded[agent_id] = loaded

    def install_turn(self, agent_id: str) -> Installed:
        """Take what the agent's turn loaded into the pool; its prefix now."""
        loaded = self._loaded.pop(agent_id, LoadedKV([], [], {}))
        installed = self._install(self._turns[agent_id], loaded, turn=True)
        self._turns[agent_id] = installed.prefix
        return installed

    def plan_prefetch(self, agent_id: str) -> Ahead | None:
        """Plan loading what of ``agent_id``'s KV is only on disk, ahead of its turns
        (pinned meanwhile): the plan, or None if there is nothing to load. The agent's
        turns wait for it rather than load the same files."""
        lease = self.pool.leases.get(agent_id)
        if lease is None or self._layout is None:
            return None
        if agent_id in self._ahead:
            return None  # one is under way still (the agent was retired and came back)
        blocks = self.pool.available(lease.chain)
        tail = lease.tail if len(blocks) == len(lease.chain) else None
        cold = ColdKV.of(agent_id, tuple(lease.chain), tuple(blocks), tail,
                         len(tail.tokens) if tail else 0)
        if not cold.items:
            return None
        self.pool.pin(blocks, tail)
        plan = self._ahead[agent_id] = Ahead(Prefix(0, None, tuple(blocks), tail, cold=cold))
        return plan

    def install_ahead(self, agent_id: str, plan: Ahead) -> Installed | None:
        """Take what a prefetch loaded into the pool (None if its plan is over)."""
        if self._ahead.get(agent_id) is not plan or plan.loaded is None:
            return None
        del self._ahead[agent_id]
        installed = self._install(plan.prefix, plan.loaded, turn=False)
        self._unpin(installed.prefix)
        return installed

    def end_prefetch(self, agent_id: str, plan: Ahead) -> None:
        """A prefetch is over: if it was not installed, its blocks go unpinned."""
        if self._ahead.get(agent_id) is plan:
            del self._ahead[agent_id]
            self._unpin(plan.prefix)
        plan.done.set()

    def _unpin(self, prefix: Prefix) -> None:
        self.pool.unpin(prefix.pinned, prefix.pinned_tail)

    def _install(self, prefix: Prefix, loaded: LoadedKV, *, turn: bool) -> Installed:
        """A file that failed its check ends the prefix there (the turn prefills the rest);
        every bad one is returned, for the storage to drop from the store."""
        cold = prefix.cold
        assert cold is not None
        items = cold.items
        pool = self.pool
        for item, data in zip(items, loaded.blocks, strict=False):
            if isinstance(item, Block):
                pool.load(item, data)
            else:
                pool.load_tail(cold.agent_id, item, data)
        matched, tail = list(cold.known), cold.tail
        bad: list[tuple[Block | Tail, StoreError]] = []
        if loaded.failures:
            first = min(loaded.failures)
            if tail is not None:
                pool.unpin((), tail)
                tail = None
            failed = items[first]
            if isinstance(failed, Block):
                cut = matched.index(failed)
                pool.unpin(matched[cut:], None)
                matched = matched[:cut]
            else:
                # Its own tail was lost: its next turn prefills those tokens again (counted
                # now: the prefetch that found it leaves that turn nothing to tell).
                self.rebuilds += 1
            # Every bad file goes, not only the first: the turn that prefills from the first
            # writes the blocks after it again, and a bad row left would cost a rebuild at
            # every later opening.
            bad = [(items[i], loaded.failures[i]) for i in sorted(loaded.failures)]
        return Installed(self._finish(cold, matched, tail, prefix.computing, turn=turn), bad,
                         len(loaded.blocks), sum(loaded.sizes))

    def forget_block(self, block: Block) -> None:
        """A block's file is gone: its KV, if some turn loaded it meanwhile, stays in memory
        and is written again by the next commit that holds it."""
        self.stored_ids.discard(block.block_id)
        if block.data is not None:
            block.file = None
        else:
            self.pool.drop(block)

    def forget_tail(self, agent_id: str, tail: Tail) -> None:
        """An agent's tail file is bad: it leaves the lease, if the agent still holds it."""
        lease = self.pool.leases.get(agent_id)
        if lease is not None and lease.tail is tail:
            self.pool.set_tail(agent_id, lease, None)

    def files_lost(self, keep: str) -> None:
        """Every file but ``keep`` is gone: forgotten, so that the KV still in memory is
        written again by the next commit that holds it (the rest is prefilled again)."""
        pool = self.pool
        for block in list(pool.blocks.values()):
            if block.file is not None and block.file.name != keep:
                if block.data is not None:
                    block.file = None
                else:
                    pool.drop(block)
        for agent_id, lease in pool.leases.items():
            tail = lease.tail
            if tail is not None and tail.file is not None and tail.file.name != keep:
                tail.file = None
                if tail.data is None:
                    pool.set_tail(agent_id, lease, None)
        self.stored_ids.clear()

    # -- publish and end

    def sink(self, agent_id: str) -> TurnSink:
        """Where the engine takes the agent's turn's prefix from and hands its cut KV
        back."""
        return TurnSink(agent_id, self._turns.get(agent_id, NO_PREFIX), self)

    def take_published(self, agent_id: str, computing: Claim | None, kv: CutKV) -> None:
        """A turn's prefill ended: take the prompt's new full blocks now (pinned until the
        turn ends), so the turns waiting for them start at once."""
        _, blocks, tail = self._take_cut(kv)
        if tail is not None:
            # The prompt's partial last block, lent (held until the turn ends) to the
            # turns that wait for these blocks and whose prompts go on alike.
            self._lent[agent_id] = tail
        self.pool.pin(blocks, None)  # until the turn's end puts them in the agent's chain
        self._published.setdefault(agent_id, []).extend(blocks)
        self._unwritten.setdefault(agent_id, []).extend(zip(blocks, kv.views, strict=True))
        self.pool.touch(blocks, None)
        self._computed(computing)

    def take_finished(self, agent_id: str, kv: CutKV | None) -> None:
        """A turn left the engine: keep the KV it cut for its end."""
        self._finished[agent_id] = kv

    def unwritten(self, agent_id: str) -> list[tuple[Block, list[memoryview]]]:
        """The blocks the agent's turn published, with their bytes, for the storage to
        write while the turn decodes (once)."""
        return self._unwritten.pop(agent_id, [])

    def end_turn(self, agent_id: str) -> TurnEnd:
        """The agent's turn is over: unpin its prefix and what it published, and point its
        lease at the KV it cut (if any)."""
        pool = self.pool
        prefix = self._turns.pop(agent_id, NO_PREFIX)
        self._loaded.pop(agent_id, None)
        self._computed(prefix.computing)  # committed now, or not at all
        self._unpin(prefix)
        published = self._published.pop(agent_id, [])
        self._unwritten.pop(agent_id, None)
        self._lent.pop(agent_id, None)
        pool.unpin(published, None)
        lease = pool.lease(agent_id)
        old_tail = lease.tail.file if lease.tail is not None else None
        chain: list[bytes] | None = None
        views: dict[bytes, list[memoryview]] = {}
        kv = self._finished.pop(agent_id, None)
        if kv is not None:
            chain, added, tail = self._take_cut(kv)
            views = {block.block_id: view for block, view in zip(added, kv.views, strict=True)}
            pool.set_tail(agent_id, lease, tail)
            pool.set_chain(lease, chain)
            pool.touch([pool.blocks[b] for b in chain], tail)
        return TurnEnd(lease, chain, views, kv, published, old_tail)

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

    def missing_blocks(self, chain: list[bytes]) -> list[Block]:
        """The chain's blocks with no file yet."""
        return [self.pool.blocks[b] for b in chain if self.pool.blocks[b].file is None]

    def evict(self) -> None:
        self.pool.evict()

    def set_busy(self, busy: Callable[[str], bool]) -> None:
        """Whether an agent has turns queued: its KV is not evicted."""
        self.pool.busy = busy
