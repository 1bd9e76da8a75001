"""Virtual agents: a stored agent costs no memory and no task until it is addressed."""

from __future__ import annotations

import contextlib
import sqlite3
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import trio
import trio.testing

import troupe
from conftest import TINY
from troupe.actors._agent import AgentActor
from troupe.storage._catalog import agent_checksum, message_checksum


def _add_stored_agents(store: Path, count: int) -> None:
    """``count`` more agents, each with a short transcript, straight into the catalog
    (with the checksums and counts troupe keeps, so they read back as sound)."""
    with contextlib.closing(sqlite3.connect(store / "catalog.sqlite")) as db, db:
        db.executemany(
            "INSERT INTO agents (id, system, created, turns, message_count, checksum) "
            "VALUES (?, ?, ?, 1, 2, ?)",
            [(f"bulk-{i}", f"You are villager {i}.", time.time() + i,
              agent_checksum(f"bulk-{i}", f"You are villager {i}."))
             for i in range(count)],
        )
        db.executemany(
            "INSERT INTO messages (agent_id, seq, role, content, checksum) "
            "VALUES (?, ?, ?, ?, ?)",
            [(f"bulk-{i}", seq, role, f"{role} {i}",
              message_checksum(f"bulk-{i}", seq, role, f"{role} {i}"))
             for i in range(count) for seq, role in enumerate(("user", "assistant"))],
        )


async def _open_footprint(store: Path) -> tuple[int, int, troupe.RuntimeStatistics]:
    """Python bytes allocated and tasks alive while a runtime on ``store`` is open."""
    tracemalloc.start()
    try:
        async with troupe.open_runtime(model=TINY, store=store) as rt:
            allocated = tracemalloc.get_traced_memory()[0]
            tasks = trio.lowlevel.current_statistics().tasks_living
            return allocated, tasks, rt.statistics()
    finally:
        tracemalloc.stop()


