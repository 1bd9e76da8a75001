"""The block pool: every KV block and tail in memory, their leases, pins and the budget.

Owned by the KV manager (actors/_kv.py) and touched only on the event loop. Blocks are
immutable and shared: an agent's lease is a chain of block ids plus a partial tail of its
own, and a block or tail also lends the KV of its first tokens to prompts that go on
alike. Turns pin the blocks they run with (``pin``/``unpin``, the only places pin counts
change); when the hot bytes pass the budget, unpinned KV is evicted (never that of an
agent with a turn queued) from the front of a queue kept in order of use: least recently
used first and, within one agent's chain, from its end backwards (a chain's later blocks
are useless without its earlier ones).
"""

from __future__ import annotations

import array
import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from ..storage._blocks import KVFile
from ._mlx import KVBlock, block_nbytes


@attrs.frozen
class PoolStatistics:
    """A snapshot of the KV in memory: the part of RuntimeStatistics the pool owns."""

    kv_budget: int
    kv_hot_bytes: int
    blocks_in_memory: int
    blocks_shared: int
    evictions: int


@attrs.define(eq=False)
class Block:
    """One full block: its KV in memory (``data``) and/or on disk (``file``); ``refs``
    counts the active leases whose chains hold it, ``pins`` the turns running with it."""

    block_id: bytes
    position: int
    data: KVBlock | None
    nbytes: int
    file: KVFile | None = None
    refs: int = 0
    pins: int = 0


@attrs.define(eq=False)
class Tail:
    """An agent's partial last block: its own, never shared."""

    tokens: tuple[int, ...]
    data: KVBlock | None
    nbytes: int
    file: KVFile | None = None
    pins: int = 0


@attrs.define(eq=False)
class Lease:
    """What one agent holds: its chain of full blocks and its own partial tail."""

    chain: list[bytes] = attrs.field(factory=list)
    tail: Tail | None = None


DONORS = 4
"""Blocks remembered per parent as donors of a partial prefix (the latest ones)."""


