"""A store whose file system the kernel turns read-only under a running runtime.

A plain ``mount -o remount,ro`` cannot do that: while a runtime holds its store, SQLite keeps
catalog.sqlite, -wal and -shm open read-write (and the store's lock file is open for
appending), and Linux refuses to remount a file system read-only while any file on it is
open for writing (EBUSY). What does turn a store read-only under a runtime is the kernel's
error handling: ext4 mounted with errors=remount-ro stops every write after an error (here
set off by /sys/fs/ext4/<device>/trigger_fs_error). It cannot be remounted read-write after
that, only unmounted, checked (e2fsck) and mounted again: so the runtime must say what is
wrong, fail each write as StoreError, close cleanly, and a reopen after the fsck must hold
every turn it acknowledged.

That last part took more than SQLite's fsync: ext4 can answer an fsync with 0 when the error
strikes during it, and lose the write (storage/_faults.py, failed_since_sync). Before the
catalog checked for that, about one trial in forty lost the turn acknowledged right after
the failure; two trials here rarely meet that window, the script below runs enough.

Real loop-mounted ext4 images, as root (CI runs as root); skipped with the reason otherwise.
``python tests/test_remount.py [TRIALS]`` runs many randomized trials of the subprocess test
and prints what each found; ``--fsync unchecked|checked`` runs the kernel's race alone.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest
import trio

import troupe
from conftest import PYTHON, TINY
from troupe.storage._asyncio_thread import AsyncioThread
from troupe.storage._blocks import KVFile
from troupe.storage._catalog import Catalog
from troupe.storage._faults import failed_since_sync
from troupe.storage._kvdir import KVDir, KVFiles, block_file_name

SYSTEM = "You are Alice, the town baker."
READ_ONLY = "the file system is read-only"


class Ext4Image:
    """An ext4 file system in an image file, loop-mounted with errors=remount-ro."""

    def __init__(self, image: Path, path: Path) -> None:
        self.image = image
        self.path = path
        self.mounted = False

    def make(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(64 << 20)
        _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(self.image))
        self.mount()

    def mount(self) -> None:
        _run("mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.path))
        self.mounted = True

    @property
    def device(self) -> str:
        """The loop device's name (loop0...), as /sys/fs/ext4 lists it."""
        source = _run("findmnt", "-n", "-o", "SOURCE", "--mountpoint", str(self.path))
        return Path(source.strip()).name

    def fail(self) -> None:
        """A file system error: ext4 stops every write from now on (errors=remount-ro)."""
        Path(f"/sys/fs/ext4/{self.device}/trigger_fs_error").write_text("1")

    def check(self) -> int:
        """Unmount, ``e2fsck -fy`` (replaying the journal) and mount again; e2fsck's code."""
        _run("umount", str(self.path))
        self.mounted = False
        done = subprocess.run(["e2fsck", "-fy", str(self.image)], capture_output=True,
                              text=True)
        # 0: clean; 1: errors corrected (the error ext4 recorded, counts it did not update).
        assert done.returncode in (0, 1), done.stdout + done.stderr
        self.mount()
        return done.returncode

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.mounted = False


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def _unavailable() -> str | None:
    """Why this machine cannot loop-mount an ext4 image and fail it, or None."""
    if os.geteuid() != 0:
        return "loop-mounting an ext4 image needs root (CI runs as root)"
    for tool in ("mkfs.ext4", "e2fsck", "mount", "umount", "findmnt"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Ext4Image]:
    why = _unavailable()
    if why is not None:
        pytest.skip(why)
    disk = Ext4Image(tmp_path / "ext4.img", tmp_path / "ext4")
    try:
        disk.make()
    except OSError as exc:
        pytest.skip(f"cannot loop-mount an ext4 image here: {exc}")
    try:
        if not Path(f"/sys/fs/ext4/{disk.device}/trigger_fs_error").exists():
            pytest.skip("this kernel has no /sys/fs/ext4/<device>/trigger_fs_error")
        yield disk
    finally:
        disk.unmount()