async def test_a_store_of_thousands_opens_without_activating_them(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    for store in (small, large):
        async with troupe.open_runtime(model=TINY, store=store) as rt:
            await (await rt.spawn("seed", system="You are the seed.")).say("Hi", max_tokens=4)
    _add_stored_agents(small, 10)
    _add_stored_agents(large, 5000)
    small_bytes, small_tasks, _ = await _open_footprint(small)
    large_bytes, large_tasks, stats = await _open_footprint(large)
    assert (stats.agents, stats.agents_active) == (5001, 0)
    assert large_tasks == small_tasks  # no task per stored agent
    assert large_bytes - small_bytes < 2_000_000  # ids only: ~100 bytes an agent

    async with troupe.open_runtime(model=TINY, store=large) as rt:
        assert len(rt.agent_ids()) == 5001
        assert rt.agent_ids()[:2] == ("seed", "bulk-0")
        villager = await rt.get("bulk-4321")
        assert rt.statistics().agents_active == 1
        assert [m.content for m in villager.transcript()] == ["user 4321", "assistant 4321"]
        reply = await villager.say("Hello there", max_tokens=4)
        assert reply.tokens
        assert rt.statistics().agents_active == 1
        seed = await rt.get("seed")
        again = await seed.say("Again", max_tokens=4)
    assert again.cached_tokens > 0  # the seed's blocks came back from disk


async def test_idle_agents_are_deactivated_and_come_back(
    store: Path, mock_clock: trio.testing.MockClock
) -> None:
    # The clock stands still unless the test moves it: only idleness in that time counts.
    async with troupe.open_runtime(model=TINY) as rt:
        reference = await rt.spawn("alice", system="You are Alice.")
        expected = [await reference.say(m, max_tokens=8) for m in ("Hello", "Again")]
    async with troupe.open_runtime(model=TINY, store=store, idle_timeout=60) as rt:
        alice = await rt.spawn("alice", system="You are Alice.")
        first = await alice.say("Hello", max_tokens=8)
        await rt.spawn("bob")
        assert rt.statistics().agents_active == 2
        mock_clock.jump(30)
        await trio.testing.wait_all_tasks_blocked()
        assert rt.statistics().agents_active == 2  # not idle long enough yet
        mock_clock.jump(45)
        await trio.testing.wait_all_tasks_blocked()
        stats = rt.statistics()
        assert (stats.agents, stats.agents_active) == (2, 0)
        assert rt.agent_ids() == ("alice", "bob")
        assert len(alice.transcript()) == 2  # a handle still reads what it last saw
        second = await alice.say("Again", max_tokens=8)  # activates alice again
        assert rt.statistics().agents_active == 1
        assert alice.transcript()[2:] == (
            troupe.Message("user", "Again"), troupe.Message("assistant", second.text))
        # Retired and activated again through another handle: every handle sees one agent.
        mock_clock.jump(75)
        await trio.testing.wait_all_tasks_blocked()
        assert rt.statistics().agents_active == 0
        other = await rt.get("alice")
        await other.tell("Bob says hello.")
        await other.say("Hi", max_tokens=2)
        assert other == alice
        assert alice.transcript() == other.transcript()
        assert len(alice.transcript()) == 7
    assert first.tokens == expected[0].tokens
    assert second.tokens == expected[1].tokens
    assert second.cached_tokens == expected[1].cached_tokens  # its KV stayed in the tiers


class _OneActorPerAgent(trio.abc.Instrument):
    """After every task step: no agent has two actors that are not retired.

    There is no public view of the actors behind an agent, so this reads the runtime's
    private table of active actors and remembers every actor it saw there.
    """

    def __init__(self, rt: troupe.Runtime) -> None:
        self._rt = rt
        self._live: dict[str, list[AgentActor]] = {}
        self.twice: set[str] = set()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        for agent_id, actor in list(self._rt._agents.items()):
            live = self._live.setdefault(agent_id, [])
            if actor not in live:
                live.append(actor)
        for agent_id, actors in self._live.items():
            actors[:] = [a for a in actors if not a.deactivated]
            if len(actors) > 1:
                self.twice.add(agent_id)


async def test_activations_and_the_reaper_race_without_harm(
    store: Path, mock_clock: trio.testing.MockClock
) -> None:
    # The clock jumps to the reaper's next wake-up whenever every task waits (on the
    # engine, the store's thread, a full mailbox): agents are retired between any two
    # calls, while they are being spawned, forked or activated. Mailboxes of one make
    # activations wait for room in the store's mailbox, with the reaper running meanwhile.
    mock_clock.autojump_threshold = 0
    base = [f"a{i}" for i in range(3)]
    rounds = 3
    # Per agent: each call's (told, asked, reply), in any order.
    sent: dict[str, list[tuple[str, str, str]]] = {}
    forks = {f"{agent_id}-fork": agent_id for agent_id in base}

    async def converse(rt: troupe.Runtime, agent_id: str, caller: str) -> None:
        agent = await rt.get(agent_id)
        told, asked = f"{caller} tells", f"{caller} asks"
        await agent.tell(told)
        reply = await (await rt.get(agent_id)).say(asked, max_tokens=2)
        sent.setdefault(agent_id, []).append((told, asked, reply.text))

    async def spawn(rt: troupe.Runtime, agent_id: str) -> None:
        async with trio.open_nursery() as nursery:
            await rt.spawn(agent_id, system=f"You are {agent_id}.")
            for c in range(2):
                nursery.start_soon(converse, rt, agent_id, f"c{c} 0")

    async def fork(rt: troupe.Runtime, source: str, new_id: str) -> None:
        await (await rt.get(source)).fork(new_id)
        await converse(rt, new_id, "forker 1")

    async def play(rt: troupe.Runtime, r: int) -> None:
        # Every agent is addressed by several tasks at once, most often while retired.
        async with trio.open_nursery() as nursery:
            for agent_id in base:
                if r == 0:
                    nursery.start_soon(spawn, rt, agent_id)
                    continue
                for c in range(2):
                    nursery.start_soon(converse, rt, agent_id, f"c{c} {r}")
                if r == 1:
                    nursery.start_soon(fork, rt, agent_id, f"{agent_id}-fork")
                else:
                    nursery.start_soon(converse, rt, f"{agent_id}-fork", f"f {r}")

    async with troupe.open_runtime(model=TINY, store=store, idle_timeout=0.001,
                                   mailbox_size=1) as rt:
        watch = _OneActorPerAgent(rt)
        trio.lowlevel.add_instrument(watch)
        try:
            for r in range(rounds):
                await play(rt, r)
                # Between rounds, the reaper retires every agent: the next round's calls
                # all activate them again, concurrently.
                for _ in range(100):
                    if not rt.statistics().agents_active:
                        break
                    mock_clock.jump(1)
                    await trio.testing.wait_all_tasks_blocked()
                assert rt.statistics().agents_active == 0
        finally:
            trio.lowlevel.remove_instrument(watch)
        stats = rt.statistics()
        transcripts = {a: (await rt.get(a)).transcript() for a in rt.agent_ids()}
    assert watch.twice == set()
    # Every round after the first found every agent retired, and the last left none active.
    assert stats.activations >= (rounds - 1) * len(base)
    assert stats.deactivations == len(base) + len(forks) + stats.activations
    assert sorted(transcripts) == sorted([*base, *forks])
    for agent_id, transcript in transcripts.items():
        calls = sent[agent_id]
        own = transcript
        if agent_id in forks:
            # A fork starts with what its source had then: a prefix of the source's.
            copied = len(transcript) - 3 * len(calls)
            assert transcript[:copied] == transcripts[forks[agent_id]][:copied]
            own = transcript[copied:]
        expected = [troupe.Message(role, text) for told, asked, reply in calls
                    for role, text in (("user", told), ("user", asked), ("assistant", reply))]
        assert Counter(own) == Counter(expected)
        for told, asked, reply in calls:  # a caller's tell, then its question and reply
            at = own.index(troupe.Message("user", asked))
            assert own.index(troupe.Message("user", told)) < at
            assert own[at + 1] == troupe.Message("assistant", reply)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert {a: (await rt.get(a)).transcript() for a in rt.agent_ids()} == transcripts
