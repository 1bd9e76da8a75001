"""An asyncio event loop on a thread of its own, callable from trio or asyncio hosts.

aiosqlite resolves asyncio futures, so under trio it cannot be awaited directly. Running
it on a private asyncio loop gives both hosts one code path: the host awaits an anyio
Event that the private loop sets when the coroutine is done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import trio.lowlevel

T = TypeVar("T")


# Runs on the host loop: KI-protected (trio), so a Ctrl-C cannot lose the wake-up.
@trio.lowlevel.enable_ki_protection
def _set(event: anyio.Event) -> None:
    event.set()


class AsyncioThread:
    """A private asyncio loop; ``await run(fn, *args)`` runs ``fn(*args)`` on it."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run the coroutine on the private loop and wait for it, without blocking the host.

        If the wait is cancelled the coroutine is cancelled too (callers shield writes).
        """
        token = anyio.lowlevel.current_token()
        host_thread = threading.get_ident()
        done = anyio.Event()
        future = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)

        def wake(_: concurrent.futures.Future[T]) -> None:
            # A future done before add_done_callback runs this on the host thread itself.
            if threading.get_ident() == host_thread:
                done.set()
                return
            with contextlib.suppress(anyio.RunFinishedError):
                anyio.from_thread.run_sync(_set, done, token=token)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    async def aclose(self) -> None:
        """Stop the loop and join its thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            await anyio.to_thread.run_sync(self._thread.join, abandon_on_cancel=False)
