"""The actor kernel on its own: mailboxes, call and send, supervision, cancellation."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.testing

import troupe
from troupe._actor import Actor, Request


@attrs.frozen
class Echo(Request[str]):
    text: str


@attrs.frozen
class Wait(Request[str]):
    gate: trio.Event


@attrs.frozen
class Crash(Request[None]):
    pass


@attrs.frozen
class Refuse(Request[None]):
    pass


class Recorder(Actor):
    """An actor that records what it handled; some messages block, refuse or crash."""

    def __init__(self, mailbox: int = 4) -> None:
        super().__init__("recorder", mailbox)
        self.handled: list[str] = []
        self.cancelled = 0

    async def handle(self, message: Request[Any]) -> Any:
        if isinstance(message, Echo):
            self.handled.append(message.text)
            return message.text.upper()
        if isinstance(message, Wait):
            try:
                await message.gate.wait()
            except trio.Cancelled:
                self.cancelled += 1
                raise
            self.handled.append("waited")
            return "done"
        if isinstance(message, Refuse):
            raise ValueError("refused")  # noqa: TRY004 (a refusal, not a type error)
        raise RuntimeError("a bug")


async def test_call_returns_the_answer_and_send_does_not_wait() -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        assert await actor.call(Echo("hi")) == "HI"
        await actor.send(Echo("later"))
        assert await actor.call(Echo("after")) == "AFTER"
        assert actor.handled == ["hi", "later", "after"]
        actor.stop()
    assert actor.finished.is_set()


async def test_a_full_mailbox_makes_senders_wait() -> None:
    actor = Recorder(mailbox=1)
    gate = trio.Event()
    sent: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        nursery.start_soon(actor.call, Wait(gate))
        await trio.testing.wait_all_tasks_blocked()

        async def send(i: int) -> None:
            await actor.send(Echo(str(i)))
            sent.append(i)

        nursery.start_soon(send, 1)
        nursery.start_soon(send, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert len(sent) == 1  # one fits the mailbox, the other waits for room
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(sent) == [1, 2]
        assert sorted(actor.handled) == ["1", "2", "waited"]
        actor.stop()


async def test_a_refused_request_goes_to_its_caller_and_the_actor_goes_on() -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        with pytest.raises(ValueError, match="refused"):
            await actor.call(Refuse())
        assert await actor.call(Echo("still here")) == "STILL HERE"
        actor.stop()


async def test_an_unexpected_error_stops_the_actor_and_only_it() -> None:
    broken, healthy = Recorder(), Recorder()
    gate = trio.Event()
    outcomes: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broken.run)
        nursery.start_soon(healthy.run)
        nursery.start_soon(broken.call, Wait(gate))
        await trio.testing.wait_all_tasks_blocked()

        async def queued() -> None:
            try:
                await broken.call(Echo("queued"))
            except troupe.AgentFailedError as exc:
                outcomes.append(exc)

        nursery.start_soon(queued)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
        with pytest.raises(troupe.AgentFailedError) as failed:
            await broken.call(Crash())
        assert isinstance(failed.value.__cause__, RuntimeError)
        with pytest.raises(troupe.AgentFailedError):
            await broken.call(Echo("after"))
        assert await healthy.call(Echo("fine")) == "FINE"
        healthy.stop()
    assert "queued" in broken.handled  # came before the crash, so it ran
    assert outcomes == []
    assert broken.finished.is_set()


async def test_a_cancelled_caller_cancels_its_request_where_it_runs() -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        scope = trio.CancelScope()

        async def caller() -> None:
            with scope:
                await actor.call(Wait(trio.Event()))

        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()  # the handler is waiting on its gate
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert actor.cancelled == 1
        assert await actor.call(Echo("next")) == "NEXT"
        actor.stop()


async def test_stop_cancels_the_request_in_progress_and_refuses_the_queued() -> None:
    actor = Recorder()
    errors: list[BaseException] = []

    async def call(message: Request[Any]) -> None:
        try:
            await actor.call(message)
        except troupe.RuntimeClosedError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        nursery.start_soon(call, Wait(trio.Event()))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, Echo("queued"))
        await trio.testing.wait_all_tasks_blocked()
        actor.stop()
    assert len(errors) == 2
    assert actor.handled == []
    assert actor.cancelled == 1
    with pytest.raises(troupe.RuntimeClosedError):
        await actor.call(Echo("late"))
