"""The engine's schedule on the real tiny model: prefill chunks interleave with decode
steps, and a turn's prompt blocks go to the turns waiting for them when its prefill ends.

Counted in engine steps and tokens, never timed: the engine runs one decode step of the
running batch per prefill chunk, so what a turn sees of another is fixed in steps.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

import troupe
from conftest import TINY
from troupe.storage._blocks import KVFile
from troupe.storage._kvdir import KVDir, block_file_name

WORLD = "The village of Millbrook sits by a river; a storm is coming. " * 3
SHARED = WORLD * 4  # about 750 tokens with the template: 23 blocks of 32
SPEAKER = "You are Alice, the town baker."
TALK = "Tell me a long story."  # its greedy reply runs past 700 tokens, no end of turn


async def _until(condition: Callable[[], bool]) -> None:
    """Let every other task run until ``condition`` holds (a checkpoint loop, no sleep)."""
    while not condition():
        await trio.testing.wait_all_tasks_blocked()


def _block_files(store: Path) -> list[KVFile]:
    """Every block file the catalog names, read with plain sqlite3."""
    with contextlib.closing(sqlite3.connect(store / "catalog.sqlite")) as db:
        rows = db.execute("SELECT id, nbytes, checksum, serial FROM blocks").fetchall()
    return [KVFile(block_file_name(i, serial), n, c) for i, n, c, serial in rows]


def _settled(rt: troupe.Runtime) -> None:
    """Nothing in flight: no block pinned or claimed, no publish left, the budget kept."""
    kv = rt._storage.kv  # the KV manager: the invariants live there
    pool = kv.pool
    assert rt.statistics().turns_in_flight == 0
    # No turn's prefix, claim, pin, loaded KV, published block or finished KV is left.
    assert kv.settled()
    assert rt._storage._staged == {}  # every staged file was recorded by a commit
    assert pool.hot_bytes <= pool.budget
    assert pool.hot_bytes == sum(b.nbytes for b in pool.blocks.values() if b.data is not None) \
        + sum(lease.tail.nbytes for lease in pool.leases.values()
              if lease.tail is not None and lease.tail.data is not None)
    # The queue of use holds exactly the KV in memory that eviction may take.
    queued = set(pool._by_use)
    assert queued == {b for b in pool.blocks.values() if b.data is not None} | {
        lease.tail for lease in pool.leases.values()
        if lease.tail is not None and lease.tail.data is not None}


async def test_a_long_prompt_joining_does_not_stall_the_streams_in_flight() -> None:
    step, a_tokens = 16, 400
    long_text = (WORLD * 9)[:1500]  # ~1,500 tokens: ~94 prefill chunks of 16

    async with troupe.open_runtime(model=TINY, prefill_step_size=step) as rt:
        alone = await (await rt.spawn("a", system=SPEAKER)).say(TALK, max_tokens=a_tokens)
        a_steps = rt.statistics().engine_steps
    async with troupe.open_runtime(model=TINY, prefill_step_size=step) as rt:
        b_alone = await (await rt.spawn("b")).say(long_text, max_tokens=1)
        b_steps = rt.statistics().engine_steps
    assert alone.finish_reason == "length"
    assert b_alone.prompt_tokens > 1400
    chunks = b_alone.prompt_tokens // step
    assert b_steps >= chunks  # B's prompt alone takes a step per chunk

    async with troupe.open_runtime(model=TINY, prefill_step_size=step) as rt:
        a = await rt.spawn("a", system=SPEAKER)
        b = await rt.spawn("b")
        received = 0
        seen: dict[str, int] = {}

        async def run_b() -> None:
            seen["b submitted"], seen["steps before b"] = received, rt.statistics().engine_steps
            await b.say(long_text, max_tokens=1)
            seen["b done"], seen["steps with b"] = received, rt.statistics().engine_steps

        async with trio.open_nursery() as nursery:
            async with a.stream(TALK, max_tokens=a_tokens) as stream:
                async for _ in stream:
                    received += 1
                    if received == 5:  # A is decoding: now B's long prompt joins
                        nursery.start_soon(run_b)
        total_steps = rt.statistics().engine_steps
    assert stream.reply is not None
    assert stream.reply.tokens == alone.tokens
    assert received == a_tokens  # the tiny model spells one character a token
    # While B's prompt was prefilled, chunk by chunk, A got a token at every step...
    assert seen["b done"] < a_tokens
    assert seen["b done"] - seen["b submitted"] >= chunks - 2
    assert seen["steps with b"] - seen["steps before b"] >= chunks
    # ...so B's turn added no step of its own: every one also decoded A.
    assert total_steps == a_steps


async def test_turns_waiting_for_shared_blocks_start_when_its_prefill_ends() -> None:
    options = {"block_size": 32, "prefill_step_size": 32}
    systems = [f"{SHARED} You are villager {i}." for i in range(6)]
    lead_tokens = 300

    async def one_at_a_time() -> tuple[list[troupe.Reply], troupe.RuntimeStatistics]:
        async with troupe.open_runtime(model=TINY, **options) as rt:  # type: ignore[arg-type]
            crowd = [await rt.spawn(f"v{i}", system=s) for i, s in enumerate(systems)]
            replies = [await crowd[0].say(TALK, max_tokens=lead_tokens)]
            replies += [await agent.say("Hello", max_tokens=8) for agent in crowd[1:]]
            return replies, rt.statistics()

    expected, expected_stats = await one_at_a_time()
    assert expected[0].finish_reason == "length"
    shared = 23 * 32
    assert all(r.cached_tokens >= shared for r in expected[1:])

    async with troupe.open_runtime(model=TINY, **options) as rt:  # type: ignore[arg-type]
        crowd = [await rt.spawn(f"v{i}", system=s) for i, s in enumerate(systems)]
        replies: dict[int, troupe.Reply] = {}
        finished: list[int] = []

        async def speak(i: int) -> None:
            if i == 0:
                replies[i] = await crowd[i].say(TALK, max_tokens=lead_tokens)
            else:
                replies[i] = await crowd[i].say("Hello", max_tokens=8)
            finished.append(i)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(speak, 0)
            # The first turn is in the engine (its checkout claimed the shared blocks):
            # the others find them claimed, or published already, never theirs to compute.
            await _until(lambda: rt.statistics().engine_steps > 0)
            for i in range(1, len(crowd)):
                nursery.start_soon(speak, i)
        stats = rt.statistics()
        _settled(rt)
    # The shared blocks were prefilled once, by the first turn...
    assert [replies[i].cached_tokens for i in range(len(crowd))] == [
        r.cached_tokens for r in expected]
    assert replies[0].cached_tokens == 0
    assert stats.tokens_prefilled == expected_stats.tokens_prefilled
    assert stats.tokens_reused == expected_stats.tokens_reused >= 5 * shared
    # ...and the others ran while it was still decoding, not after it ended.
    assert finished[-1] == 0
    assert [replies[i].tokens for i in range(len(crowd))] == [r.tokens for r in expected]


@pytest.mark.parametrize("with_store", [False, True])
async def test_a_turn_cancelled_after_publishing_leaves_the_runtime_consistent(
    with_store: bool, tmp_path: Path
) -> None:
    budget = 1_000_000  # a third of the shared blocks (the tiny model: 4 KiB a token)
    options = {"block_size": 32, "prefill_step_size": 32, "kv_budget": budget}
    systems = {name: f"{SHARED} You are {name}." for name in ("x", "y", "z")}

    async with troupe.open_runtime(model=TINY, block_size=32, prefill_step_size=32) as rt:
        agents = {n: await rt.spawn(n, system=s) for n, s in systems.items()}
        expected = {
            "y1": await agents["y"].say("Hello", max_tokens=8),
            "x": await agents["x"].say("Again.", max_tokens=8),
            "y2": await agents["y"].say("And you?", max_tokens=8),
            "z": await agents["z"].say("Hi", max_tokens=8),
        }

    store = tmp_path / "store" if with_store else None
    async with troupe.open_runtime(model=TINY, store=store, **options) as rt:  # type: ignore[arg-type]
        agents = {n: await rt.spawn(n, system=s) for n, s in systems.items()}
        y_reply: list[troupe.Reply] = []

        async def y_speaks(started: trio.Event) -> None:
            async with agents["y"].stream("Hello", max_tokens=8) as stream:
                async for _ in stream:
                    started.set()
            assert stream.reply is not None
            y_reply.append(stream.reply)

        async with trio.open_nursery() as nursery:
            async with agents["x"].stream(TALK, max_tokens=300) as x_stream:
                async for _ in x_stream:
                    # X's prefill ended and published the shared blocks: Y starts from
                    # them while X decodes, and X is cancelled once Y is under way.
                    y_started = trio.Event()
                    nursery.start_soon(y_speaks, y_started)
                    await y_started.wait()
                    break
        assert x_stream.reply is None
        assert agents["x"].transcript() == ()
        stats = rt.statistics()
        assert stats.turns_cancelled == 1
        _settled(rt)
        assert y_reply[0].tokens == expected["y1"].tokens
        assert y_reply[0].cached_tokens >= 23 * 32  # from the cancelled turn's blocks

        replies = {
            "x": await agents["x"].say("Again.", max_tokens=8),
            "y2": await agents["y"].say("And you?", max_tokens=8),
            "z": await agents["z"].say("Hi", max_tokens=8),
        }
        _settled(rt)
        assert rt.statistics().evictions > 0
    assert {k: r.tokens for k, r in replies.items()} == {
        k: expected[k].tokens for k in replies}
    if store is None:
        return
    # Every block file the catalog names is whole, and the shared blocks are reused
    # after a reopen.
    files = _block_files(store)
    assert len(files) >= 23
    for file in files:
        KVDir(store / "kv").read(file)
    assert not list((store / "kv").glob("*.partial"))
    async with troupe.open_runtime(model=TINY, store=store, **options) as rt:  # type: ignore[arg-type]
        late = await (await rt.spawn("late", system=systems["z"])).say("Hi", max_tokens=8)
        _settled(rt)
    assert late.tokens == expected["z"].tokens
    assert late.cached_tokens >= 23 * 32


async def test_rows_finishing_at_different_steps_leave_every_reply_unchanged() -> None:
    """Rows leave the batch at different steps (each drop reshapes the batch's KV): the
    rows still running, a turn cancelled meanwhile and a turn joining afterwards all give
    the tokens they give one at a time."""
    lengths = [3, 5, 8, 13, 21, 34, 40, 40]

    async def run(together: bool) -> list[tuple[int, ...]]:
        async with troupe.open_runtime(model=TINY, max_batch_size=8) as rt:
            agents = [await rt.spawn(f"a{i}", system=f"{SPEAKER} You are number {i}.")
                      for i in range(len(lengths))]
            late = await rt.spawn("late", system=SPEAKER)
            quitter = await rt.spawn("quitter", system=SPEAKER)
            replies: list[tuple[int, ...]] = [() for _ in lengths]

            async def turn(i: int) -> None:
                reply = await agents[i].say(f"{TALK} ({i})", max_tokens=lengths[i])
                replies[i] = reply.tokens

            async def cancelled_midway() -> None:
                # Leaves the batch (BatchGenerator.remove) while finished rows wait in it.
                async with quitter.stream(TALK, max_tokens=40) as stream:
                    seen = 0
                    async for _ in stream:
                        seen += 1
                        if seen == 10:
                            break

            if together:
                async with trio.open_nursery() as nursery:
                    for i in range(len(lengths)):
                        nursery.start_soon(turn, i)
                    nursery.start_soon(cancelled_midway)
            else:
                for i in range(len(lengths)):
                    await turn(i)
                await cancelled_midway()
            assert quitter.transcript() == ()  # cancelled before its last token
            after = await late.say(TALK, max_tokens=12)
            return [*replies, after.tokens]

    assert await run(together=True) == await run(together=False)


async def test_rows_joining_and_leaving_a_reused_batch_keep_every_reply_unchanged() -> None:
    """The batch keeps its KV buffer across rows: one that leaves is filled by a row from
    the end, a group joins into the free rows (or a new buffer when its contexts are longer
    than the batch's, or the rows run out) and the buffer grows when replies run past its
    room. Agents of very different context lengths, replies of different lengths, three
    rounds through a batch of 5: every reply is the one the agent gives alone."""
    systems = [f"{SPEAKER} You are number {i}. " + WORLD * (i % 4) for i in range(11)]
    lengths = [4, 9, 17, 30, 6, 12, 45, 3, 22, 8, 60]

    async def run(together: bool) -> list[list[tuple[int, ...]]]:
        async with troupe.open_runtime(model=TINY, max_batch_size=5) as rt:
            agents = [await rt.spawn(f"a{i}", system=s) for i, s in enumerate(systems)]
            replies: list[list[tuple[int, ...]]] = [[] for _ in agents]

            async def turns(i: int) -> None:
                for round_no in range(3):
                    reply = await agents[i].say(f"News {round_no} for {i}?",
                                                max_tokens=lengths[(i + round_no) % 11])
                    replies[i].append(reply.tokens)

            if together:
                async with trio.open_nursery() as nursery:
                    for i in range(len(agents)):
                        nursery.start_soon(turns, i)
                assert rt.statistics().peak_batch_size >= 5  # the batch was full
            else:
                for i in range(len(agents)):
                    await turns(i)
            return replies

    assert await run(together=True) == await run(together=False)


async def test_a_row_that_joins_with_a_long_reply_grows_the_batch_unchanged() -> None:
    """A short-context turn with a long reply joins a running batch's free rows, where the
    room was made for shorter replies: the buffer grows under it and every reply is the
    one its agent gives alone."""
    turns = {"a": (SPEAKER + " " + WORLD * 3, 60), "b": ("You are Bob.", 5), "c": (SPEAKER, 400)}

    async def run(together: bool) -> dict[str, tuple[int, ...]]:
        async with troupe.open_runtime(model=TINY, max_batch_size=4) as rt:
            agents = {name: await rt.spawn(name, system=system)
                      for name, (system, _) in turns.items()}
            replies: dict[str, tuple[int, ...]] = {}

            async def turn(name: str) -> None:
                replies[name] = (await agents[name].say(TALK, max_tokens=turns[name][1])).tokens

            if not together:
                for name in turns:
                    await turn(name)
                return replies
            async with trio.open_nursery() as nursery:
                async with agents["a"].stream(TALK, max_tokens=turns["a"][1]) as stream:
                    seen = 0
                    async for _ in stream:
                        seen += 1
                        if seen == 3:  # b joins a running batch of one
                            nursery.start_soon(turn, "b")
                        if seen == 20:  # c joins the rows b's join made room for
                            nursery.start_soon(turn, "c")
                assert stream.reply is not None
                replies["a"] = stream.reply.tokens
            return replies

    together, alone = await run(together=True), await run(together=False)
    assert len(alone["c"]) == 400
    assert together == alone