async def test_a_file_system_error_says_read_only_and_loses_no_turn(ext4: Ext4Image) -> None:
    store = ext4.path / "store"
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.spawn("alice", system=SYSTEM)
        first = await alice.say("Hello", max_tokens=8)
        transcript = alice.transcript()
        ext4.fail()
        # SQLite says only "disk I/O error", and statvfs still says read-write: the
        # message must say what the user has to do something about.
        with pytest.raises(troupe.StoreError, match=READ_ONLY) as refused:
            await alice.say("Are you there?", max_tokens=8)
        assert "fsck" in str(refused.value)
        with pytest.raises(troupe.StoreError, match=READ_ONLY):
            await rt.spawn("bob")
        with pytest.raises(troupe.StoreError, match=READ_ONLY):
            await alice.say("Still there?", max_tokens=8)
        assert alice.transcript() == transcript  # refused turns are not remembered
        assert rt.agent_ids() == ("alice",)
        assert rt.statistics().turns_failed == 2
    # Closing did not raise, though the catalog's checkpoint at close could not write.

    assert ext4.check() in (0, 1)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert rt.agent_ids() == ("alice",)
        alice = await rt.get("alice")
        assert alice.transcript() == transcript
        second = await alice.say("Are you there?", max_tokens=8)
        bob = await rt.spawn("bob")
        await bob.say("Hi", max_tokens=4)
    assert second.cached_tokens > first.prompt_tokens  # its cache was on disk, whole


async def test_a_write_the_file_system_may_not_have_kept_stops_the_catalog(
    ext4: Ext4Image,
) -> None:
    # ext4 can answer an fsync with 0 when an error aborted its journal during it, and
    # the write is then gone after the fsck (failed_since_sync). Such a commit is not
    # reported done, and the catalog takes nothing more. A write transaction that changes
    # nothing commits without writing to the WAL, so it stands for a commit whose fsync
    # said yes just before the file system failed.
    sqlite = AsyncioThread("test-sqlite")
    catalog, _ = await sqlite.run(Catalog.open, ext4.path / "catalog.sqlite", "model", None,
                                  KVFiles(ext4.path / "kv", 0, 0))
    try:
        await sqlite.run(catalog.add_agent, "alice", SYSTEM)
        ext4.fail()
        with pytest.raises(troupe.StoreError, match="may not be on disk") as refused:
            await sqlite.run(catalog.forget_tail, "nobody", "none.kvt")
        assert READ_ONLY in str(refused.value)
        with pytest.raises(troupe.StoreError, match="stopped until it is reopened"):
            await sqlite.run(catalog.agent_ids)
    finally:
        await sqlite.run(catalog.close)
        await sqlite.aclose()
    ext4.check()
    sqlite = AsyncioThread("test-sqlite")
    catalog, _ = await sqlite.run(Catalog.open, ext4.path / "catalog.sqlite", "model", None,
                                  KVFiles(ext4.path / "kv", 0, 0))
    try:
        assert await sqlite.run(catalog.agent_ids) == ["alice"]
    finally:
        await sqlite.run(catalog.close)
        await sqlite.aclose()


# -- a process that runs rounds of turns when the file system fails under it

ROUNDS = 100
"""Rounds a worker runs at most; the parent fails the file system within the first few."""

WORKER = textwrap.dedent(
    """
    import sys, trio, troupe

    store, agents, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    async def main() -> None:
        async with troupe.open_runtime(model=%(model)r, store=store) as rt:
            team = [await rt.spawn(f"agent{i}", system=f"You are agent {i}.")
                    for i in range(agents)]
            print("READY", flush=True)
            failed_rounds = 0
            for r in range(%(rounds)d):
                failed = False

                async def turn(agent: troupe.Agent) -> None:
                    nonlocal failed
                    try:
                        reply = await agent.say(f"round {r}", max_tokens=4)
                    except troupe.StoreError as exc:
                        failed = True
                        print("ERR", agent.id, r, repr(str(exc)), flush=True)
                    else:
                        # Printed only once say() returned: the turn is acknowledged.
                        print("ACK", agent.id, r, repr(reply.text), flush=True)

                async with trio.open_nursery() as nursery:
                    for agent in team:
                        nursery.start_soon(turn, agent)
                if failed:
                    failed_rounds += 1
                    if failed_rounds == 2:  # one more round after the error: all refused
                        break
            else:
                print("NO ERROR", flush=True)
                return
            print("FAILED", flush=True)
            if mode == "kill":
                sys.stdin.readline()  # the parent kills it here, the runtime still open
        print("CLOSED", flush=True)

    trio.run(main)
    """
) % {"model": TINY, "rounds": ROUNDS}


