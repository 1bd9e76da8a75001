"""A troupe server on a loopback port, in an event loop of its own (a thread, under trio or
asyncio), for the tests to drive with the official clients."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import attrs

import troupe
from conftest import TINY

KEY = "test-key-0123456789"


@attrs.frozen
class Server:
    url: str
    rt: troupe.Runtime
    portal: anyio.from_thread.BlockingPortal

    def statistics(self) -> troupe.RuntimeStatistics:
        return self.portal.call(lambda: _statistics(self.rt))


async def _statistics(rt: troupe.Runtime) -> troupe.RuntimeStatistics:
    return rt.statistics()


@contextlib.asynccontextmanager
async def _running(
    store: Path | None, options: troupe.ServeOptions, runtime: dict[str, Any]
) -> AsyncIterator[tuple[str, troupe.Runtime]]:
    stop = anyio.Event()
    async with troupe.open_runtime(TINY, store, **runtime) as rt, \
            anyio.create_task_group() as tg:
        url = await tg.start(lambda task_status: troupe.serve(
            rt, port=0, options=options, shutdown=stop, task_status=task_status))
        try:
            yield url, rt
        finally:
            stop.set()


@contextlib.contextmanager
def serving(
    store: Path | None = None,
    options: troupe.ServeOptions | None = None,
    backend: str = "trio",
    **runtime: Any,
) -> Iterator[Server]:
    """A runtime on the tiny model (16-token blocks) served until the block ends."""
    options = options or troupe.ServeOptions(api_keys=(KEY,))
    runtime = {"block_size": 16, "max_batch_size": 8, "kv_budget": "64MB", **runtime}
    with anyio.from_thread.start_blocking_portal(backend) as portal, \
            portal.wrap_async_context_manager(_running(store, options, runtime)) as (url, rt):
        yield Server(url, rt, portal)
