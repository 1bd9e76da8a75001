"""Virtual agents: a stored agent costs no memory and no task until it is addressed."""

from __future__ import annotations

import contextlib
import sqlite3
import time
import tracemalloc
from pathlib import Path

import trio
import trio.testing

import troupe
from conftest import TINY
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
