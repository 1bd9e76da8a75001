"""The actor kernel on its own: mailboxes, call and send, supervision, cancellation."""

from __future__ import annotations

import functools
from typing import Any

import anyio
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
    gate: trio.Event | anyio.Event


@attrs.frozen
class Shielded(Request[str]):
    """Waits for its gate where no cancellation reaches it."""

    gate: trio.Event


@attrs.frozen
class Probe(Request[bool]):
    """Is the handler protected from KeyboardInterrupt?"""


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
            except anyio.get_cancelled_exc_class():
                self.cancelled += 1
                raise
            self.handled.append("waited")
            return "done"
        if isinstance(message, Shielded):
            with trio.CancelScope(shield=True):
                await message.gate.wait()
            self.handled.append("shielded")
            return "done"
        if isinstance(message, Probe):
            return trio.lowlevel.currently_ki_protected()
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


async def _call_refused(actor: Actor, errors: list[BaseException], message: Request[Any]) -> None:
    """Call ``actor``, collecting the RuntimeClosedError it answers with."""
    try:
        await actor.call(message)
    except troupe.RuntimeClosedError as exc:
        errors.append(exc)


async def test_stop_cancels_the_request_in_progress_and_refuses_the_queued() -> None:
    actor = Recorder()
    errors: list[BaseException] = []
    call = functools.partial(_call_refused, actor, errors)

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


async def test_a_cancel_that_comes_too_late_leaves_the_next_requests_alone() -> None:
    # The request finishes in spite of its caller's cancel (it was shielded): the cancel
    # must not spill over to the requests after it.
    actor = Recorder()
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        scope = trio.CancelScope()

        async def caller() -> None:
            with scope:
                await actor.call(Shielded(gate))

        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        queued = trio.Event()
        queued.set()

        async def next_caller() -> None:
            assert await actor.call(Wait(queued)) == "done"  # Wait checkpoints: not cancelled

        nursery.start_soon(next_caller)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert actor.handled == []  # the cancelled caller waits until its request settles
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert actor.handled == ["shielded", "waited"]
        assert actor.cancelled == 0
        assert await actor.call(Wait(queued)) == "done"
        assert actor.cancelled == 0
        actor.stop()


async def test_senders_waiting_for_room_get_in_in_order_and_are_refused_on_stop() -> None:
    actor = Recorder(mailbox=1)
    gate = trio.Event()
    refused: list[str] = []

    async def send(text: str) -> None:
        try:
            await actor.send(Echo(text))
        except troupe.RuntimeClosedError:
            refused.append(text)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        nursery.start_soon(actor.call, Wait(gate))
        await trio.testing.wait_all_tasks_blocked()
        for text in "1234":  # "1" fills the mailbox, the others wait in this order
            nursery.start_soon(send, text)
            await trio.testing.wait_all_tasks_blocked()
        assert actor.queued == 1
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert actor.handled == ["waited", "1", "2", "3", "4"]

        async def call_waiting() -> None:
            try:
                await actor.call(Wait(trio.Event()))
            except troupe.RuntimeClosedError:
                refused.append("running")

        nursery.start_soon(call_waiting)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(send, "queued")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(send, "waiting")
        await trio.testing.wait_all_tasks_blocked()
        actor.stop()
    # The one running is cancelled, the queued one refused, the one waiting for room too.
    assert sorted(refused) == ["running", "waiting"]
    assert actor.handled == ["waited", "1", "2", "3", "4"]
    assert actor.cancelled == 1


async def test_a_caller_cancelled_before_its_request_ran_sends_nothing() -> None:
    actor = Recorder(mailbox=1)
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        nursery.start_soon(actor.call, Wait(gate))
        await trio.testing.wait_all_tasks_blocked()
        queued, waiting = trio.CancelScope(), trio.CancelScope()

        async def caller(scope: trio.CancelScope, text: str) -> None:
            with scope:
                await actor.call(Echo(text))

        nursery.start_soon(caller, queued, "in the mailbox")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(caller, waiting, "waiting for room")
        await trio.testing.wait_all_tasks_blocked()
        queued.cancel()
        waiting.cancel()
        await trio.testing.wait_all_tasks_blocked()
        # Both callers are gone (neither waits for the actor), and so are their requests.
        assert queued.cancelled_caught
        assert waiting.cancelled_caught
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            await actor.send(Echo("already cancelled"))
        assert cancelled.cancelled_caught
        gate.set()
        assert await actor.call(Echo("after")) == "AFTER"
        assert actor.handled == ["waited", "after"]
        actor.stop()


