"""Faults of the disk and the store: each fails one request as StoreError, and heals.

Injected at real seams: a small tmpfs that really fills up, a read-only mount, files
truncated, overwritten or swapped on disk, a directory where a file should be.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import pytest

import troupe
from conftest import TINY, SmallDisk
from troupe.storage._blocks import KVFile, payload_checksum
from troupe.storage._kvdir import KVDir

SYSTEM = "You are Alice, the town baker."


def _tail_file(store: Path, agent_id: str) -> Path:
    """The file holding ``agent_id``'s partial last block (named after the agent)."""
    prefix = hashlib.sha256(agent_id.encode()).hexdigest()[:20]
    [path] = (store / "kv").glob(f"{prefix}.*.kvt")
    return path


async def test_a_full_disk_fails_each_request_and_heals_when_space_returns(
    small_disk: SmallDisk,
) -> None:
    store = small_disk.path / "store"
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.spawn("alice", system=SYSTEM)
        first = await alice.say("Hello", max_tokens=8)
        small_disk.fill()
        with pytest.raises(troupe.StoreError) as refused:
            await rt.spawn("bob")
        if small_disk.kind == "tmpfs":
            assert "the disk is full" in str(refused.value)
        with pytest.raises(troupe.StoreError):
            await alice.say("Are you there?", max_tokens=8)
        assert len(alice.transcript()) == 2  # the refused turn is not remembered
        # A tell nobody waits for is kept in memory and goes with the next commit.
        await alice.tell("Bob says the bridge is out.")
        assert rt.agent_ids() == ("alice",)

        small_disk.free()
        bob = await rt.spawn("bob")  # the same store, no restart
        await bob.say("Hi", max_tokens=4)
        second = await alice.say("Are you there?", max_tokens=8)
        assert second.cached_tokens > first.prompt_tokens  # the cache survived in memory
        transcript = alice.transcript()
        assert [m.content for m in transcript][2] == "Bob says the bridge is out."
        assert rt.statistics().turns_failed == 1
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert rt.agent_ids() == ("alice", "bob")
        alice = await rt.get("alice")
        assert alice.transcript() == transcript
        third = await alice.say("Goodbye", max_tokens=4)
    assert third.cached_tokens > second.cached_tokens  # restored from disk


async def test_reopening_a_full_store_says_the_disk_is_full(small_disk: SmallDisk) -> None:
    store = small_disk.path / "store"
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        await (await rt.spawn("alice")).say("Hello", max_tokens=4)
    small_disk.fill()
    with pytest.raises(troupe.StoreError) as refused:
        async with troupe.open_runtime(model=TINY, store=store):
            pass
    if small_disk.kind == "tmpfs":
        assert "the disk is full" in str(refused.value)
    small_disk.free()
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert len((await rt.get("alice")).transcript()) == 2


async def test_a_cache_that_cannot_be_written_keeps_the_turn(store: Path) -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        reference = await rt.spawn("alice", system=SYSTEM)
        expected = [await reference.say(m, max_tokens=8) for m in ("One", "Two", "Three")]
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.spawn("alice", system=SYSTEM)
        await alice.say("One", max_tokens=8)
        # A file where the kv/ folder must be: every KV write of the turn fails.
        shutil.rmtree(store / "kv")
        (store / "kv").write_text("in the way")
        second = await alice.say("Two", max_tokens=8)
        assert second.tokens == expected[1].tokens
        assert len(alice.transcript()) == 4
        stats = rt.statistics()
        assert (stats.caches_saved, stats.caches_unsaved) == (1, 1)
        (store / "kv").unlink()
        third = await alice.say("Three", max_tokens=8)  # the KV in memory still serves
        assert third.cached_tokens == expected[2].cached_tokens
        assert rt.statistics().caches_saved == 2  # and the store heals on its own
        transcript = alice.transcript()
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.get("alice")
        assert alice.transcript() == transcript
        fourth = await alice.say("Four", max_tokens=4)
    assert fourth.cached_tokens > third.cached_tokens