@attrs.frozen
class Trial:
    """What one worker acknowledged and what the store held after the fsck."""

    acked: dict[tuple[str, int], str]
    """(agent, round) -> reply text, for each turn the worker printed ACK for."""
    refused: set[tuple[str, int]]
    """Turns the worker saw fail with StoreError."""
    errors: list[str]
    """The StoreErrors' messages."""
    stored: dict[str, list[tuple[str, str]]]
    """Each agent's transcript after the reopen, as (role, content)."""
    fsck: int
    closed: bool
    """The worker closed its runtime (else it was killed)."""
    bad_files: list[str]
    """KV files the catalog names that are missing or fail their recorded checksum."""
    output: list[str] = attrs.field(repr=False)
    """The worker's lines."""

    def missing(self) -> list[tuple[str, int]]:
        """Acknowledged turns the store lost, or holds with another reply."""
        lost = []
        for (agent, r), text in self.acked.items():
            pairs = list(zip(self.stored.get(agent, [])[::2], self.stored.get(agent, [])[1::2],
                             strict=False))
            if (("user", f"round {r}"), ("assistant", text)) not in pairs:
                lost.append((agent, r))
        return sorted(lost)

    def holes(self) -> list[str]:
        """Agents whose stored rounds are not 0, 1, 2, ... in order (a turn lost between)."""
        bad = []
        for agent, messages in self.stored.items():
            users = [c for role, c in messages[::2] if role == "user"]
            if users != [f"round {r}" for r in range(len(users))]:
                bad.append(agent)
        return bad

    def phantoms(self) -> list[tuple[str, int]]:
        """Refused turns the store holds all the same (their commit reached the disk)."""
        return sorted(
            (agent, r) for agent, r in self.refused
            if any(c == f"round {r}" for role, c in self.stored.get(agent, []) if role == "user")
        )


def _kv_files_not_whole(store: Path) -> list[str]:
    """The KV files the catalog names that are missing or damaged (a read-only look)."""
    db = sqlite3.connect(f"file:{store / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        files = [KVFile(block_file_name(bytes(b), serial), n, c, serial)
                 for b, n, c, serial in db.execute(
                     "SELECT id, nbytes, checksum, serial FROM blocks")]
        files += [KVFile(f, n, c) for f, n, c in db.execute(
            "SELECT tail_file, tail_nbytes, tail_checksum FROM agents "
            "WHERE tail_file IS NOT NULL")]
    finally:
        db.close()
    bad = []
    for file in files:
        try:
            KVDir(store / "kv").read(file)
        except troupe.StoreError as exc:
            bad.append(str(exc))
    return bad


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    """The stream's lines, as they come."""
    pending = b""
    async for chunk in stream:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode()


