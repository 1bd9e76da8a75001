"""Runtime.delete: an agent goes for good, from memory and from the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

import troupe
from conftest import TINY
from troupe.storage._inspect import check_store


async def test_a_deleted_agent_is_gone_from_the_runtime_and_the_store(store: Path) -> None:
    async with troupe.open_runtime(TINY, store, block_size=16) as rt:
        keep = await rt.spawn("keep", system="You keep.")
        gone = await rt.spawn("gone", system="You keep.")
        await keep.say("Hello there.", max_tokens=4)
        await gone.say("Something else entirely, and at some length too.", max_tokens=4)
        files = sorted((store / "kv").iterdir())
        await rt.delete("gone")
        # Its tail and the blocks only it held leave the disk; the shared ones stay.
        left = sorted((store / "kv").iterdir())
        assert set(left) < set(files)
        assert rt.statistics().blocks_on_disk == len([f for f in left if "~" not in f.name
                                                       and f.suffix == ".kvb"])
        assert rt.agent_ids() == ("keep",)
        assert rt.statistics().agents == 1
        with pytest.raises(troupe.AgentNotFoundError):
            await rt.get("gone")
        with pytest.raises(troupe.AgentNotFoundError):
            await gone.say("Still there?", max_tokens=2)
        with pytest.raises(troupe.AgentNotFoundError):
            await rt.delete("gone")
        with pytest.raises(ValueError, match="agent id"):
            await rt.delete("")
        # The blocks the two shared still serve the one left.
        reply = await keep.say("And again.", max_tokens=2)
        assert reply.cached_tokens > 0
        # The id is free again.
        again = await rt.spawn("gone")
        assert again.transcript() == ()
        await rt.delete("gone")
    assert [f.text for f in check_store(store) if f.problem] == []
    async with troupe.open_runtime(TINY, store, block_size=16) as rt:
        assert rt.agent_ids() == ("keep",)
        keep = await rt.get("keep")
        assert len(keep.transcript()) == 4
        assert (await keep.say("Once more.", max_tokens=2)).cached_tokens > 0
    tails = sorted(p.name for p in (store / "kv").iterdir() if "gone" in p.name)
    assert tails == []


async def test_deleting_an_agent_mid_turn_cancels_its_turns() -> None:
    async with troupe.open_runtime(TINY) as rt:
        agent = await rt.spawn("talker")
        outcomes: list[BaseException] = []

        async def queued() -> None:
            try:
                await agent.say("And then?", max_tokens=4)
            except troupe.AgentNotFoundError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            stream = agent.stream("Talk for long.", max_tokens=1500)
            await stream.__anext__()  # the turn is running
            nursery.start_soon(queued)
            await trio.testing.wait_all_tasks_blocked()  # and the next one is queued
            await rt.delete("talker")
            with pytest.raises(troupe.AgentNotFoundError):
                async for _ in stream:
                    pass
        assert len(outcomes) == 1
        assert rt.statistics().turns_in_flight == 0
        assert rt.statistics().turns_cancelled == 1
        assert rt.agent_ids() == ()