async def test_a_failure_refuses_the_senders_waiting_for_room() -> None:
    actor = Recorder(mailbox=1)
    gate = trio.Event()
    outcomes: list[type[BaseException]] = []

    async def call(message: Request[Any]) -> None:
        try:
            await actor.call(message)
        except troupe.TroupeError as exc:
            outcomes.append(type(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        nursery.start_soon(call, Wait(gate))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, Crash())
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, Echo("waiting for room"))
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert outcomes == [troupe.AgentFailedError, troupe.AgentFailedError]
    assert actor.handled == ["waited"]
    assert actor.finished.is_set()


async def test_two_tasks_may_wait_for_one_request() -> None:
    actor = Recorder()
    gate = trio.Event()
    answers: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        pending = await actor.submit(Wait(gate))

        async def wait() -> None:
            answers.append(await pending.result())

        nursery.start_soon(wait)
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert answers == ["done", "done"]
        actor.stop()


async def test_handlers_run_protected_from_keyboard_interrupt() -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        assert await actor.call(Probe()) is True
        actor.stop()


async def test_an_actor_cancelled_from_outside_answers_every_caller() -> None:
    actor = Recorder(mailbox=1)
    errors: list[BaseException] = []
    call = functools.partial(_call_refused, actor, errors)

    async with trio.open_nursery() as callers:
        async with trio.open_nursery() as host:
            host.start_soon(actor.run)
            await trio.testing.wait_all_tasks_blocked()
            for message in (Wait(trio.Event()), Echo("queued"), Echo("waiting")):
                callers.start_soon(call, message)
                await trio.testing.wait_all_tasks_blocked()
            host.cancel_scope.cancel()  # the host tears its task group down
    assert len(errors) == 3
    assert actor.cancelled == 1
    assert actor.handled == []
    assert actor.finished.is_set()


def _on_asyncio() -> tuple[list[str], Recorder]:
    """The kernel's behaviours on an asyncio loop (run in a thread of its own)."""
    outcomes: list[str] = []
    actor = Recorder(mailbox=1)

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(actor.run)
            outcomes.append(await actor.call(Echo("call")))
            await actor.send(Echo("send"))
            with pytest.raises(ValueError, match="refused"):
                await actor.call(Refuse())
            # A cancelled caller cancels its request where it runs.
            with anyio.CancelScope() as scope:

                async def cancel() -> None:
                    await anyio.wait_all_tasks_blocked()  # the handler waits on its gate
                    scope.cancel()

                tg.start_soon(cancel)
                await actor.call(Wait(anyio.Event()))
            assert scope.cancelled_caught
            # Backpressure: one in the mailbox, the next waits for room.
            gate = anyio.Event()
            tg.start_soon(actor.call, Wait(gate))
            await anyio.wait_all_tasks_blocked()
            await actor.send(Echo("queued"))
            tg.start_soon(actor.send, Echo("waited for room"))
            await anyio.wait_all_tasks_blocked()
            assert actor.queued == 1
            gate.set()
            outcomes.append(await actor.call(Echo("after")))
            with pytest.raises(troupe.AgentFailedError):
                await actor.call(Crash())
            with pytest.raises(troupe.AgentFailedError):
                await actor.call(Echo("too late"))

    anyio.run(scenario, backend="asyncio")
    return outcomes, actor


async def test_the_kernel_behaves_the_same_on_asyncio() -> None:
    outcomes, actor = await trio.to_thread.run_sync(_on_asyncio)
    assert outcomes == ["CALL", "AFTER"]
    assert actor.handled == ["call", "send", "waited", "queued", "waited for room", "after"]
    assert actor.cancelled == 1
    assert actor.finished.is_set()
