"""``troupe.serve``: the HTTP server's front in the core package, so that ``import troupe``
needs none of the server's dependencies (the ``serve`` extra) until a server starts."""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import attrs

if TYPE_CHECKING:
    from ._runtime import Runtime

DEFAULT_MAX_BODY = 8 << 20
DEFAULT_GRACE = 10.0


@attrs.frozen
class ServeOptions:
    """How the server admits requests. Checked on construction (ValueError).

    ``api_keys``: accepted keys (``Authorization: Bearer KEY`` or ``x-api-key: KEY``);
    empty means no authentication, which a non-loopback ``host`` refuses unless
    ``insecure_no_auth``. ``rate_limit``: requests per second per key (per client address
    without keys), with bursts of ``rate_burst``; None for no limit. ``max_pending``: turns
    queued or running at once, past which requests get 503 with Retry-After.
    ``model_name``: the id /v1/models lists and requests must name (default: the model's
    name); ``grace_seconds``: how long requests in flight may finish at shutdown.
    ``kept_conversations``: the short-lived agents of stateless requests kept after their
    request, so that a client resending the conversation continues from their KV.
    """

    api_keys: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    insecure_no_auth: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY
    rate_limit: float | None = None
    rate_burst: int = 10
    max_pending: int = 256
    cors_origins: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    grace_seconds: float = DEFAULT_GRACE
    model_name: str | None = None
    kept_conversations: int = 256

    def __attrs_post_init__(self) -> None:
        if any(not isinstance(k, str) or not k for k in self.api_keys):
            raise ValueError("api keys must be non-empty strings")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.rate_limit is not None and not (
                math.isfinite(self.rate_limit) and self.rate_limit > 0):
            raise ValueError(f"rate_limit must be > 0, got {self.rate_limit}")
        if self.rate_burst < 1:
            raise ValueError(f"rate_burst must be >= 1, got {self.rate_burst}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")
        if self.kept_conversations < 0:
            raise ValueError(f"kept_conversations must be >= 0, got {self.kept_conversations}")
        if not (math.isfinite(self.grace_seconds) and self.grace_seconds >= 0):
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")



async def serve(
    rt: Runtime,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServeOptions | None = None,
    shutdown: anyio.Event | None = None,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``rt`` over HTTP (the OpenAI, Anthropic and agents APIs) until cancelled, or
    until ``shutdown`` is set: then it stops accepting, lets requests in flight finish
    for ``options.grace_seconds``, cancels the rest and returns. Under trio or asyncio.

    ``await task_group.start(troupe.serve, rt)`` returns the URL it listens on
    (``port=0`` picks a free port). ValueError if ``host`` is not a loopback address and
    ``options`` sets no API key (unless ``insecure_no_auth``); OSError if the address
    cannot be bound; ImportError without the ``serve`` extra
    (``pip install 'troupe[serve]'``).
    """
    _app = server_app()
    await _app.serve(rt, host=host, port=port, options=options, shutdown=shutdown,
                     task_status=task_status)


class ServeExtraMissing(ImportError):
    """The server's packages are not installed (the ``serve`` extra)."""


def server_app() -> ModuleType:
    """``troupe.server._app``, imported only when a server starts, so that ``import troupe``
    needs none of the server's packages; ServeExtraMissing (an ImportError) without them."""
    try:
        from .server import _app
    except ImportError as exc:
        raise ServeExtraMissing(f"troupe serve needs the serve extra: pip install "
                                f"'troupe[serve]' ({exc})") from exc
    return _app
