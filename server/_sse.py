"""Server-sent events: the response that streams them and ends the producer for sure."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def data(payload: Any) -> bytes:
    """One ``data:`` event (OpenAI's shape)."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def event(name: str, payload: Any) -> bytes:
    """One named event (Anthropic's shape)."""
    return (f"event: {name}\ndata: ".encode()
            + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


DONE = b"data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response. Starlette cancels the producer when the client disconnects; here
    the generator is also closed, and ``close`` awaited, whatever happened, so that its
    turn is cancelled and its admission released now, not when the garbage collector
    gets to it."""

    def __init__(
        self, events: AsyncGenerator[bytes, None], close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # ``close`` too: a generator that never started runs no ``finally`` of its own.
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
                await self._close()
