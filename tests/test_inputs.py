"""Validation at the door: what troupe accepts stays usable; what it refuses changes nothing."""

from __future__ import annotations

import math
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

import troupe
from conftest import PYTHON, TINY

SURROGATE = "bad \ud800 text"


async def test_text_that_cannot_possibly_fit_is_refused_before_tokenizing() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        alice = await rt.spawn("alice")
        bob = await rt.spawn("bob")
        with pytest.raises(troupe.ContextLengthError, match="at least") as refused:
            await alice.say("x" * 10_000_000)
        assert refused.value.needed > refused.value.limit == rt.model.context_length
        with pytest.raises(troupe.ContextLengthError, match="at least"):
            alice.stream("x" * 10_000_000)
        # Long but not hopeless: tokenized (in the long lane) and then refused exactly.
        with pytest.raises(troupe.ContextLengthError) as exact:
            await alice.say("y" * 10_000, max_tokens=4)
        assert exact.value.needed > 10_000 + 4
        assert (await bob.say("Hello", max_tokens=4)).tokens
        assert alice.transcript() == ()


async def test_told_messages_and_system_prompts_that_leave_no_room_are_refused(
    store: Path,
) -> None:
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        with pytest.raises(troupe.ContextLengthError):
            await rt.spawn("huge", system="S" * 1_000_000)
        with pytest.raises(troupe.ContextLengthError):
            await rt.spawn("big", system="S" * 2_100)  # 2,100 tokens > the 2,048 context
        assert rt.agent_ids() == ()
        alice = await rt.spawn("alice", system="You are Alice.")
        with pytest.raises(troupe.ContextLengthError):
            await alice.tell("h" * 1_000_000)
        with pytest.raises(troupe.ContextLengthError):
            await alice.tell("h" * 2_100)
        # What was accepted is usable.
        await alice.tell("h" * 1_000)
        reply = await alice.say("Hi", max_tokens=4)
        assert reply.tokens
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert rt.agent_ids() == ("alice",)
        assert len((await rt.get("alice")).transcript()) == 3


@pytest.mark.parametrize("with_store", [False, True])
async def test_lone_surrogates_are_refused_everywhere(with_store: bool, tmp_path: Path) -> None:
    store = tmp_path / "store" if with_store else None
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        alice = await rt.spawn("alice")
        with pytest.raises(ValueError, match="surrogate"):
            await alice.say(SURROGATE)
        with pytest.raises(ValueError, match="surrogate"):
            await alice.tell(SURROGATE)
        with pytest.raises(ValueError, match="surrogate"):
            alice.stream(SURROGATE)
        with pytest.raises(ValueError, match="surrogate"):
            await alice.say("Hi", stop=["\udfff"])
        with pytest.raises(ValueError, match="surrogate"):
            await rt.spawn("bob", system=SURROGATE)
        with pytest.raises(ValueError, match="surrogate"):
            await rt.spawn("bob\ud800")
        assert rt.agent_ids() == ("alice",)
        first = await alice.say("Hi", max_tokens=4)
        assert first.tokens
        assert alice.transcript()[0].content == "Hi"


async def test_the_id_alphabet_is_enforced(store: Path) -> None:
    bad = [" ", "a b", "\x7f", "a\x85b", "line\u2028break", "tab\t", "x" * 201, "", "é\u0301"]
    ids = ["alice", "Zoë-2", "team/alice", "a.b:c@d+e=f_g", "x" * 200, "村人7"]
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        for agent_id in bad:
            with pytest.raises(ValueError, match="agent id"):
                await rt.spawn(agent_id)
            with pytest.raises(ValueError, match="agent id"):
                await rt.get(agent_id)
        for agent_id in ids:
            await rt.spawn(agent_id)
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert rt.agent_ids() == tuple(ids)


async def test_temperatures_too_small_to_matter_are_greedy() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        replies = [
            await (await rt.spawn(f"a{i}", system="You are A.")).say(
                "Tell me a story.", max_tokens=24, temperature=t, seed=5)
            for i, t in enumerate([0.0, 1e-300, 1e-39, 1e-7])
        ]
    assert {r.tokens for r in replies} == {replies[0].tokens}


