"""Opening, cancelling and closing: turns in flight, threads, trio and asyncio hosts."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import mlx.core as mx
import trio

import troupe
from conftest import TINY


def _troupe_threads() -> list[str]:
    """The engine, the SQLite loop and aiosqlite's connection worker."""
    return [t.name for t in threading.enumerate()
            if t.name.startswith("troupe-") or "_connection_worker_thread" in t.name]


async def test_closing_cancels_turns_in_flight_and_joins_every_thread(store: Path) -> None:
    outcome: list[BaseException] = []
    async with trio.open_nursery() as outside:
        async with troupe.open_runtime(model=TINY, store=store) as rt:
            assert len(_troupe_threads()) == 3
            assert {"troupe-mlx", "troupe-sqlite"} <= set(_troupe_threads())
            talker = await rt.spawn("talker")
            quiet = await rt.spawn("quiet")
            await quiet.say("Hello", max_tokens=3)
            streaming = trio.Event()

            async def endless() -> None:
                try:
                    async for _ in talker.stream("Go on forever.", max_tokens=1500):
                        streaming.set()
                except troupe.RuntimeClosedError as exc:
                    outcome.append(exc)

            outside.start_soon(endless)
            await streaming.wait()
    assert len(outcome) == 1
    assert _troupe_threads() == []
    assert rt.statistics().turns_cancelled == 1
    # What was acknowledged before the close is in the store; the cancelled turn is not.
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert len((await rt.get("quiet")).transcript()) == 2
        assert (await rt.get("talker")).transcript() == ()


async def test_closing_lets_go_of_the_weights_and_the_kv_at_once(store: Path) -> None:
    # With the cyclic GC off, what a closed runtime frees is what no cycle holds.
    gc.collect()
    before = mx.get_active_memory()
    gc.disable()
    try:
        async with troupe.open_runtime(model=TINY, store=store) as rt:
            for i in range(4):
                await (await rt.spawn(f"a{i}", system=f"You are agent {i}.")).say(
                    "Hello", max_tokens=8)
            held = mx.get_active_memory()
            assert rt.statistics().kv_hot_bytes > 0
        after = mx.get_active_memory()
    finally:
        gc.enable()
    assert held - before > 8_000_000  # the tiny model's weights, and the agents' KV
    assert after <= before
    assert rt.statistics().kv_hot_bytes == 0


async def test_a_cancelled_caller_cancels_its_turn_and_keeps_the_cache() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        a = await rt.spawn("a", system="You are A.")
        first = await a.say("Hello", max_tokens=4)
        with trio.CancelScope() as scope:
            async for _ in a.stream("A long story, please.", max_tokens=1000):
                scope.cancel()
        assert a.transcript() == (
            troupe.Message("user", "Hello"), troupe.Message("assistant", first.text))
        after = await a.say("Short one.", max_tokens=4)
        stats = rt.statistics()
    assert stats.turns_cancelled == 1
    # The cancelled turn's cache came back: at least everything before it is reused.
    assert after.cached_tokens >= first.prompt_tokens + len(first.tokens)


async def test_leaving_a_stream_early_with_async_with_cancels_the_turn() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        a = await rt.spawn("a")
        async with a.stream("Tell me everything.", max_tokens=1000) as stream:
            async for _ in stream:
                break
        reply = await a.say("Next.", max_tokens=2)
        assert rt.statistics().turns_cancelled == 1
        assert [m.content for m in a.transcript()] == ["Next.", reply.text]


async def test_a_one_slot_mailbox_still_serves_every_caller() -> None:
    async with troupe.open_runtime(model=TINY, mailbox_size=1) as rt:
        a = await rt.spawn("a")
        done: list[int] = []

        async def ask(i: int) -> None:
            await a.say(f"question {i}", max_tokens=2)
            done.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(ask, i)
        assert sorted(done) == [0, 1, 2, 3]
        assert a.statistics().turns == 4


def test_the_api_works_with_asyncio_as_host(tmp_path: Path) -> None:
    async def main() -> tuple[troupe.Reply, list[str], troupe.Reply]:
        async with troupe.open_runtime(model=TINY, store=tmp_path / "store") as rt:
            alice = await rt.spawn("alice", system="You are Alice.")
            bob = await rt.spawn("bob", system="You are Bob.")
            first, _ = await asyncio.gather(
                alice.say("Good morning!", max_tokens=8), bob.say("Hi", max_tokens=8))
            deltas = [d async for d in alice.stream("And you?", max_tokens=8)]
        async with troupe.open_runtime(model=TINY, store=tmp_path / "store") as rt:
            again = await (await rt.get("alice")).say("Bye.", max_tokens=4)
        return first, deltas, again

    first, deltas, again = asyncio.run(main())
    assert len(first.tokens) == 8
    assert len("".join(deltas)) > 0
    assert again.cached_tokens > 0
    assert _troupe_threads() == []


async def test_trio_and_asyncio_hosts_give_the_same_tokens() -> None:
    async def turns() -> list[tuple[int, ...]]:
        async with troupe.open_runtime(model=TINY) as rt:
            a = await rt.spawn("a", system="Same everywhere.")
            return [(await a.say(m, max_tokens=10)).tokens for m in ("one", "two")]

    on_trio = await turns()
    on_asyncio = await trio.to_thread.run_sync(lambda: asyncio.run(turns()))
    assert on_trio == on_asyncio


async def test_model_info_describes_the_loaded_model() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        info = rt.model
    assert info.context_length == 2048
    assert info.num_layers == 4
    assert info.persistable_cache
    assert info.kv_bytes_per_token == 2 * 4 * 2 * 64 * 4
