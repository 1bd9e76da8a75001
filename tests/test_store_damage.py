"""The store trusts nothing it reads back.

A lost or replaced catalog never erases the block files beside it; no path comes from the
catalog; a second process is kept out however the lock file is treated; every damaged
block of a rebuilt prefix is written again; damaged messages are caught and repaired with
one command; and ``troupe store check`` finds each kind of damage made here. All on real
files: truncated, deleted, edited with sqlite3, linked out of the store.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import textwrap
from pathlib import Path

import pytest
import trio

import troupe
from conftest import PYTHON, TINY
from troupe._cli import main as cli
from troupe.storage._kvdir import block_file_name

WORLD = ("You are a villager of Oakmoor, a quiet town by the river. The baker rises at "
         "dawn, the smith works until dusk, and everyone meets at the well at noon.")


def _names(store: Path) -> set[str]:
    return {p.name for p in (store / "kv").iterdir()}


def _sql(store: Path, statement: str, *args: object) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(store / "catalog.sqlite")) as db, db:
        return db.execute(statement, args).fetchall()


def _chain_files(store: Path, agent_id: str) -> list[Path]:
    """The files of ``agent_id``'s chain of blocks, in order."""
    [(chain,)] = _sql(store, "SELECT chain FROM agents WHERE id = ?", agent_id)
    assert isinstance(chain, bytes)
    serials = dict(_sql(store, "SELECT id, serial FROM blocks"))
    ids = [chain[i : i + 16] for i in range(0, len(chain), 16)]
    return [store / "kv" / block_file_name(b, int(str(serials[b]))) for b in ids]


