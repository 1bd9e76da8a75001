"""The scheduler actor: admits turns into the engine's running batch and routes its tokens.

Agents ask it to start a turn; it hands the sequence to the engine thread, which batches
every turn in flight through one model, and it routes each step's tokens back to the
turn's own channel.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any

import anyio
import attrs
import trio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._actor import Actor, Request
from .._records import Sampling
from ._engine import CachedPrefix, Engine, Event, FinishEvent, SequenceSpec


@attrs.frozen
class StartTurn(Request["TurnChannel"]):
    prompt: list[int]
    history: list[int]
    prefix: CachedPrefix | None = attrs.field(repr=False)
    sampling: Sampling
    seed: int
    block_size: int
    cut: bool


@attrs.define(eq=False)
class TurnChannel:
    """A turn in the engine: its events arrive on ``events``; ``cancel()`` takes it out."""

    key: int
    events: MemoryObjectReceiveStream[Event]
    _scheduler: Scheduler

    def cancel(self) -> None:
        self._scheduler.engine.cancel(self.key)


class Scheduler(Actor):
    """Owns the engine; one per runtime."""

    def __init__(self, engine: Engine, mailbox_size: int) -> None:
        super().__init__("scheduler", mailbox_size)
        self.engine = engine
        self._keys = itertools.count(1)
        self._routes: dict[int, MemoryObjectSendStream[Event]] = {}
        engine.deliver = self._deliver

    @property
    def in_flight(self) -> int:
        return len(self._routes)

    async def handle(self, message: Request[Any]) -> Any:
        if not isinstance(message, StartTurn):
            raise TypeError(f"the scheduler cannot handle {message!r}")
        key = next(self._keys)
        # Unbounded: a turn's events are bounded by its max_tokens, and the engine must
        # never wait on a slow reader.
        send, receive = anyio.create_memory_object_stream[Event](math.inf)
        spec = SequenceSpec(key, message.prompt, message.history, message.prefix,
                            message.sampling, message.seed, message.block_size, message.cut)
        self._routes[key] = send
        try:
            self.engine.insert(spec)
        except BaseException:
            del self._routes[key]  # the engine is gone: nothing will come
            raise
        return TurnChannel(key, receive, self)

    # KI-protected: trio runs it unprotected otherwise, and a Ctrl-C in mid-delivery would
    # lose events that turns wait for.
    @trio.lowlevel.enable_ki_protection
    def _deliver(self, events: list[Event]) -> None:
        # Runs on the event loop, called from the engine thread once per batch step.
        for event in events:
            route = self._routes.get(event.key)
            if route is None:
                continue
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                route.send_nowait(event)
            if isinstance(event, FinishEvent):
                del self._routes[event.key]
                route.close()
