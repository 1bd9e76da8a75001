"""KV blocks: sharing, the hot budget, the disk tier, damage and crashes (tiny model)."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import textwrap
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

import troupe
from conftest import PYTHON, TINY
from troupe.storage._blocks import KVFile
from troupe.storage._kvdir import KVDir, block_file_name

WORLD = "The village of Millbrook sits by a river; a storm is coming. " * 3
ROUNDS = ["Good morning.", "What do you see?", "And now?"]


async def _conversations(
    agents: int, *, store: Path | None = None, **options: object
) -> tuple[list[list[troupe.Reply]], list[troupe.RuntimeStatistics]]:
    """Each agent answers ROUNDS in turn, all agents at once per round; greedy."""
    replies: list[list[troupe.Reply]] = [[] for _ in range(agents)]
    after_rounds = []
    async with troupe.open_runtime(model=TINY, store=store, **options) as rt:  # type: ignore[arg-type]
        crowd = [await rt.spawn(f"a{i}", system=f"{WORLD} You are villager {i}.")
                 for i in range(agents)]

        async def speak(i: int, text: str) -> None:
            replies[i].append(await crowd[i].say(text, max_tokens=10))

        for text in ROUNDS:
            async with trio.open_nursery() as nursery:
                for i in range(agents):
                    nursery.start_soon(speak, i, text)
            after_rounds.append(rt.statistics())
    return replies, after_rounds


@pytest.mark.parametrize("with_store", [False, True])
async def test_greedy_replies_are_identical_whatever_the_budget(
    with_store: bool, tmp_path: Path
) -> None:
    unlimited, _ = await _conversations(6, block_size=16)
    store = tmp_path / "store" if with_store else None
    spilled, stats = await _conversations(6, store=store, block_size=16, kv_budget=0)
    assert [[r.tokens for r in rs] for rs in spilled] == [
        [r.tokens for r in rs] for rs in unlimited]
    for snapshot in stats:
        assert snapshot.kv_hot_bytes <= snapshot.kv_budget == 0
        assert snapshot.evictions > 0
    if with_store:
        # Every block came back from disk: nothing was prefilled twice. (Which agent of a
        # round computes the shared blocks and which wait for them varies; the counts not.)
        def per_round(replies: list[list[troupe.Reply]]) -> list[list[int]]:
            return [sorted(rs[k].cached_tokens for rs in replies) for k in range(len(ROUNDS))]

        assert per_round(spilled) == per_round(unlimited)
        assert stats[-1].restores > 0
        assert stats[-1].rebuilds == 0
    else:
        assert stats[-1].rebuilds > 0


async def test_a_small_budget_holds_after_every_round(tmp_path: Path) -> None:
    budget = 600_000  # a few agents' worth of the tiny model's KV (4 KiB a token)
    _, stats = await _conversations(8, store=tmp_path / "store", block_size=32,
                                    kv_budget=budget)
    assert all(s.kv_hot_bytes <= budget for s in stats)
    assert stats[-1].evictions > 0


async def test_agents_with_one_system_prompt_share_its_blocks(store: Path) -> None:
    system = WORLD * 3  # about 550 tokens: 17 blocks of 32
    async with troupe.open_runtime(model=TINY, store=store, block_size=32) as rt:
        first = await (await rt.spawn("first", system=system)).say("Hello", max_tokens=4)
        files_before = {p.name for p in (store / "kv").glob("*.kvb")}
        crowd = [await rt.spawn(f"a{i}", system=system) for i in range(49)]
        async with trio.open_nursery() as nursery:
            for agent in crowd:
                nursery.start_soon(partial(agent.say, "Hello", max_tokens=4))
        stats = rt.statistics()
        later = await (await rt.spawn("late", system=system)).say("Hi there", max_tokens=4)
    shared_blocks = first.prompt_tokens // 32
    assert first.cached_tokens == 0
    # One copy of the shared blocks, in memory and on disk.
    assert stats.blocks_shared >= shared_blocks
    assert {p.name for p in (store / "kv").glob("*.kvb")} >= files_before
    assert len(files_before) == shared_blocks
    assert stats.blocks_in_memory < 2 * shared_blocks + 50
    # A new agent whose prompt starts the same prefills only the rest.
    assert later.cached_tokens >= shared_blocks * 32 - 32
    async with troupe.open_runtime(model=TINY, store=store, block_size=32) as rt:
        again = await (await rt.spawn("after-reopen", system=system)).say("Hi", max_tokens=4)
    assert again.cached_tokens >= shared_blocks * 32 - 32


async def test_a_prompt_that_shares_part_of_a_block_reuses_that_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The systems share WORLD and " You are ", then part ways inside a block of 32, in the
    # part of the first prompt after its last full block.
    systems = [f"{WORLD} You are villager {i}." for i in range(4)] + [
        f"{WORLD} You are Alice.", f"{WORLD} You are Bob, the smith."]

    async def run() -> list[troupe.Reply]:
        async with troupe.open_runtime(model=TINY, block_size=32) as rt:
            agents = [await rt.spawn(f"a{i}", system=s) for i, s in enumerate(systems)]
            replies: dict[int, troupe.Reply] = {}

            async def speak(i: int) -> None:
                replies[i] = await agents[i].say("Hello", max_tokens=8)

            # The villagers start at once: one prefills, the others wait for its blocks
            # and borrow the start of its prompt's partial last block, published with them.
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(speak, i)
            for i in range(4, len(agents)):  # then one at a time: from finished tails
                await speak(i)
            return [replies[i] for i in range(len(agents))]

    borrowing = await run()
    monkeypatch.setattr(troupe.actors._pool, "DONORS", 0)
    whole_blocks = await run()
    assert [r.tokens for r in borrowing] == [r.tokens for r in whole_blocks]
    # Without donors a prompt reuses whole blocks only.
    assert all(r.cached_tokens % 32 == 0 for r in whole_blocks)
    # With them, also the first tokens of the next block (another agent's), up to where
    # the prompts part: after "You are villager " for the villagers but the one that
    # went first (which one trio runs first varies), after "You are " for Alice and Bob.
    villagers = sorted(r.cached_tokens for r in borrowing[:4])
    assert villagers[0] == 0
    assert villagers[1] == villagers[2] == villagers[3]
    assert borrowing[4].cached_tokens == borrowing[5].cached_tokens
    assert villagers[1] - borrowing[4].cached_tokens == len("villager ")
    assert borrowing[4].cached_tokens % 32 > 0


async def test_two_hundred_agents_go_through_a_small_budget(store: Path) -> None:
    budget = 2_000_000
    async with troupe.open_runtime(model=TINY, store=store, kv_budget=budget,
                                   block_size=32, max_batch_size=32) as rt:
        crowd = [await rt.spawn(f"v{i}", system=f"You are villager number {i}.")
                 for i in range(200)]
        for text in ("Hello.", "Again."):
            async with trio.open_nursery() as nursery:
                for agent in crowd:
                    nursery.start_soon(partial(agent.say, text, max_tokens=4))
            stats = rt.statistics()
            assert stats.kv_hot_bytes <= budget
        assert stats.turns_completed == 400
        assert stats.evictions > 0
        assert stats.restores > 0


async def test_a_turn_writes_only_the_blocks_it_completed(store: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=store, block_size=32) as rt:
        per_token = rt.model.kv_bytes_per_token
        alice = await rt.spawn("alice", system=WORLD)
        written = []
        for i in range(8):
            before = rt.statistics().store_bytes_written
            reply = await alice.say(f"Message number {i}.", max_tokens=8)
            new = reply.prompt_tokens + len(reply.tokens)
            written.append((rt.statistics().store_bytes_written - before, new))
    # New blocks plus the tail, never the whole context again.
    for nbytes, new in written:
        assert nbytes <= (new + 2 * 32) * per_token


def _catalog_files(store: Path) -> list[KVFile]:
    """Every block and tail file the catalog points at, read with plain sqlite3."""
    with contextlib.closing(sqlite3.connect(store / "catalog.sqlite")) as db:
        blocks = db.execute("SELECT id, nbytes, checksum, serial FROM blocks").fetchall()
        tails = db.execute("SELECT tail_file, tail_nbytes, tail_checksum FROM agents "
                           "WHERE tail_file IS NOT NULL").fetchall()
    return [KVFile(block_file_name(i, serial), n, c) for i, n, c, serial in blocks] + [
        KVFile(f, n, c) for f, n, c in tails]


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "deleted"])
async def test_a_damaged_block_is_rebuilt_with_an_identical_continuation(
    damage: str, store: Path
) -> None:
    async with troupe.open_runtime(model=TINY, block_size=16) as rt:
        reference = await rt.spawn("alice", system=WORLD)
        expected = [await reference.say(m, max_tokens=10) for m in ROUNDS]
    async with troupe.open_runtime(model=TINY, store=store, block_size=16) as rt:
        alice = await rt.spawn("alice", system=WORLD)
        for m in ROUNDS[:2]:
            await alice.say(m, max_tokens=10)
    blocks = sorted((store / "kv").glob("*.kvb"))
    victim = blocks[len(blocks) // 2]
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "corrupted":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    async with troupe.open_runtime(model=TINY, store=store, block_size=16) as rt:
        third = await (await rt.get("alice")).say(ROUNDS[2], max_tokens=10)
        stats = rt.statistics()
    assert third.tokens == expected[2].tokens
    assert 0 < third.cached_tokens < expected[2].cached_tokens
    assert stats.rebuilds == 1
    # The rebuilt block was written again, whole.
    for file in _catalog_files(store):
        KVDir(store / "kv").read(file)


async def test_a_process_killed_mid_spill_reopens_whole(
    store: Path, troupe_env: dict[str, str]
) -> None:
    script = textwrap.dedent(
        f"""
        import trio, troupe
        async def main():
            async with troupe.open_runtime(model={TINY!r}, store={str(store)!r},
                                           kv_budget=0, block_size=16) as rt:
                crowd = [await rt.spawn(f"a{{i}}", system="You are agent " + str(i) * 40)
                         for i in range(6)]
                for n in range(1000):
                    async def one(agent, n=n):
                        reply = await agent.say(f"message {{n}}", max_tokens=6)
                        print("ACK", agent.id, n, flush=True)
                    async with trio.open_nursery() as nursery:
                        for agent in crowd:
                            nursery.start_soon(one, agent)
        trio.run(main)
        """
    )

    def run_and_kill() -> list[str]:
        process = subprocess.Popen([PYTHON, "-c", script], env=troupe_env,
                                   stdout=subprocess.PIPE, text=True)
        acked = []
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("ACK"):
                acked.append(line.split(maxsplit=1)[1].strip())
            if len(acked) == 20:  # mid-round: some turns spilling, others not begun
                process.kill()
                break
        process.wait()
        return acked

    acked = await trio.to_thread.run_sync(run_and_kill)
    async with troupe.open_runtime(model=TINY, store=store, block_size=16) as rt:
        for line in acked:
            agent_id, n = line.split()
            said = [m.content for m in (await rt.get(agent_id)).transcript() if m.role == "user"]
            assert f"message {n}" in said
        reply = await (await rt.get("a0")).say("After the crash.", max_tokens=4)
    assert reply.cached_tokens > 0
    # No catalog row points at a missing or partial block.
    for file in _catalog_files(store):
        KVDir(store / "kv").read(file)
    assert not list((store / "kv").glob("*.partial"))


@pytest.mark.parametrize("with_store", [False, True])
async def test_a_fork_shares_blocks_diverges_and_survives_a_reopen(
    with_store: bool, tmp_path: Path
) -> None:
    async with troupe.open_runtime(model=TINY, block_size=16) as rt:
        left, right = (await rt.spawn("left", system=WORLD), await rt.spawn("right", system=WORLD))
        for agent in (left, right):
            for m in ROUNDS[:2]:
                await agent.say(m, max_tokens=10)
        expected_left = await left.say("Go east.", max_tokens=10)
        expected_right = await right.say("Go west.", max_tokens=10)
        expected_after = await right.say("And then?", max_tokens=10)
    store = tmp_path / "store" if with_store else None
    async with troupe.open_runtime(model=TINY, store=store, block_size=16) as rt:
        alice = await rt.spawn("alice", system=WORLD)
        for m in ROUNDS[:2]:
            await alice.say(m, max_tokens=10)
        before = rt.statistics()
        files = set((tmp_path / "store" / "kv").glob("*.kvb")) if with_store else set()
        twin = await alice.fork("twin")
        with pytest.raises(troupe.AgentExistsError):
            await alice.fork("twin")
        assert twin.transcript() == alice.transcript()
        assert twin.statistics().cached_tokens == alice.statistics().cached_tokens
        after = rt.statistics()
        assert after.blocks_shared >= before.blocks_shared + 4  # no KV copied
        assert after.blocks_in_memory == before.blocks_in_memory
        if with_store:
            assert set((tmp_path / "store" / "kv").glob("*.kvb")) == files
        east = await alice.say("Go east.", max_tokens=10)
        west = await twin.say("Go west.", max_tokens=10)
        assert east.tokens == expected_left.tokens
        assert west.tokens == expected_right.tokens
        assert west.cached_tokens == expected_right.cached_tokens  # the fork reused it all
        transcripts = {a.id: a.transcript() for a in (alice, twin)}
    if not with_store:
        return
    async with troupe.open_runtime(model=TINY, store=store, block_size=16) as rt:
        twin = await rt.get("twin")
        assert {i: (await rt.get(i)).transcript() for i in transcripts} == transcripts
        after_reopen = await twin.say("And then?", max_tokens=10)
    assert after_reopen.tokens == expected_after.tokens
    assert after_reopen.cached_tokens == expected_after.cached_tokens


async def test_an_activated_agent_has_its_kv_prefetched(store: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=store, block_size=16) as rt:
        alice = await rt.spawn("alice", system=WORLD)
        for m in ROUNDS[:2]:
            await alice.say(m, max_tokens=10)
    async with troupe.open_runtime(model=TINY, store=store, block_size=16) as rt:
        alice = await rt.get("alice")  # the storage actor starts loading its blocks now
        reply = await alice.say(ROUNDS[2], max_tokens=10)
        stats = rt.statistics()
    assert stats.prefetches == 1
    assert stats.restores > 0
    assert stats.caches_loaded == 1  # by the prefetch: the turn found its KV in memory
    assert reply.cached_tokens > 0


async def test_the_kv_of_an_agent_with_a_turn_queued_is_not_evicted() -> None:
    async def two_turns_at_once(**options: object) -> list[troupe.Reply]:
        async with troupe.open_runtime(model=TINY, block_size=16, **options) as rt:  # type: ignore[arg-type]
            alice = await rt.spawn("alice", system=WORLD)
            replies: dict[int, troupe.Reply] = {}

            async def say(i: int) -> None:
                replies[i] = await alice.say(ROUNDS[i], max_tokens=10)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(say, 0)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(say, 1)  # queued behind the first
            assert rt.statistics().rebuilds == 0
            return [replies[0], replies[1]]

    unlimited = await two_turns_at_once()
    spilling = await two_turns_at_once(kv_budget=0)
    assert spilling == unlimited
    assert spilling[1].cached_tokens > spilling[0].prompt_tokens


async def test_agents_starting_at_once_prefill_a_shared_prompt_once() -> None:
    system = WORLD * 3  # about 550 tokens: 34 blocks of 16
    async with troupe.open_runtime(model=TINY, block_size=16) as rt:
        alone = await (await rt.spawn("alone", system=system)).say("Hello", max_tokens=4)
    async with troupe.open_runtime(model=TINY, block_size=16) as rt:
        crowd = [await rt.spawn(f"a{i}", system=system) for i in range(20)]
        replies: list[troupe.Reply] = []

        async def say(agent: troupe.Agent) -> None:
            replies.append(await agent.say("Hello", max_tokens=4))

        async with trio.open_nursery() as nursery:
            for agent in crowd:
                nursery.start_soon(say, agent)
        stats = rt.statistics()
    assert all(r.tokens == alone.tokens for r in replies)
    # One agent prefilled the shared blocks; the others waited for them and reused them.
    assert sorted(r.cached_tokens for r in replies)[0] == 0
    assert sum(1 for r in replies if r.cached_tokens >= alone.prompt_tokens - 16) == 19
    assert stats.tokens_prefilled < alone.prompt_tokens + 20 * 16


async def test_the_least_recently_used_agent_is_evicted_first() -> None:
    """Past the budget, the KV of the agent idle longest goes first: the agent that just
    spoke keeps all of its KV (its next turn reuses every token), the other loses some."""
    # Same-length, distinct prompts: no block is shared between the three agents.
    systems = {name: f"You are {name}, and {name} alone. {WORLD}" for name in ("ann", "bob", "cyd")}
    order = ["ann", "bob", "ann", "cyd"]

    async def run(budget: int | None) -> tuple[dict[str, list[troupe.Reply]], list[int]]:
        options = {} if budget is None else {"kv_budget": budget}
        replies: dict[str, list[troupe.Reply]] = {name: [] for name in systems}
        hot = []
        async with troupe.open_runtime(model=TINY, block_size=16, **options) as rt:  # type: ignore[arg-type]
            agents = {name: await rt.spawn(name, system=s) for name, s in systems.items()}
            for name in [*order, "ann", "bob"]:
                replies[name].append(await agents[name].say("Go on.", max_tokens=8))
                hot.append(rt.statistics().kv_hot_bytes)
        return replies, hot

    unlimited, hot = await run(None)
    # Room for everything after the fourth turn but part of bob's KV: bob was idle longest.
    bob = hot[1] - hot[0]
    budget = hot[3] - bob // 2
    limited, _ = await run(budget)
    assert limited["ann"][2].cached_tokens == unlimited["ann"][2].cached_tokens > 0
    assert limited["bob"][1].cached_tokens < unlimited["bob"][1].cached_tokens
    assert [r.tokens for r in limited["bob"]] == [r.tokens for r in unlimited["bob"]]