def test_stop_strings_are_bounded() -> None:
    with pytest.raises(ValueError, match="at most 16 stop strings"):
        troupe.Sampling(stop=[f"s{i}" for i in range(200_000)])
    with pytest.raises(ValueError, match="at most 256 characters"):
        troupe.Sampling(stop=["x" * 257])
    assert len(troupe.Sampling(stop=[f"s{i}" for i in range(16)]).stop) == 16


async def test_a_spawn_answered_during_close_agrees_with_the_store(store: Path) -> None:
    # Spawns race the close: each one either returns (and the agent is in the store) or
    # raises RuntimeClosedError (and it is not); never refused yet saved.
    outcomes: dict[str, bool] = {}

    async def spawn(rt: troupe.Runtime, agent_id: str) -> None:
        try:
            agent = await rt.spawn(agent_id)
        except troupe.RuntimeClosedError:
            outcomes[agent_id] = False
        else:
            outcomes[agent_id] = True
            with pytest.raises(troupe.RuntimeClosedError):
                await agent.say("Hello")

    async with trio.open_nursery() as nursery:
        async with troupe.open_runtime(model=TINY, store=store) as rt:
            for i in range(24):
                nursery.start_soon(spawn, rt, f"late{i}")
                for _ in range(i % 4):
                    await trio.lowlevel.checkpoint()
    assert len(outcomes) == 24
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        assert set(rt.agent_ids()) == {a for a, spawned in outcomes.items() if spawned}


async def test_a_cancelled_turn_is_recorded_whole_or_not_at_all(store: Path) -> None:
    # Cancel the same turn after each number of text deltas, up to all of them: before
    # the last token the cancel wins; after it the turn is committed. Either way memory
    # and store agree, nothing partial is ever recorded, and the caller knows which.
    async with troupe.open_runtime(model=TINY) as rt:
        agent = await rt.spawn("reference", system="You are R.")
        deltas = [d async for d in agent.stream("Tell me a story.", max_tokens=12)]
        full = "".join(deltas)
    recorded: dict[str, bool] = {}

    async def cancelled_after(agent: troupe.Agent, count: int) -> None:
        with trio.CancelScope() as scope:
            seen = 0
            async with agent.stream("Tell me a story.", max_tokens=12) as stream:
                async for _ in stream:
                    seen += 1
                    if seen == count:
                        scope.cancel()
        recorded[agent.id] = bool(agent.transcript())

    async with troupe.open_runtime(model=TINY, store=store) as rt:
        agents = [await rt.spawn(f"a{k}", system="You are R.") for k in range(len(deltas) + 1)]
        async with trio.open_nursery() as nursery:
            for k, agent in enumerate(agents):
                nursery.start_soon(cancelled_after, agent, k + 1)
        memory = {a.id: a.transcript() for a in agents}
    # Known as soon as the cancelled call returns: recorded exactly when the cancel came
    # after the last token (the last delta arrives with the turn's end).
    assert [recorded[a.id] for a in agents] == [k + 1 >= len(deltas) for k in range(len(agents))]
    async with troupe.open_runtime(model=TINY, store=store) as rt:
        for agent_id, transcript in memory.items():
            assert (await rt.get(agent_id)).transcript() == transcript
            assert transcript in ((), (troupe.Message("user", "Tell me a story."),
                                       troupe.Message("assistant", full)))