def _check(store: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """``troupe store check``: its exit code and its lines."""
    capsys.readouterr()
    code = cli(["store", "check", str(store)])
    return code, capsys.readouterr().out.splitlines()


async def _village(store: Path, **options: object) -> dict[str, troupe.Reply]:
    """Two agents with a turn each: alice's prompt spans several 16-token blocks."""
    async with troupe.open_runtime(model=TINY, store=store, block_size=16, **options) as rt:
        alice = await rt.spawn("alice", system=WORLD)
        bob = await rt.spawn("bob", system="You are Bob.")
        return {"alice": await alice.say("Good morning!", max_tokens=8),
                "bob": await bob.say("Hello", max_tokens=8)}


async def _reference(messages: list[str]) -> list[troupe.Reply]:
    async with troupe.open_runtime(model=TINY, block_size=16) as rt:
        alice = await rt.spawn("alice", system=WORLD)
        return [await alice.say(m, max_tokens=8) for m in messages]


@pytest.mark.parametrize("loss", ["truncated", "deleted"])
async def test_a_lost_catalog_is_refused_and_erases_nothing(
    loss: str, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _village(store)
    files = {p.name: p.read_bytes() for p in (store / "kv").iterdir()}
    assert len(files) > 5
    catalog = store / "catalog.sqlite"
    if loss == "truncated":
        catalog.write_bytes(b"")
    else:
        catalog.unlink()
    for _ in range(2):  # refused again: the first refusal changed nothing
        with pytest.raises(troupe.StoreError,
                           match=rf"empty or missing, but .* holds {len(files)} KV files"):
            async with troupe.open_runtime(model=TINY, store=store):
                pass
    assert {p.name: p.read_bytes() for p in (store / "kv").iterdir()} == files
    code, lines = _check(store, capsys)
    assert code == 1
    assert lines == [f"the catalog is empty or missing, but kv/ holds {len(files)} KV files: "
                     "put the store's catalog.sqlite back (with its -wal file)"]


async def test_a_catalog_older_than_its_files_is_refused_until_repaired(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _village(store)
    backup = store.parent / "backup.sqlite"
    shutil.copy(store / "catalog.sqlite", backup)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        await (await rt.get("alice")).say("Later that day...", max_tokens=8)
    newer = _names(store)
    shutil.copy(backup, store / "catalog.sqlite")  # a catalog restored from a backup
    with pytest.raises(troupe.StoreError, match="older than its files"):
        async with troupe.open_runtime(model=TINY, store=store):
            pass
    assert _names(store) == newer  # nothing was deleted
    code, lines = _check(store, capsys)
    assert code == 1
    assert any("the catalog is older than its files" in line for line in lines)

    assert cli(["store", "repair", str(store)]) == 0
    set_aside = {p.name for p in (store / "orphaned").iterdir()}
    assert set_aside
    assert set_aside <= newer
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.get("alice")
        assert len(alice.transcript()) == 2  # the backup's transcript
        reply = await alice.say("Later that day...", max_tokens=8)
    assert reply.cached_tokens > 0
    assert _check(store, capsys)[0] == 0


async def test_an_opening_deletes_only_what_its_catalog_names_as_garbage(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _village(store)
    kv = store / "kv"
    # Left by a turn of an earlier opening that never committed (a crash): garbage.
    crashed = kv / f"{'ab' * 16}.{(1 << 32) | 99:016x}.kvb"
    crashed.write_bytes(b"a block whose commit never came")
    staging = kv / f"{'cd' * 16}.{(1 << 32) | 98:016x}.kvb.partial"
    staging.write_bytes(b"half a write")
    # Not troupe's: left alone.
    (kv / "notes.txt").write_text("mine")
    code, lines = _check(store, capsys)
    assert code == 1
    assert any(line.startswith("note: kv/" + crashed.name) for line in lines)
    assert "kv/notes.txt: not a file troupe writes" in "\n".join(lines)
    before = _names(store)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        await (await rt.get("alice")).say("Again", max_tokens=4)
    after = _names(store)
    assert crashed.name not in after
    assert staging.name not in after
    assert (kv / "notes.txt").read_text() == "mine"
    assert after >= before - {crashed.name, staging.name} - {
        p for p in before if p.endswith(".kvt")}  # only replaced tails went besides


async def test_paths_in_the_catalog_never_lead_outside_the_store(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = await _reference(["Good morning!", "And the bread?"])
    await _village(store)
    victim = tmp_path / "victim" / "secret.txt"
    victim.parent.mkdir()
    victim.write_text("not KV")
    [(nbytes,)] = _sql(store, "SELECT tail_nbytes FROM agents WHERE id = 'alice'")
    _sql(store, "UPDATE agents SET tail_file = ? WHERE id = 'alice'", "../../victim/secret.txt")
    # A block file swapped for a link to a file outside the store, of the same length.
    outside = tmp_path / "outside.kvb"
    first_block = _chain_files(store, "alice")[0]
    shutil.copy(first_block, outside)
    first_block.unlink()
    first_block.symlink_to(outside)
    code, lines = _check(store, capsys)
    assert code == 1
    assert any("'../../victim/secret.txt'" in line and "not a name troupe gives it" in line
               for line in lines)
    assert any(first_block.name in line and "symbolic link" in line for line in lines)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        reply = await (await rt.get("alice")).say("And the bread?", max_tokens=8)
        assert rt.statistics().rebuilds == 1
    assert reply.tokens == expected[1].tokens
    assert reply.cached_tokens == 0
    assert victim.read_text() == "not KV"
    assert outside.exists()
    assert not first_block.is_symlink()  # the link went, not what it pointed at
    assert nbytes


async def test_a_kv_folder_that_links_out_of_the_store_is_refused(
    store: Path, tmp_path: Path
) -> None:
    await _village(store)
    elsewhere = tmp_path / "elsewhere"
    (store / "kv").rename(elsewhere)
    (store / "kv").symlink_to(elsewhere)
    before = {p.name for p in elsewhere.iterdir()}
    with pytest.raises(troupe.StoreError, match="symbolic link"):
        async with troupe.open_runtime(model=TINY, store=store):
            pass
    assert {p.name for p in elsewhere.iterdir()} == before


async def test_a_second_process_is_kept_out_even_when_the_lock_file_is_deleted(
    store: Path, troupe_env: dict[str, str]
) -> None:
    script = textwrap.dedent(
        f"""
        import trio, troupe
        async def main():
            try:
                async with troupe.open_runtime(model={TINY!r}, store={str(store)!r}):
                    print("OPENED")
            except troupe.StoreError as exc:
                print("REFUSED", exc)
        trio.run(main)
        """
    )
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.spawn("alice")
        (store / "lock").unlink()
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run([PYTHON, "-c", script], env=troupe_env,
                                   capture_output=True, text=True, timeout=300))
        assert result.stdout.startswith("REFUSED"), result.stdout + result.stderr
        assert "in use by another runtime" in result.stdout
        await alice.say("still mine", max_tokens=2)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert len((await rt.get("alice")).transcript()) == 2


@pytest.mark.parametrize("damage", ["deleted", "directory"])
async def test_every_damaged_block_of_a_rebuilt_prefix_is_written_again(
    damage: str, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = await _reference(["Good morning!", "And the bread?", "Thanks"])
    await _village(store)
    chain = _chain_files(store, "alice")
    assert len(chain) >= 4
    for lost in (chain[1], chain[3]):
        lost.unlink()
        if damage == "directory":
            lost.mkdir()
    code, lines = _check(store, capsys)
    assert code == 1
    assert sum(1 for line in lines if chain[1].name in line or chain[3].name in line) == 2
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        second = await (await rt.get("alice")).say("And the bread?", max_tokens=8)
        assert rt.statistics().rebuilds == 1
    assert second.tokens == expected[1].tokens
    assert 0 < second.cached_tokens < expected[1].cached_tokens
    if damage == "directory":  # set aside, not left to take the name forever
        assert {p.name for p in (store / "damaged").iterdir()} == {chain[1].name,
                                                                    chain[3].name}
    assert _check(store, capsys)[0] == 0
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        third = await (await rt.get("alice")).say("Thanks", max_tokens=8)
        assert rt.statistics().rebuilds == 0  # nothing is rebuilt twice
    assert third.tokens == expected[2].tokens
    assert third.cached_tokens == expected[2].cached_tokens


async def test_a_damaged_tail_counts_as_a_rebuild(store: Path) -> None:
    expected = await _reference(["Good morning!", "And the bread?"])
    await _village(store)
    [(name,)] = _sql(store, "SELECT tail_file FROM agents WHERE id = 'alice'")
    tail = store / "kv" / str(name)
    tail.write_bytes(tail.read_bytes()[:-4])
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        reply = await (await rt.get("alice")).say("And the bread?", max_tokens=8)
        assert rt.statistics().rebuilds == 1
    assert reply.tokens == expected[1].tokens


@pytest.mark.parametrize("damage", ["edited", "deleted", "count"])
async def test_a_damaged_transcript_is_refused_for_that_agent_alone_and_repaired(
    damage: str, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.spawn("alice", system=WORLD)
        for m in ("One", "Two", "Three"):
            await alice.say(m, max_tokens=4)
        await (await rt.spawn("bob")).say("Hello", max_tokens=4)
    if damage == "edited":  # one byte of message 2 ("Two")
        _sql(store, "UPDATE messages SET content = 'Twp' WHERE agent_id = 'alice' AND seq = 2")
    elif damage == "deleted":
        _sql(store, "DELETE FROM messages WHERE agent_id = 'alice' AND seq = 2")
    else:
        _sql(store, "DELETE FROM messages WHERE agent_id = 'alice' AND seq = 5")
    code, lines = _check(store, capsys)
    assert code == 1
    assert all(line.startswith("agent 'alice': ") for line in lines), lines
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        with pytest.raises(troupe.AgentDamagedError, match="'alice'") as refused:
            await rt.get("alice")
        assert refused.value.agent_id == "alice"
        assert isinstance(refused.value, troupe.StoreError)
        await (await rt.get("bob")).say("Still here?", max_tokens=4)  # the others go on
    capsys.readouterr()
    assert cli(["store", "repair", str(store)]) == 0
    printed = capsys.readouterr().out
    kept = 5 if damage == "count" else 2
    assert f"agent 'alice': kept {kept} of its messages" in printed
    assert _check(store, capsys)[0] == 0
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.get("alice")
        assert [m.content for m in alice.transcript()][::2] == ["One", "Two", "Three"][
            : (kept + 1) // 2]
        await alice.say("Four", max_tokens=4)
        assert len(alice.transcript()) == kept + 2
        assert alice.statistics().turns == (kept + 2) // 2


async def test_a_store_keeps_its_block_size(store: Path) -> None:
    await _village(store)  # made with blocks of 16 tokens
    with pytest.raises(troupe.StoreError, match="blocks of 16 tokens, not 128"):
        async with troupe.open_runtime(model=TINY, store=store, block_size=128):
            pass
    async with troupe.open_runtime(model=TINY, store=store) as rt:  # the store's size
        reply = await (await rt.get("alice")).say("And the bread?", max_tokens=8)
    assert reply.cached_tokens > 16


async def test_store_ls_lists_agents_with_their_turns_and_kv(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replies = await _village(store)
    capsys.readouterr()
    assert cli(["store", "ls", str(store)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["agent", "turns", "messages", "kv", "tokens", "kv", "bytes"]
    table = {row.split()[0]: [int(x) for x in row.split()[1:]] for row in rows}
    assert set(table) == {"alice", "bob"}
    turns, messages, tokens, nbytes = table["alice"]
    assert (turns, messages) == (1, 2)
    covered = replies["alice"].prompt_tokens + len(replies["alice"].tokens) - 1
    assert tokens == covered  # all but the reply's last token, which was never fed
    assert nbytes > 0
    assert cli(["store", "ls", str(store.parent / "nowhere")]) == 2
    assert "not a troupe store" in capsys.readouterr().err


async def test_check_and_repair_wait_for_the_runtime_to_close(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        await rt.spawn("alice")
        assert cli(["store", "check", str(store)]) == 2
        assert "in use by another runtime" in capsys.readouterr().err
        assert cli(["store", "ls", str(store)]) == 0
    assert cli(["store", "check", str(store)]) == 0


def _as_schema_3(store: Path) -> None:
    """Turn a store into what troupe wrote before generations and checksums (schema 3):
    the same rows without the new columns, files under their old names."""
    kv = store / "kv"
    with contextlib.closing(sqlite3.connect(store / "catalog.sqlite")) as db, db:
        for block_id, serial in db.execute("SELECT id, serial FROM blocks").fetchall():
            (kv / block_file_name(block_id, serial)).rename(kv / block_file_name(block_id, 0))
        for agent_id, name in db.execute(
                "SELECT id, tail_file FROM agents WHERE tail_file IS NOT NULL").fetchall():
            old = name.replace(".", "-", 1)
            (kv / name).rename(kv / old)
            db.execute("UPDATE agents SET tail_file = ? WHERE id = ?", (old, agent_id))
        for table, column in (("agents", "message_count"), ("agents", "checksum"),
                              ("messages", "checksum"), ("blocks", "serial")):
            db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("DELETE FROM meta WHERE key IN ('generation', 'block_size')")
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")


async def test_a_store_of_the_previous_schema_is_upgraded_with_its_caches(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = await _reference(["Good morning!", "And the bread?"])
    await _village(store)
    _as_schema_3(store)
    old_names = _names(store)
    # A crash of the old troupe left an orphan under an old name: garbage as before.
    orphan = store / "kv" / f"{'ef' * 16}.kvb"
    orphan.write_bytes(b"never committed")
    async with troupe.open_runtime(model=TINY, store=store, block_size=16) as rt:
        alice = await rt.get("alice")
        assert alice.transcript()[0].content == "Good morning!"
        reply = await alice.say("And the bread?", max_tokens=8)
        assert rt.statistics().rebuilds == 0
    assert reply.tokens == expected[1].tokens
    assert reply.cached_tokens == expected[1].cached_tokens
    assert not orphan.exists()
    assert old_names - _names(store) <= {n for n in old_names if n.endswith(".kvt")}
    assert _check(store, capsys)[0] == 0


async def test_a_kv_folder_deleted_mid_run_heals_without_a_restart(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = await _reference(["Good morning!", "And the bread?", "Thanks"])
    async with troupe.open_runtime(model=TINY, store=store, block_size=16) as rt:
        alice = await rt.spawn("alice", system=WORLD)
        bob = await rt.spawn("bob", system=WORLD + " You are Bob.")
        await alice.say("Good morning!", max_tokens=8)
        await bob.say("Good morning!", max_tokens=8)
        shutil.rmtree(store / "kv")
        # Their KV is still in memory: each next commit writes it again.
        second = await alice.say("And the bread?", max_tokens=8)
        await bob.say("And the bread?", max_tokens=8)
        assert rt.statistics().rebuilds == 0
    assert second.tokens == expected[1].tokens
    assert _check(store, capsys)[0] == 0  # no row points at a file that went
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        third = await (await rt.get("alice")).say("Thanks", max_tokens=8)
        again = await (await rt.get("bob")).say("Thanks", max_tokens=8)
        assert rt.statistics().rebuilds == 0
    assert third.tokens == expected[2].tokens
    assert third.cached_tokens == expected[2].cached_tokens
    assert again.cached_tokens > 16 * 4
