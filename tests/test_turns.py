"""Turns on the real embedded model: cache reuse, batching, streaming, sampling."""

from __future__ import annotations

from functools import partial

import attrs
import pytest
import trio
import trio.testing

import troupe
from conftest import TINY
from troupe.actors._mlx import eager_default

# A reply's last token, which no step fed when steps are eager (see tests/test_batch.py):
# the next turn prefills it.
UNFED = 1 if eager_default() else 0

SYSTEMS = [
    "You are Alice, the town baker.",
    "You are Bob, the blacksmith, and you talk a lot about iron.",
    "You are Carol, the innkeeper. Rumours are your trade.",
    "You are Dave.",
]


async def test_second_turn_prefills_only_the_new_message() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        alice = await rt.spawn("alice", system=SYSTEMS[0])
        first = await alice.say("Good morning!", max_tokens=16)
        assert first.cached_tokens == 0
        assert first.finish_reason == "length"
        second = await alice.say("And you?", max_tokens=16)
    # The cache covers the first prompt and every generated token but the last (with
    # eager steps, no step fed it); what is new is that token, the end-of-turn marker the
    # template closes the reply with, then the user's message:
    # "<|end|>\n<|user|>\nAnd you?<|end|>\n<|assistant|>\n".
    assert second.cached_tokens == first.prompt_tokens + len(first.tokens) - UNFED
    assert second.prompt_tokens == len("And you?") + 8 + UNFED


@pytest.mark.parametrize("shared", [False, True], ids=["own-prompts", "shared-prefix"])
async def test_concurrent_greedy_replies_match_one_at_a_time(shared: bool) -> None:
    messages = ["Good morning!", "What news from the road?", "Is the bridge open?", "Hi."]
    # Shared: the systems start with one long world prompt (blocks of 16, prefilled in
    # chunks of 32), so the turns wait for its blocks and join the batch mid-decode.
    world = "The village of Millbrook sits by a river; a storm is coming. " * 5
    systems = [world + s for s in SYSTEMS] if shared else SYSTEMS
    options = {"block_size": 16, "prefill_step_size": 32} if shared else {}

    async def run(concurrent: bool) -> tuple[list[list[tuple[int, ...]]], int]:
        async with troupe.open_runtime(model=TINY, **options) as rt:  # type: ignore[arg-type]
            agents = [await rt.spawn(f"a{i}", system=s) for i, s in enumerate(systems)]
            results: list[list[tuple[int, ...]]] = [[] for _ in agents]

            async def two_turns(i: int) -> None:
                for round_no in range(2):
                    reply = await agents[i].say(f"{messages[i]} ({round_no})", max_tokens=24)
                    results[i].append(reply.tokens)

            if concurrent:
                async with trio.open_nursery() as nursery:
                    for i in range(len(agents)):
                        nursery.start_soon(two_turns, i)
            else:
                for i in range(len(agents)):
                    await two_turns(i)
            return results, rt.statistics().peak_batch_size

    together, peak_together = await run(concurrent=True)
    alone, peak_alone = await run(concurrent=False)
    assert peak_alone == 1
    assert peak_together > 1  # the turns really shared the batch
    assert together == alone


async def test_stream_yields_the_reply_text_as_it_is_generated() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        bob = await rt.spawn("bob", system=SYSTEMS[1])
        stream = bob.stream("Tell me about iron.", max_tokens=20)
        deltas = [delta async for delta in stream]
        assert stream.reply is not None
        assert len(deltas) > 1
        assert "".join(deltas) == stream.reply.text
        assert len(stream.reply.tokens) == 20
        assert bob.transcript()[-1] == troupe.Message("assistant", stream.reply.text)


async def test_stop_string_ends_the_turn_before_it() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        a = await rt.spawn("a", system=SYSTEMS[2])
        b = await rt.spawn("b", system=SYSTEMS[2])
        free = await a.say("Any rumours?", max_tokens=40)
        stop = free.text[5:8]
        expected = free.text[: free.text.find(stop)]
        stopped = await b.say("Any rumours?", max_tokens=40, stop=[stop, "never-there"])
        streamed = [d async for d in (await rt.spawn("c", system=SYSTEMS[2])).stream(
            "Any rumours?", max_tokens=40, stop=stop)]
    assert stopped.finish_reason == "stop"
    assert stopped.text == expected
    assert "".join(streamed) == expected
    assert stopped.tokens == free.tokens[: len(stopped.tokens)]