# Each bad option, and the error it must raise (its message naming the option).
BAD_OPTIONS: list[tuple[str, object, type[Exception]]] = [
    ("model", "", ValueError),
    ("model", None, TypeError),
    ("model", 3, TypeError),
    ("store", "", ValueError),  # once a store in the current directory
    ("store", "  ", ValueError),
    ("store", "a\0b", ValueError),
    ("store", 5, TypeError),
    ("store", b"dir", TypeError),
    ("max_batch_size", 0, ValueError),
    ("max_batch_size", 10**6, ValueError),
    ("max_batch_size", 2.5, TypeError),  # once failed inside anyio
    ("max_batch_size", True, TypeError),
    ("prefill_step_size", 0, ValueError),
    ("prefill_step_size", 10**12, ValueError),
    ("prefill_step_size", 1.5, TypeError),  # once killed the engine thread at the first turn
    ("prefill_step_size", math.nan, TypeError),
    ("prefill_step_size", math.inf, TypeError),
    ("mailbox_size", 0, ValueError),
    ("mailbox_size", 10**9, ValueError),
    ("mailbox_size", 2.5, TypeError),
    ("mailbox_size", math.inf, TypeError),
    ("kv_budget", "9" * 400 + "MB", ValueError),  # once an OverflowError
    ("kv_budget", "8EiB", ValueError),
    ("kv_budget", "4611686018427387905", ValueError),  # 2**62 + 1 bytes
    ("kv_budget", 2**62 + 1, ValueError),
    ("kv_budget", 10**5000, ValueError),  # too long to print: the message sizes it
    ("kv_budget", -1, ValueError),
    ("kv_budget", "1." + "0" * 40 + "1GB", ValueError),
    ("kv_budget", 1.5e9, TypeError),
    ("idle_timeout", math.inf, ValueError),  # once accepted
    ("idle_timeout", math.nan, ValueError),
    ("idle_timeout", 0, ValueError),
    ("idle_timeout", -1.0, ValueError),
    ("idle_timeout", 10**400, ValueError),  # beyond any float
    ("idle_timeout", True, TypeError),
    ("idle_timeout", "60", TypeError),
    ("block_size", 8, ValueError),
    ("block_size", 16.0, TypeError),
]


@pytest.mark.parametrize(("option", "value", "error"), BAD_OPTIONS,
                         ids=[f"{o}-{i}" for i, (o, _, _) in enumerate(BAD_OPTIONS)])
async def test_bad_options_are_refused_before_anything_starts(
    option: str, value: object, error: type[Exception], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    # A model that cannot load and a store not yet made: the option is refused first.
    options: dict[str, Any] = {"model": tmp_path / "no-model", "store": tmp_path / "store",
                               option: value}
    with pytest.raises(error, match=option) as refused:
        async with troupe.open_runtime(**options):
            pass
    assert len(str(refused.value)) < 200
    assert list(here.iterdir()) == []
    assert not (tmp_path / "store").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("troupe")]


async def test_options_at_their_bounds_are_accepted(store: Path) -> None:
    async with troupe.open_runtime(
        model=TINY, store=str(store), max_batch_size=1024, prefill_step_size=1 << 20,
        mailbox_size=1 << 16, kv_budget="1.5GiB", idle_timeout=10**9,
    ) as rt:
        assert rt.statistics().kv_budget == 3 * 2**29
        assert (await (await rt.spawn("alice")).say("Hi", max_tokens=4)).tokens
    async with troupe.open_runtime(model=TINY, kv_budget=" 0.5 kb ", idle_timeout=None) as rt:
        assert rt.statistics().kv_budget == 500


LONG_TURNS = """
import warnings
warnings.filterwarnings("ignore", message="troupe: MLX is using")  # the BLAS note
import trio
import troupe

async def main() -> None:
    async with troupe.open_runtime(model="embedded:tiny") as rt:
        alice = await rt.spawn("alice")
        for text in ("y" * 5_000, "y" * 10_000):  # tokenized in the short lane, the long
            try:
                await alice.say(text, max_tokens=4)
            except troupe.ContextLengthError as exc:
                print("refused", exc.needed > exc.limit)

trio.run(main)
"""


def test_a_prompt_too_long_is_reported_by_troupe_alone(troupe_env: dict[str, str]) -> None:
    # The tokenizer once warned on stderr about its own maximum length before troupe's
    # ContextLengthError: a user saw both.
    done = subprocess.run([PYTHON, "-c", LONG_TURNS], env=troupe_env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["refused True", "refused True"]
    assert done.stderr == ""
