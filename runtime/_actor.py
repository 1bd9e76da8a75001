"""The actor kernel: a bounded mailbox, request/response and fire-and-forget, supervision.

An actor handles its messages one at a time, in arrival order, in one task of the
runtime's task group. Errors a caller can act on (troupe's own errors, ValueError,
TypeError) go back to that caller and the actor carries on; any other exception stops the
actor, and its callers, present and future, get ``AgentFailedError`` chained to the cause.

The hot path of a call is two task switches (the caller parks, the actor answers and
parks), with no channel, event or cancel scope made per call: a request is one
``Pending`` that carries its answer and wakes its waiter through the event loop's
low-level primitives (trio's ``reschedule``, an asyncio future). The actor runs its
requests inside one cancel scope that it renews only after a request was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import sniffio
import trio
import trio.lowlevel

from ._errors import AgentFailedError, RuntimeClosedError, TroupeError

logger = logging.getLogger("troupe")

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

# Exceptions that mean "this request was bad", not "this actor is broken".
RECOVERABLE: tuple[type[Exception], ...] = (TroupeError, ValueError, TypeError)


class Request(Generic[R_co]):
    """Base of actor messages; ``R_co`` is the type a ``call`` with it returns."""


# -- parking a task until something wakes it, on either event loop --------------------------
#
# A parked task is woken by ``wake``; a cancellation of the task ends its wait early, and a
# wake after that does nothing. trio: the task itself (``reschedule``); asyncio: a future.


class _Waiter:
    """A second task waiting for the same request (rare): parks like the first."""

    __slots__ = ("_future", "_task")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._future: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        if sniffio.current_async_library() == "trio":
            self._task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        else:
            self._future = asyncio.get_running_loop().create_future()
            try:
                await self._future
            finally:
                self._future = None

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self) -> None:
        task, future = self._task, self._future
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)
        elif future is not None and not future.done():
            future.set_result(None)


class Pending(Generic[R]):
    """A request in a mailbox or in progress; ``result()`` waits for its outcome.

    Made by an actor for the running event loop (one subclass each: they differ in how the
    caller's task parks and wakes).
    """

    __slots__ = ("_actor", "_done", "_error", "_more", "_parked", "_value", "abandoned",
                 "detached", "message")

    def __init__(self, message: Request[R], detached: bool, actor: Actor) -> None:
        self.message = message
        self.detached = detached
        self.abandoned = False
        self._actor = actor
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._parked: Any = None  # the waiting task (trio) or future (asyncio)
        self._more: list[_Waiter] | None = None  # other tasks waiting too (rare)

    @property
    def done(self) -> bool:
        return self._done

    async def _park(self) -> None:
        """Wait (cancellable) until ``_wake``."""
        raise NotImplementedError

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        # trio: the parked task was cancelled; a later wake must not touch it.
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake(self) -> None:
        raise NotImplementedError

    @trio.lowlevel.enable_ki_protection
    def _finish(self, value: Any = None, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._value, self._error = value, error
        if self._parked is not None:
            self._wake()
        if self._more:
            for waiter in self._more:
                waiter.wake()
            self._more = None

    @trio.lowlevel.enable_ki_protection
    def cancel(self) -> None:
        """Nobody waits for this request any more: skip it, or cancel it where it runs."""
        self.abandoned = True
        actor = self._actor
        if actor._current is self:
            actor._scope.cancel()
        else:
            self._finish(error=RuntimeClosedError("the request was cancelled before it ran"))

    async def _wait(self) -> None:
        if self._parked is None:
            await self._park()
            return
        waiter = _Waiter()
        if self._more is None:
            self._more = []
        self._more.append(waiter)
        try:
            await waiter.wait()
        finally:
            if self._more is not None and waiter in self._more:
                self._more.remove(waiter)

    async def settle(self) -> None:
        """Cancel the request and wait until the actor is done with it.

        Afterwards its effects are final: it either completed (a turn whose last token
        came before the cancel is committed) or it left no trace.
        """
        self.cancel()
        with anyio.CancelScope(shield=True):
            while not self._done:
                await self._wait()

    async def result(self) -> R:
        """Wait for the outcome; if the wait is cancelled, the request is settled first."""
        while not self._done:
            try:
                await self._wait()
            except BaseException:
                await self.settle()
                raise
        if self._error is not None:
            raise self._error
        value: R = self._value
        return value


class _TrioPending(Pending[R]):
    __slots__ = ()

    async def _park(self) -> None:
        self._parked = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _wake(self) -> None:
        task = self._parked
        self._parked = None
        trio.lowlevel.reschedule(task)


class _AsyncioPending(Pending[R]):
    __slots__ = ()

    async def _park(self) -> None:
        self._parked = future = asyncio.get_running_loop().create_future()
        try:
            await future
        finally:
            self._parked = None

    def _wake(self) -> None:
        future = self._parked
        self._parked = None
        if not future.done():
            future.set_result(None)


class _Sender:
    """A submitter waiting for room in a full mailbox."""

    __slots__ = ("admitted", "pending", "waiter")

    def __init__(self, pending: Pending[Any]) -> None:
        self.pending = pending
        self.waiter = _Waiter()
        self.admitted = False


class Actor(ABC):
    """Base of troupe's actors. Subclasses implement ``handle``; the runtime runs ``run``."""

    def __init__(self, name: str, mailbox_size: int) -> None:
        if mailbox_size < 1:
            raise ValueError(f"mailbox_size must be >= 1, got {mailbox_size}")
        self.name = name
        self._size = mailbox_size
        self._queue: deque[Pending[Any]] = deque()
        self._senders: deque[_Sender] = deque()  # waiting for room, first come first in
        self._receiver: Any = None  # the actor's own task (trio) or future (asyncio), parked
        self._trio = False
        self._pending_type: type[Pending[Any]] | None = None  # set on first use, per loop
        self._scope: Any = None  # the cancel scope the current request runs in
        self._current: Pending[Any] | None = None
        self._stopping = False
        self.failure: BaseException | None = None
        self._started = False
        self.finished = anyio.Event()

    @property
    def queued(self) -> int:
        """Messages waiting in the mailbox."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing queued."""
        return self._current is None and not self._queue

    @abstractmethod
    async def handle(self, message: Request[Any]) -> Any:
        """Handle one message; the return value goes back to the caller."""

    def _refusal(self) -> TroupeError:
        if self.failure is not None:
            error = AgentFailedError(f"{self.name} stopped after an unexpected error")
            error.__cause__ = self.failure
            return error
        return RuntimeClosedError(f"{self.name} is closed")

    def _bind(self) -> type[Pending[Any]]:
        """The Pending class for the running event loop (the actor lives in one)."""
        if self._pending_type is None:
            self._trio = sniffio.current_async_library() == "trio"
            self._pending_type = _TrioPending if self._trio else _AsyncioPending
        return self._pending_type

    async def submit(self, message: Request[R], *, detached: bool = False) -> Pending[R]:
        """Queue ``message``; waits while the mailbox is full (backpressure).

        A ``detached`` request runs even though nobody waits for its result.
        """
        if self._stopping or self.failure is not None:
            raise self._refusal()
        if detached:
            # Fire-and-forget returns at once: make it a checkpoint, as callers expect.
            await anyio.lowlevel.checkpoint()
            if self._stopping or self.failure is not None:
                raise self._refusal()
        pending: Pending[R] = (self._pending_type or self._bind())(message, detached, self)
        if not self._queue_now(pending):
            await self._wait_for_room(pending)
        return pending

    # KI-protected like the actor's own bookkeeping: a Ctrl-C reaches a waiting caller at
    # its park (it settles the request, then raises), never between two lines here.
    @trio.lowlevel.enable_ki_protection
    async def call(self, message: Request[R]) -> R:
        """Send ``message`` and wait for the actor's answer (or its error)."""
        # submit() and result() inlined: this is the kernel's hot path.
        if self._stopping or self.failure is not None:
            raise self._refusal()
        pending: Pending[R] = (self._pending_type or self._bind())(message, False, self)
        queue = self._queue
        if len(queue) < self._size and not self._senders:
            queue.append(pending)
            if self._receiver is not None:
                self._wake_receiver()
        else:
            await self._wait_for_room(pending)
        if not pending._done:
            try:
                if self._trio:
                    pending._parked = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(pending._abort)
                else:
                    pending._parked = future = asyncio.get_running_loop().create_future()
                    await future
            except BaseException:
                pending._parked = None  # cancelled: a later wake must not touch the waiter
                await pending.settle()
                raise
            if not pending._done:  # a spurious wake: cannot happen, but never return early
                return await pending.result()
        if pending._error is not None:
            raise pending._error
        value: R = pending._value
        return value

    async def send(self, message: Request[Any]) -> None:
        """Send ``message`` without waiting for it to be handled (fire-and-forget)."""
        await self.submit(message, detached=True)

    @trio.lowlevel.enable_ki_protection
    def _queue_now(self, pending: Pending[Any]) -> bool:
        """Queue ``pending`` if there is room and nobody waits for it before us."""
        if len(self._queue) >= self._size or self._senders:
            return False
        self._queue.append(pending)
        if self._receiver is not None:
            self._wake_receiver()
        return True

    async def _wait_for_room(self, pending: Pending[Any]) -> None:
        """Wait our turn for room in a full mailbox, behind the submitters before us."""
        sender = _Sender(pending)
        self._senders.append(sender)
        try:
            await sender.waiter.wait()
        except BaseException:
            if sender.admitted:
                # Queued just as the wait was cancelled: nobody will wait for the answer.
                if not pending.detached:
                    pending.cancel()
            else:
                self._forget_sender(sender)
            raise
        if not sender.admitted:
            raise self._refusal()

    @trio.lowlevel.enable_ki_protection
    def _forget_sender(self, sender: _Sender) -> None:
        with contextlib.suppress(ValueError):  # admitted or refused meanwhile
            self._senders.remove(sender)

    def _wake_receiver(self) -> None:
        receiver = self._receiver
        self._receiver = None
        if self._trio:
            trio.lowlevel.reschedule(receiver)
        elif not receiver.done():
            receiver.set_result(None)

    def _abort_receive(self, _: Any) -> trio.lowlevel.Abort:
        self._receiver = None
        return trio.lowlevel.Abort.SUCCEEDED

    @trio.lowlevel.enable_ki_protection
    def stop(self) -> None:
        """Take no more messages; cancel the one in progress and refuse the queued ones."""
        self._stopping = True
        self._refuse_senders()
        if self._current is not None and self._scope is not None:
            self._scope.cancel()
        if self._receiver is not None:
            self._wake_receiver()
        if not self._started:
            self._refuse_queued()
            self.finished.set()

    # KI-protected (trio): a Ctrl-C must not land between two lines of an actor's
    # bookkeeping; it goes to the host's main task at its next checkpoint instead.
    @trio.lowlevel.enable_ki_protection
    async def run(self) -> None:
        """The actor's loop: one message at a time until stopped or failed."""
        self._started = True
        self._bind()
        # trio's own cancel scope on trio: anyio's wrapper costs more, and we need no more.
        scope_type: type[Any] = trio.CancelScope if self._trio else anyio.CancelScope
        try:
            while True:
                # One cancel scope for many requests, made again only once it was
                # cancelled (a request's caller left, or stop()).
                with scope_type() as scope:
                    self._scope = scope
                    if not await self._serve(scope):
                        return
        finally:
            # However the loop ended (even cancelled from outside), every request gets an
            # answer: callers waiting to settle a cancelled request must not hang.
            self._scope = None
            self._stopping = True
            self._refuse_queued()
            self._refuse_senders()
            self.finished.set()

    async def _serve(self, scope: Any) -> bool:
        """Handle messages until stopped (False) or ``scope`` was cancelled (True)."""
        queue = self._queue
        while True:
            if not queue:
                if self._stopping:
                    return False
                # Park until a message comes or stop() (the actor's hot path: inlined).
                if self._trio:
                    self._receiver = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(self._abort_receive)
                else:
                    self._receiver = future = asyncio.get_running_loop().create_future()
                    try:
                        await future
                    except BaseException:
                        self._receiver = None
                        raise
                continue
            pending = queue.popleft()
            if self._senders:
                self._admit_sender()
            if pending.abandoned:
                continue
            if self._stopping:
                pending._finish(error=self._refusal())
                continue
            self._current = pending
            try:
                value = await self.handle(pending.message)
            except RECOVERABLE as exc:
                pending._finish(error=exc)
                if pending.detached:
                    logger.warning("%s: %r failed: %s", self.name, pending.message, exc)
            except Exception as exc:
                logger.exception("%s stopped on an unexpected error", self.name)
                self.failure = exc
                pending._finish(error=self._refusal())
                self._stopping = True
                self._refuse_senders()
                return False
            else:
                pending._finish(value)
            finally:
                # Cancelled (by its caller, by stop(), or from outside when the host tore
                # the task group down): answer anyway.
                self._current = None
                if not pending._done:
                    pending._finish(error=self._refusal())
            if scope.cancel_called:
                # Cancelled for a request that finished anyway (the cancel came too late):
                # the next request gets a fresh scope.
                return True

    @trio.lowlevel.enable_ki_protection
    def _admit_sender(self) -> None:
        # Room now: the first submitter waiting for it gets it (its message goes in).
        while self._senders:
            sender = self._senders.popleft()
            sender.admitted = True
            self._queue.append(sender.pending)
            sender.waiter.wake()
            return

    def _refuse_queued(self) -> None:
        # Whatever is still queued is refused, not dropped silently.
        while self._queue:
            self._queue.popleft()._finish(error=self._refusal())

    def _refuse_senders(self) -> None:
        # Submitters waiting for room are woken not admitted: they raise the refusal.
        while self._senders:
            self._senders.popleft().waiter.wake()