async def run_trial(
    disk: Ext4Image, env: dict[str, str], *, agents: int, fail_at: int, mode: str,
    jitter: float = 0.0,
) -> Trial:
    """One worker on ``disk``: fail the file system once it has printed ``fail_at`` ACKs
    (after ``jitter`` seconds, trials only), stop it (``mode``: "close" lets it close,
    "kill" SIGKILLs it at its first StoreError, "kill-now" right after the failure), fsck,
    and read back what the store holds."""
    store = disk.path / "store"
    acked: dict[tuple[str, int], str] = {}
    refused: set[tuple[str, int]] = set()
    errors: list[str] = []
    output: list[str] = []
    stderr = bytearray()
    failed = False
    worker = await trio.lowlevel.open_process(
        [PYTHON, "-c", WORKER, str(store), str(agents), "close" if mode == "close" else "kill"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert worker.stdout is not None
    assert worker.stderr is not None

    async def drain(stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:  # its warnings must not fill the pipe and stall it
            stderr.extend(chunk)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, worker.stderr)
            async for line in _lines(worker.stdout):
                output.append(line)
                kind, *rest = line.split(" ", 3)
                if kind == "ACK":
                    acked[rest[0], int(rest[1])] = ast.literal_eval(rest[2])
                    if len(acked) == fail_at and not failed:
                        if jitter:
                            await trio.sleep(random.uniform(0, jitter))
                        disk.fail()  # mid-round: the round's other turns are under way
                        failed = True
                        if mode == "kill-now":
                            worker.kill()
                elif kind == "ERR":
                    refused.add((rest[0], int(rest[1])))
                    errors.append(ast.literal_eval(rest[2]))
                    if mode != "close":
                        worker.kill()
                elif kind == "FAILED" and mode != "close":
                    worker.kill()
            code = await worker.wait()
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    log = "\n".join(output) + "\n" + stderr.decode(errors="replace")[-4000:]
    assert failed, f"the worker ended before {fail_at} ACKs:\n{log}"
    closed = code == 0
    assert closed == (mode == "close"), f"exit {code}:\n{log}"

    fsck = disk.check()
    bad_files = _kv_files_not_whole(store)
    stored: dict[str, list[tuple[str, str]]] = {}
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        for agent_id in rt.agent_ids():
            agent = await rt.get(agent_id)
            stored[agent_id] = [(m.role, m.content) for m in agent.transcript()]
        # The store takes turns and agents again.
        await (await rt.get("agent0")).say("after the fsck", max_tokens=2)
        await rt.spawn("newcomer")
    return Trial(acked, refused, errors, stored, fsck, closed, bad_files, output)


@pytest.mark.parametrize("mode", ["close", "kill"])
async def test_an_acknowledged_turn_survives_a_file_system_error_and_fsck(
    mode: str, ext4: Ext4Image, troupe_env: dict[str, str]
) -> None:
    # Failed on the 10th ACK of 4 agents: mid-round 2, while its other turns commit.
    with trio.fail_after(300):  # a hung worker fails the test instead of the suite
        trial = await run_trial(ext4, troupe_env, agents=4, fail_at=10, mode=mode)
    assert len(trial.acked) >= 10
    assert trial.missing() == []
    assert trial.holes() == []
    assert trial.refused, "the worker met no error"
    assert all(READ_ONLY in message for message in trial.errors), trial.errors


def fsync_trial(disk: Ext4Image, rng: random.Random, *, check: bool) -> tuple[int, int]:
    """The kernel alone, no SQLite: append 4 KiB and fdatasync in a loop while ``disk``
    fails. Returns the bytes the fdatasyncs acknowledged (with ``check``, only those
    ``failed_since_sync`` then let stand) and the bytes on disk after the fsck."""
    path = disk.path / "log"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    acked = 0

    def append() -> None:
        nonlocal acked
        written = 0
        with contextlib.suppress(OSError):
            while True:
                written += os.write(fd, os.urandom(4096))
                os.fdatasync(fd)
                if check and failed_since_sync(path) is not None:
                    return
                acked = written

    writer = threading.Thread(target=append)
    writer.start()
    time.sleep(rng.uniform(0.005, 0.1))
    disk.fail()
    writer.join()
    os.close(fd)
    disk.check()
    return acked, path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trials", type=int, nargs="?", default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="write each worker's output here")
    parser.add_argument("--fsync", choices=["unchecked", "checked"],
                        help="run fsync_trial instead: the kernel's fdatasync alone")
    args = parser.parse_args()
    why = _unavailable()
    if why is not None:
        raise SystemExit(why)
    rng = random.Random(args.seed)
    if args.fsync:
        lost = 0
        for n in range(args.trials):
            base = Path(tempfile.mkdtemp(prefix="troupe-fsync-"))
            disk = Ext4Image(base / "ext4.img", base / "ext4")
            try:
                disk.make()
                acked, kept = fsync_trial(disk, rng, check=args.fsync == "checked")
            finally:
                disk.unmount()
                shutil.rmtree(base, ignore_errors=True)
            lost += kept < acked
            print(f"trial {n}: acknowledged {acked} bytes, {kept} on disk after the fsck"
                  f"{'  LOST' if kept < acked else ''}", flush=True)
        print(f"{args.fsync}: {lost} of {args.trials} trials lost acknowledged bytes")
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    totals = {"trials": 0, "acked": 0, "missing": 0, "holes": 0, "phantoms": 0,
              "refused": 0, "bad_files": 0, "not_read_only": 0}
    by_mode: dict[str, int] = {}

    async def trials() -> None:
        for n in range(args.trials):
            agents = rng.choice([2, 4, 6])
            fail_at = rng.randint(1, agents * 8)
            mode = rng.choice(["close", "kill", "kill-now"])
            jitter = rng.choice([0.0, 0.005, 0.02, 0.05])
            base = Path(tempfile.mkdtemp(prefix="troupe-remount-"))
            disk = Ext4Image(base / "ext4.img", base / "ext4")
            try:
                disk.make()
                trial = await run_trial(disk, env, agents=agents, fail_at=fail_at, mode=mode,
                                        jitter=jitter)
            finally:
                disk.unmount()
                shutil.rmtree(base, ignore_errors=True)
            if args.keep:
                await trio.Path(args.keep / f"trial-{n}.log").write_text(
                    "\n".join(trial.output) + "\n")
            totals["trials"] += 1
            totals["acked"] += len(trial.acked)
            totals["missing"] += len(trial.missing())
            totals["holes"] += len(trial.holes())
            totals["phantoms"] += len(trial.phantoms())
            totals["refused"] += len(trial.refused)
            totals["bad_files"] += len(trial.bad_files)
            totals["not_read_only"] += sum(READ_ONLY not in e for e in trial.errors)
            by_mode[mode] = by_mode.get(mode, 0) + 1
            print(f"trial {n}: agents={agents} fail_at={fail_at} mode={mode} "
                  f"jitter={jitter} acked={len(trial.acked)} refused={len(trial.refused)} "
                  f"missing={trial.missing()} holes={trial.holes()} "
                  f"phantoms={trial.phantoms()} fsck={trial.fsck} "
                  f"bad_files={trial.bad_files}", flush=True)

    trio.run(trials)
    print("totals:", totals, "modes:", by_mode)


if __name__ == "__main__":
    main()