class BlockPool:
    """The blocks, tails and leases of one runtime, and the hot bytes they hold."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.busy: Callable[[str], bool] = lambda agent_id: False
        """Whether an agent has turns queued: its KV is not evicted (that of running turns
        is pinned)."""
        self.blocks: dict[bytes, Block] = {}
        self.leases: dict[str, Lease] = {}
        self.hot_bytes = 0
        self.evictions = 0
        # The KV in memory in order of use, least recent first: each block, and each
        # lease's tail with its agent's id. Entries that left memory are skipped (and
        # dropped) by ``evict``; pinned and busy ones are skipped and kept.
        self._by_use: OrderedDict[Block | Tail, str | None] = OrderedDict()
        self._donors: dict[bytes, list[tuple[weakref.ref[Any], array.array[int]]]] = {}
        """Per parent block id, blocks and tails that follow it, with their tokens."""

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(self.budget, self.hot_bytes, self.in_memory(), self.shared(),
                              self.evictions)

    def lease(self, agent_id: str) -> Lease:
        return self.leases.setdefault(agent_id, Lease())

    def in_memory(self) -> int:
        return sum(1 for b in self.blocks.values() if b.data is not None)

    def shared(self) -> int:
        return sum(1 for b in self.blocks.values() if b.refs > 1)

    def available(self, ids: Iterable[bytes]) -> list[Block]:
        """The blocks of the longest run of ``ids`` that memory or disk holds."""
        run: list[Block] = []
        for block_id in ids:
            block = self.blocks.get(block_id)
            if block is None or (block.data is None and block.file is None):
                break
            run.append(block)
        return run

    def on_disk(self, chain: Iterable[bytes]) -> list[bytes]:
        """The longest run of ``chain`` whose blocks are on disk (what a catalog may hold)."""
        run: list[bytes] = []
        for block_id in chain:
            block = self.blocks.get(block_id)
            if block is None or block.file is None:
                break
            run.append(block_id)
        return run

    def known(self, block_id: bytes, file: KVFile | None) -> Block | None:
        """The entry of a block, made from its catalog record if memory has none."""
        block = self.blocks.get(block_id)
        if block is None and file is not None:
            block = self.blocks[block_id] = Block(block_id, 0, None, file.nbytes, file)
        return block

    def add(self, block_id: bytes, position: int, data: KVBlock) -> Block:
        """Register a block computed by a turn; an existing one of that id wins (one copy)."""
        block = self.blocks.get(block_id)
        if block is None:
            block = Block(block_id, position, data, block_nbytes(data))
            self.blocks[block_id] = block
            self.hot_bytes += block.nbytes
            self._queue(block, None)
        else:
            self.load(block, data)
        return block

    def load(self, block: Block, data: KVBlock) -> None:
        if block.data is None:
            block.data, block.nbytes = data, block_nbytes(data)
            self.hot_bytes += block.nbytes
            self._queue(block, None)

    def _queue(self, kv: Block | Tail, agent_id: str | None) -> None:
        # KV that enters memory joins the queue unused (first to go) until it is touched.
        self._by_use[kv] = agent_id
        self._by_use.move_to_end(kv, last=False)

    def set_tail(self, agent_id: str, lease: Lease, tail: Tail | None) -> None:
        if lease.tail is not None:
            self._by_use.pop(lease.tail, None)
            if lease.tail.data is not None:
                self.hot_bytes -= lease.tail.nbytes
        lease.tail = tail
        if tail is not None and tail.data is not None:
            self.hot_bytes += tail.nbytes
            self._queue(tail, agent_id)

    def load_tail(self, agent_id: str, tail: Tail, data: KVBlock) -> None:
        if tail.data is None:
            tail.data, tail.nbytes = data, block_nbytes(data)
            self.hot_bytes += tail.nbytes
            lease = self.leases.get(agent_id)
            if lease is not None and lease.tail is tail:
                self._queue(tail, agent_id)

    def drop_tail(self, agent_id: str, lease: Lease) -> None:
        """The tail leaves memory: it stays on disk if it is there, else it is gone."""
        tail = lease.tail
        if tail is None:
            return
        if tail.file is None:
            self.set_tail(agent_id, lease, None)
        elif tail.data is not None:
            self.hot_bytes -= tail.nbytes
            tail.data = None
            self._by_use.pop(tail, None)

    def set_chain(self, lease: Lease, chain: list[bytes]) -> list[Block]:
        """Point the lease at ``chain``; returns blocks no lease refers to any more."""
        for position, block_id in enumerate(chain):
            self.blocks.setdefault(block_id, Block(block_id, position, None, 0)).refs += 1
        released: list[Block] = []
        for block_id in lease.chain:
            block = self.blocks.get(block_id)
            if block is not None:
                block.refs -= 1
                if block.refs == 0:
                    released.append(block)
                    self._forget_if_cold(block)
        lease.chain = list(chain)
        return released

    def _forget_if_cold(self, block: Block) -> None:
        # Nothing here holds it and it is not in memory: the catalog knows its file, and an
        # agent that needs it again finds it there (entries of idle agents cost nothing).
        if block.refs == 0 and block.data is None and self.blocks.get(block.block_id) is block:
            del self.blocks[block.block_id]

    def release_lease(self, agent_id: str) -> None:
        """An agent deactivates: its lease leaves memory (its blocks stay, as a cache)."""
        lease = self.leases.pop(agent_id, None)
        if lease is not None:
            self.set_chain(lease, [])
            self.set_tail(agent_id, lease, None)

    def drop(self, block: Block) -> None:
        """Drop a block from every tier (damaged, or evicted with no copy on disk).

        Chains that hold it keep the id: a turn that needs it prefills it again, and the
        rebuilt block, having the same id, takes its place.
        """
        if block.data is not None:
            self.hot_bytes -= block.nbytes
            block.data = None
            self._by_use.pop(block, None)
        block.file = None
        if block.refs == 0 and self.blocks.get(block.block_id) is block:
            del self.blocks[block.block_id]

    def offer(self, parent: bytes, kv: Block | Tail, tokens: Sequence[int]) -> None:
        """Remember ``kv`` (a block or a tail that follows ``parent`` and holds ``tokens``)
        as a donor: a prompt that goes on from ``parent`` as ``tokens`` start can take the
        KV of those first tokens from it (a token's KV depends only on the tokens up to
        it). Held weakly: a donor costs no memory once its owner lets it go."""
        donors = self._donors.setdefault(parent, [])
        if all(held() is not kv for held, _ in donors):
            # The callback holds the index, not the pool: a pool in a cycle would keep its
            # blocks' KV alive after the runtime closes, until the cyclic GC ran.
            held = weakref.ref(kv, functools.partial(_let_go, self._donors, parent))
            donors.insert(0, (held, array.array("I", tokens)))
            del donors[DONORS:]
        if not donors:
            del self._donors[parent]

    def donor(self, parent: bytes, tokens: Sequence[int]) -> tuple[Block | Tail | None, int]:
        """The block or tail in memory after ``parent`` that starts with the longest run
        of ``tokens``, and how many tokens of it (0: none)."""
        donors = self._donors.get(parent)
        if not donors:
            return None, 0
        best: Block | Tail | None = None
        most = 0
        live = []
        for held, held_tokens in donors:
            kv = held()
            if kv is None or kv.data is None:
                continue  # let go, evicted or dropped
            live.append((held, held_tokens))
            shared = common_prefix(held_tokens, tokens)
            if shared > most:
                best, most = kv, shared
        if live:
            self._donors[parent] = live
        else:
            del self._donors[parent]
        return best, most

    def let_go(self) -> None:
        """Drop every block's and tail's KV from memory (the runtime closed: whatever still
        holds the pool, say a reference cycle waiting for the GC, holds no KV)."""
        for block in self.blocks.values():
            block.data = None
        for lease in self.leases.values():
            if lease.tail is not None:
                lease.tail.data = None
        self.hot_bytes = 0
        self._by_use.clear()

    def touch(self, blocks: Sequence[Block], tail: Tail | Block | None) -> None:
        """``blocks`` (a chain's run, in order) and ``tail`` were just used: they go to
        the back of the queue, the chain's first block last (its end goes first)."""
        by_use = self._by_use
        if tail is not None and tail in by_use:
            by_use.move_to_end(tail)
        for block in reversed(blocks):
            if block in by_use:
                by_use.move_to_end(block)

    def pin(self, blocks: Iterable[Block], tail: Tail | Block | None) -> None:
        """A turn runs with this KV: it is not evicted until ``unpin``."""
        for block in blocks:
            block.pins += 1
        if tail is not None:
            tail.pins += 1

    def unpin(self, blocks: Iterable[Block], tail: Tail | Block | None) -> None:
        for block in blocks:
            block.pins -= 1
        if tail is not None:
            tail.pins -= 1

    def evict(self) -> None:
        """Drop unpinned KV from memory until the hot bytes fit the budget, from the
        front of the queue (least recently used first).

        A block on disk just leaves memory; one that is not is gone, and the agents
        whose chains held it prefill those tokens again on their next turn.
        """
        if self.hot_bytes <= self.budget:
            return
        busy = {agent_id for agent_id in self.leases if self.busy(agent_id)}
        kept = {b for agent_id in busy for b in self.leases[agent_id].chain}
        victims: list[tuple[Block | Tail, str | None]] = []
        gone: list[Block | Tail] = []
        excess = self.hot_bytes - self.budget
        for kv, agent_id in self._by_use.items():
            if excess <= 0:
                break
            if kv.data is None:
                gone.append(kv)
                continue
            if kv.pins or (agent_id in busy if agent_id is not None
                           else isinstance(kv, Block) and kv.block_id in kept):
                continue
            victims.append((kv, agent_id))
            excess -= kv.nbytes
        for kv in gone:
            del self._by_use[kv]
        for kv, agent_id in victims:
            self.evictions += 1
            if agent_id is not None:
                self.drop_tail(agent_id, self.leases[agent_id])
            else:
                assert isinstance(kv, Block)
                if kv.file is not None:
                    kv.data = None
                    self.hot_bytes -= kv.nbytes
                    del self._by_use[kv]
                    self._forget_if_cold(kv)
                else:
                    self.drop(kv)


def _let_go(index: dict[bytes, list[tuple[weakref.ref[Any], array.array[int]]]], parent: bytes,
            held: weakref.ref[Any]) -> None:
    # A donor's owner let it go: its entry goes too. Runs where the last reference went,
    # the event loop's thread (blocks and tails live there, never on the engine's).
    donors = index.get(parent)
    if donors is not None:
        donors[:] = [entry for entry in donors if entry[0] is not held]
        if not donors:
            del index[parent]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
