"""The actor kernel: a bounded mailbox, request/response and fire-and-forget, supervision.

An actor handles its messages one at a time, in arrival order, in one task of the
runtime's task group. Errors a caller can act on (troupe's own errors, ValueError,
TypeError) go back to that caller and the actor carries on; any other exception stops the
actor, and its callers, present and future, get ``AgentFailedError`` chained to the cause.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

import anyio
import attrs
import trio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import AgentFailedError, RuntimeClosedError, TroupeError

logger = logging.getLogger("troupe")

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

# Exceptions that mean "this request was bad", not "this actor is broken".
RECOVERABLE: tuple[type[Exception], ...] = (TroupeError, ValueError, TypeError)


class Request(Generic[R_co]):
    """Base of actor messages; ``R_co`` is the type a ``call`` with it returns."""


@attrs.define(eq=False)
class Pending(Generic[R]):
    """A request in a mailbox or in progress; ``result()`` waits for its outcome."""

    message: Request[R]
    detached: bool = False
    _done: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _value: Any = attrs.field(default=None, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)
    _scope: anyio.CancelScope | None = attrs.field(default=None, init=False)
    abandoned: bool = attrs.field(default=False, init=False)

    def _finish(self, value: Any = None, error: BaseException | None = None) -> None:
        if not self._done.is_set():
            self._value, self._error = value, error
            self._done.set()

    def cancel(self) -> None:
        """Nobody waits for this request any more: skip it, or cancel it where it runs."""
        self.abandoned = True
        if self._scope is not None:
            self._scope.cancel()
        else:
            self._finish(error=RuntimeClosedError("the request was cancelled before it ran"))

    async def settle(self) -> None:
        """Cancel the request and wait until the actor is done with it.

        Afterwards its effects are final: it either completed (a turn whose last token
        came before the cancel is committed) or it left no trace.
        """
        self.cancel()
        with anyio.CancelScope(shield=True):
            await self._done.wait()

    async def result(self) -> R:
        """Wait for the outcome; if the wait is cancelled, the request is settled first."""
        try:
            await self._done.wait()
        except BaseException:
            await self.settle()
            raise
        if self._error is not None:
            raise self._error
        value: R = self._value
        return value


class Actor(ABC):
    """Base of troupe's actors. Subclasses implement ``handle``; the runtime runs ``run``."""

    def __init__(self, name: str, mailbox_size: int) -> None:
        if mailbox_size < 1:
            raise ValueError(f"mailbox_size must be >= 1, got {mailbox_size}")
        self.name = name
        send, receive = anyio.create_memory_object_stream[Pending[Any]](mailbox_size)
        self._mailbox_send: MemoryObjectSendStream[Pending[Any]] = send
        self._mailbox_receive: MemoryObjectReceiveStream[Pending[Any]] = receive
        self._current: Pending[Any] | None = None
        self._stopping = False
        self.failure: BaseException | None = None
        self._started = False
        self.finished = anyio.Event()

    @property
    def queued(self) -> int:
        """Messages waiting in the mailbox."""
        return self._mailbox_receive.statistics().current_buffer_used

    @property
    def idle(self) -> bool:
        """Nothing running and nothing queued."""
        return self._current is None and self.queued == 0

    @abstractmethod
    async def handle(self, message: Request[Any]) -> Any:
        """Handle one message; the return value goes back to the caller."""

    def _refusal(self) -> TroupeError:
        if self.failure is not None:
            error = AgentFailedError(f"{self.name} stopped after an unexpected error")
            error.__cause__ = self.failure
            return error
        return RuntimeClosedError(f"{self.name} is closed")

    async def submit(self, message: Request[R], *, detached: bool = False) -> Pending[R]:
        """Queue ``message``; waits while the mailbox is full (backpressure).

        A ``detached`` request runs even though nobody waits for its result.
        """
        if self._stopping or self.failure is not None:
            raise self._refusal()
        pending = Pending(message, detached)
        try:
            await self._mailbox_send.send(pending)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._refusal() from None
        return pending

    async def call(self, message: Request[R]) -> R:
        """Send ``message`` and wait for the actor's answer (or its error)."""
        pending = await self.submit(message)
        return await pending.result()

    async def send(self, message: Request[Any]) -> None:
        """Send ``message`` without waiting for it to be handled (fire-and-forget)."""
        await self.submit(message, detached=True)

    def stop(self) -> None:
        """Take no more messages; cancel the one in progress and refuse the queued ones."""
        self._stopping = True
        self._mailbox_send.close()
        if self._current is not None and self._current._scope is not None:
            self._current._scope.cancel()
        if not self._started:
            self.finished.set()

    # KI-protected (trio): a Ctrl-C must not land between two lines of an actor's
    # bookkeeping; it goes to the host's main task at its next checkpoint instead.
    @trio.lowlevel.enable_ki_protection
    async def run(self) -> None:
        """The actor's loop: one message at a time until stopped or failed."""
        self._started = True
        try:
            await self._serve()
        finally:
            # However the loop ended (even cancelled from outside), every request gets an
            # answer: callers waiting to settle a cancelled request must not hang.
            self._stopping = True
            self._mailbox_send.close()
            self._refuse_queued()
            self.finished.set()

    async def _serve(self) -> None:
        async with self._mailbox_receive:
            async for pending in self._mailbox_receive:
                if pending.abandoned:
                    continue
                if self._stopping:
                    pending._finish(error=self._refusal())
                    continue
                await self._handle_one(pending)
                if self.failure is not None:
                    break
            self._refuse_queued()

    def _refuse_queued(self) -> None:
        # Whatever is still queued is refused, not dropped silently.
        while True:
            try:
                leftover = self._mailbox_receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            leftover._finish(error=self._refusal())

    async def _handle_one(self, pending: Pending[Any]) -> None:
        self._current = pending
        try:
            with anyio.CancelScope() as scope:
                pending._scope = scope
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
                    self._mailbox_send.close()
                else:
                    pending._finish(value)
            if scope.cancelled_caught:
                pending._finish(error=self._refusal())
        finally:
            # Cancelled from outside (the host tore the task group down): answer anyway.
            pending._finish(error=self._refusal())
            self._current = None
