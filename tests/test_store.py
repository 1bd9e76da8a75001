"""The store: agents come back after a close, a crash, or a damaged cache file."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
import trio

import troupe
from conftest import PYTHON, TINY

SYSTEM = "You are Alice, the town baker."
MESSAGES = ["Good morning!", "How is the bread today?", "And the weather?"]


async def _uninterrupted() -> list[troupe.Reply]:
    async with troupe.open_runtime(model=TINY) as rt:
        alice = await rt.spawn("alice", system=SYSTEM)
        return [await alice.say(m, max_tokens=12) for m in MESSAGES]


async def test_a_reopened_store_continues_as_if_it_never_closed(store: Path) -> None:
    expected = await _uninterrupted()
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.spawn("alice", system=SYSTEM)
        first_two = [await alice.say(m, max_tokens=12) for m in MESSAGES[:2]]
        transcript = alice.transcript()
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert rt.agent_ids() == ("alice",)
        alice = await rt.get("alice")
        assert alice.system == SYSTEM
        assert alice.transcript() == transcript
        third = await alice.say(MESSAGES[2], max_tokens=12)
        stats = rt.statistics()
    assert [*first_two, third] == [
        attrs_evolve(r, agent_id="alice") for r in expected
    ]
    # The cache came back from disk: the third turn prefilled only the new message.
    assert third.cached_tokens == expected[2].cached_tokens > 0
    assert stats.caches_loaded == 1


def attrs_evolve(reply: troupe.Reply, **changes: object) -> troupe.Reply:
    import attrs

    return attrs.evolve(reply, **changes)


async def test_a_truncated_cache_file_costs_a_prefill_not_the_transcript(store: Path) -> None:
    expected = await _uninterrupted()
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.spawn("alice", system=SYSTEM)
        for m in MESSAGES[:2]:
            await alice.say(m, max_tokens=12)
    [kv_file] = (store / "kv").iterdir()
    data = kv_file.read_bytes()
    kv_file.write_bytes(data[: len(data) // 2])
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.get("alice")
        assert len(alice.transcript()) == 4
        third = await alice.say(MESSAGES[2], max_tokens=12)
        fourth = await alice.say("Thanks!", max_tokens=4)
    assert third.cached_tokens == 0
    assert third.tokens == expected[2].tokens
    assert fourth.cached_tokens > 0  # a fresh cache was made and kept
    assert not kv_file.exists()


async def test_a_killed_process_loses_no_acknowledged_turn(
    store: Path, troupe_env: dict[str, str]
) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, trio, troupe
        async def main():
            async with troupe.open_runtime(model={TINY!r}, store={str(store)!r}) as rt:
                bob = await rt.spawn("bob", system="You are Bob.")
                for i in range(2):
                    reply = await bob.say(f"message {{i}}", max_tokens=6)
                    print("ACK", i, repr(reply.text), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        trio.run(main)
        """
    )
    result = await trio.to_thread.run_sync(
        lambda: subprocess.run([PYTHON, "-c", script], env=troupe_env,
                               capture_output=True, text=True, timeout=300)
    )
    assert result.returncode == -9, result.stderr
    acked = [line for line in result.stdout.splitlines() if line.startswith("ACK")]
    assert len(acked) == 2
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        bob = await rt.get("bob")
        transcript = bob.transcript()
        assert [m.content for m in transcript if m.role == "user"] == ["message 0", "message 1"]
        assert [f"ACK {i} {m.content!r}" for i, m in enumerate(transcript[1::2])] == acked
        reply = await bob.say("message 2", max_tokens=6)
    assert reply.cached_tokens > 0


async def test_spawning_an_id_the_store_holds_is_refused(store: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        await rt.spawn("alice", system=SYSTEM)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        try:
            await rt.spawn("alice")
        except troupe.AgentExistsError:
            pass
        else:
            raise AssertionError("spawn of a stored id succeeded")
        assert (await rt.get("alice")).system == SYSTEM


async def test_leftover_files_of_an_uncommitted_turn_are_removed(store: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        await (await rt.spawn("alice")).say("Hello", max_tokens=4)
    [kept] = (store / "kv").iterdir()
    # Names as troupe writes them: a crash between the write and the commit leaves these.
    orphan = store / "kv" / "0123456789abcdef0123-0000009.safetensors"
    orphan.write_bytes(b"half a write")
    partial = store / "kv" / "0123456789abcdef0123-0000010.partial.safetensors"
    partial.write_bytes(b"")
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        reply = await (await rt.get("alice")).say("Again", max_tokens=4)
    assert reply.cached_tokens > 0
    names = {p.name for p in (store / "kv").iterdir()}
    assert orphan.name not in names
    assert partial.name not in names
    assert kept.name not in names
    assert len(names) == 1


async def test_in_memory_runtime_writes_nothing(tmp_path: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=None) as rt:
        assert rt.store is None
        await (await rt.spawn("a")).say("Hello", max_tokens=3)
        assert rt.statistics().caches_saved == 0


async def test_told_messages_persist_and_keep_the_cache_valid(store: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.spawn("alice", system=SYSTEM)
        first = await alice.say("Hello", max_tokens=6)
        await alice.tell("Bob says: the bridge is out.")
        await alice.say("Noted?", max_tokens=2)  # queued behind the tell: it has landed
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.get("alice")
        assert [m.content for m in alice.transcript()][:3] == [
            "Hello", first.text, "Bob says: the bridge is out."]
        reply = await alice.say("What did Bob say?", max_tokens=4)
    assert reply.cached_tokens > first.prompt_tokens
    assert rt.statistics().caches_loaded == 1


async def test_a_store_opened_with_another_model_keeps_transcripts_only(store: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        await (await rt.spawn("alice", system=SYSTEM)).say("Hello", max_tokens=4)
    async with troupe.open_runtime(model="embedded:small", store=store) as rt:
        alice = await rt.get("alice")
        assert len(alice.transcript()) == 2
        reply = await alice.say("Again", max_tokens=4)
    assert reply.cached_tokens == 0
    assert rt.statistics().caches_loaded == 0


async def test_a_store_takes_one_runtime_at_a_time(store: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        await rt.spawn("alice")
        with pytest.raises(troupe.StoreError, match="in use"):
            async with troupe.open_runtime(model=TINY, store=store):
                pass
        await (await rt.get("alice")).say("still mine", max_tokens=2)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert len((await rt.get("alice")).transcript()) == 2