async def test_stray_entries_in_the_kv_folder_are_skipped(store: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        await (await rt.spawn("alice")).say("Hello", max_tokens=4)
    (store / "kv" / "notes").mkdir()
    (store / "kv" / "notes" / "mine.txt").write_text("keep me")
    (store / "kv" / "README").write_text("keep me too")
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        reply = await (await rt.get("alice")).say("Again", max_tokens=4)
    assert reply.cached_tokens > 0
    assert (store / "kv" / "notes" / "mine.txt").read_text() == "keep me"
    assert (store / "kv" / "README").read_text() == "keep me too"


async def test_a_cache_file_replaced_by_a_directory_costs_a_prefill(store: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        await (await rt.spawn("alice", system=SYSTEM)).say("Hello", max_tokens=4)
    kv = _tail_file(store, "alice")
    kv.unlink()
    kv.mkdir()
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.get("alice")
        again = await alice.say("Again", max_tokens=4)
        more = await alice.say("More", max_tokens=4)
    assert again.cached_tokens == 0
    assert more.cached_tokens > 0


async def test_a_vanished_kv_folder_is_made_again_on_the_next_write(store: Path) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.spawn("alice", system=SYSTEM)
        await alice.say("Hello", max_tokens=4)
        shutil.rmtree(store / "kv")
        await alice.say("Still there?", max_tokens=4)
        assert _tail_file(store, "alice").is_file()
        assert rt.statistics().caches_unsaved == 0
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        reply = await (await rt.get("alice")).say("And now?", max_tokens=4)
    assert reply.cached_tokens > 0


@pytest.mark.parametrize("where", ["read-only", "proc", "sys", "parent-is-a-file"])
async def test_a_store_that_cannot_be_made_is_a_store_error(
    where: str, tmp_path: Path, read_only_dir: Path
) -> None:
    (tmp_path / "file").write_text("not a directory")
    path, says = {
        "read-only": (read_only_dir / "store", "read-only"),
        "proc": (Path("/proc/troupe-store"), ""),
        "sys": (Path("/sys/troupe-store"), ""),
        "parent-is-a-file": (tmp_path / "file" / "store", "not a directory"),
    }[where]
    if where == "read-only" and read_only_dir == Path("/proc"):
        says = ""  # no read-only mount without root: /proc stands in
    with pytest.raises(troupe.StoreError, match="cannot make the store") as refused:
        async with troupe.open_runtime(model=TINY, store=path):
            pass
    assert says in str(refused.value)


def _corruptions(data: bytes, rng: random.Random) -> list[bytes]:
    """32 ways a file of the same length can be wrong."""
    out = []
    for _ in range(32):
        damaged = bytearray(data)
        start = rng.randrange(len(data))
        length = rng.randint(1, 64)
        for i in range(start, min(len(data), start + length)):
            damaged[i] = rng.choice([0, 0xFF, rng.randrange(256)])
        if damaged == data:
            damaged[start] ^= 0x01
        out.append(bytes(damaged))
    return out


async def test_damaged_cache_files_are_detected(store: Path) -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        references = {}
        for name in ("a", "b", "c", "d"):
            agent = await rt.spawn(name, system=f"You are {name.upper()}.")
            await agent.say("Hello there", max_tokens=8)
            references[name] = await agent.say("Go on", max_tokens=8)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        for name in references:
            agent = await rt.spawn(name, system=f"You are {name.upper()}.")
            await agent.say("Hello there", max_tokens=8)
    files = {name: _tail_file(store, name) for name in references}
    clean = {name: path.read_bytes() for name, path in files.items()}
    assert len(clean["a"]) == len(clean["d"]), "the swap below needs files of one length"

    # Any of 32 random overwrites of one file is caught by the checksum, and by the
    # SHA-256 digest that files recorded by earlier commits carry.
    recorded = KVFile(files["a"].name, len(clean["a"]), payload_checksum([clean["a"]]))
    assert recorded.checksum.startswith("crc32:")
    earlier = KVFile(files["a"].name, len(clean["a"]), hashlib.sha256(clean["a"]).hexdigest())
    for record in (recorded, earlier):
        assert KVDir(files["a"].parent).read(record) == clean["a"]
    for damaged in _corruptions(clean["a"], random.Random(7)):
        files["a"].write_bytes(damaged)
        for record in (recorded, earlier):
            with pytest.raises(troupe.StoreError, match="damaged"):
                KVDir(files["a"].parent).read(record)

    # End to end: overwritten in the middle, zeroed, an inf in a tensor, another agent's
    # file of the same length. Each costs a prefill, and the reply is what it should be.
    middle = bytearray(clean["a"])
    middle[len(middle) // 2 : len(middle) // 2 + 16] = os.urandom(16)
    files["a"].write_bytes(bytes(middle))
    files["b"].write_bytes(b"\0" * len(clean["b"]))
    with_inf = bytearray(clean["c"])
    with_inf[-8:-4] = bytes.fromhex("0000807f")  # float32 +inf, little-endian
    files["c"].write_bytes(bytes(with_inf))
    files["d"].write_bytes(clean["a"])
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        cached = {}
        for name, expected in references.items():
            reply = await (await rt.get(name)).say("Go on", max_tokens=8)
            cached[name] = reply.cached_tokens
            assert reply.tokens == expected.tokens, name
        assert rt.statistics().caches_loaded == 0
    # Nothing came from the damaged files: "a" prefilled all, the others all but the start
    # their prompts share with a's ("You are "), which a's new tail lent them.
    assert cached["a"] == 0
    assert 0 < cached["b"] == cached["c"] == cached["d"] < len("<|system|>\nYou are ")