async def test_seeded_sampling_repeats_and_seeds_differ() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        agents = [await rt.spawn(f"s{i}", system=SYSTEMS[3]) for i in range(3)]
        replies = []
        async with trio.open_nursery() as nursery:

            async def one(i: int, seed: int) -> None:
                replies.append((i, await agents[i].say(
                    "Hello", max_tokens=32, temperature=0.9, top_p=0.95, seed=seed)))

            for i, seed in enumerate((7, 7, 8)):
                nursery.start_soon(one, i, seed)
    by_agent = dict(replies)
    assert by_agent[0].tokens == by_agent[1].tokens
    assert by_agent[0].tokens != by_agent[2].tokens


async def test_embedded_model_speaks_ascii_so_replies_round_trip() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        a = await rt.spawn("a")
        reply = await a.say("Say something long.", max_tokens=400, temperature=1.0, seed=3)
        again = await a.say("More.", max_tokens=8)
    assert reply.text.isascii()
    # ASCII text re-tokenizes to the generated ids, so the whole reply stays cached.
    assert again.cached_tokens == reply.prompt_tokens + len(reply.tokens) - UNFED


async def test_one_agents_turns_run_in_the_order_they_came() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        a = await rt.spawn("a")
        other = await rt.spawn("other")
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(partial(a.say, f"message {i}", max_tokens=4))
                nursery.start_soon(partial(other.say, f"other {i}", max_tokens=4))
                # Let each say() reach the mailbox before the next one starts.
                await trio.testing.wait_all_tasks_blocked()
        users = [m.content for m in a.transcript() if m.role == "user"]
        assert users == [f"message {i}" for i in range(4)]
        assert a.statistics().turns == 4
        assert other.statistics().turns == 4


async def test_tell_adds_a_message_read_at_the_next_turn() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        a = await rt.spawn("a", system=SYSTEMS[0])
        first = await a.say("Hello", max_tokens=4)
        await a.tell("Bob says: the bridge is out.")
        reply = await a.say("What did Bob say?", max_tokens=4)
        assert [m.content for m in a.transcript()] == [
            "Hello", first.text, "Bob says: the bridge is out.", "What did Bob say?", reply.text]
    # The template sees one user message (roles must alternate for many models), and
    # everything before it still comes from the cache.
    joined = "Bob says: the bridge is out.\n\nWhat did Bob say?"
    assert reply.prompt_tokens == len(joined) + 8 + UNFED
    assert reply.cached_tokens == first.prompt_tokens + len(first.tokens) - UNFED


async def test_statistics_are_immutable_snapshots() -> None:
    async with troupe.open_runtime(model=TINY) as rt:
        a = await rt.spawn("a")
        before = rt.statistics()
        reply = await a.say("Hello", max_tokens=5)
        after = rt.statistics()
        agent_stats = a.statistics()
    assert before.turns_completed == 0
    assert after.turns_completed == 1
    assert after.tokens_generated == 5 == agent_stats.tokens_generated
    assert after.tokens_prefilled == reply.prompt_tokens
    assert after.turns_in_flight == 0
    assert after.agents == 1
    assert after.engine_steps >= 5
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        after.turns_completed = 9  # type: ignore[misc]


async def test_max_batch_size_caps_the_batch_and_the_rest_wait_their_turn() -> None:
    async with troupe.open_runtime(model=TINY, max_batch_size=2) as rt:
        agents = [await rt.spawn(f"a{i}", system=SYSTEMS[i]) for i in range(4)]
        replies: dict[int, troupe.Reply] = {}

        async def one(i: int) -> None:
            replies[i] = await agents[i].say("Hello", max_tokens=16)

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
        assert rt.statistics().peak_batch_size == 2
    assert all(len(r.tokens) == 16 for r in replies.values())
