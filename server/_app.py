"""The app (Starlette) and the server (Hypercorn, under trio or asyncio).

A front layer wraps every request: authentication, the per-key rate limit, metrics and one
JSON log line; the routes live in _openai, _anthropic and _agents.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import attrs
import sniffio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import Runtime, Sampling, TroupeError
from .._serve import ServeOptions
from ._errors import ApiError, error_response
from ._metrics import Metrics
from ._turns import Conversation, Conversations, OpenStream, Structure, api_error, open_stream

logger = logging.getLogger("troupe.server")

# Paths anyone may ask, with keys or without: liveness probes must not need a secret.
PUBLIC_PATHS = frozenset({"/health"})


@attrs.define(eq=False)
class ServerState:
    """What the routes share: the runtime, the options, the metrics, the admission."""

    rt: Runtime
    options: ServeOptions
    metrics: Metrics
    model_id: str
    conversations: Conversations
    pending: int = 0

    def admit(self) -> None:
        """Count one more turn, or refuse it with 503 when ``max_pending`` are under way, or
        when turns under way hold more KV than the runtime's budget: a bounded queue, whose
        clients retry, rather than an unbounded one."""
        if self.pending >= self.options.max_pending:
            raise ApiError(503, f"the server is busy ({self.pending} turns under way); retry",
                           code="overloaded", retry_after=1.0)
        if self.pending and self.rt._kv_over_budget():
            # The batch holds more KV than the budget: more turns would only queue.
            raise ApiError(503, "the server's KV budget is full with turns under way; retry",
                           code="overloaded", retry_after=1.0)
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1

    async def open_stream(
        self, conversation: Conversation, options: Sampling, structure: Structure
    ) -> OpenStream:
        """Open an admitted turn's stream (``_turns.open_stream``): its admission is
        released when the stream closes, or now if it fails to open; the time to its first
        delta goes to the TTFT histogram."""
        started = time.perf_counter()
        try:
            opened = await open_stream(self.conversations, conversation, options,
                                       on_close=self.release, structure=structure)
        except BaseException:
            self.release()
            raise
        self.metrics.ttft.observe(time.perf_counter() - started)
        return opened

    def check_model(self, model: object, param: str = "model") -> None:
        if not isinstance(model, str):
            raise ApiError(400, f"{param}: must be a string naming the model",
                           param=param, code="invalid_value")
        if model != self.model_id:
            raise ApiError(404, f"the model {model!r} does not exist here; this server "
                           f"serves {self.model_id!r}", param=param, code="model_not_found")


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.troupe
    return state


class _Bucket:
    """A token bucket: ``rate`` per second, at most ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


MAX_BUCKETS = 65536


class Front:
    """The layer every request passes first: auth, rate limit, metrics, the log line."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        # Keys are compared as digests, each in constant time, every key every time.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in state.options.api_keys]
        self._buckets: dict[str, _Bucket] = {}

    def _key(self, scope: Scope) -> str | None:
        """The key the request presents, or None."""
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"x-api-key")
        if value is None:
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() == b"bearer":
                value = token.strip()
        return None if value is None else value.decode("latin-1")

    def _authorized(self, key: str | None) -> bool:
        if not self._digests:
            return True
        if key is None:
            return False
        digest = hashlib.sha256(key.encode()).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found

    def _wait(self, who: str) -> float:
        options = self.state.options
        if options.rate_limit is None:
            return 0.0
        bucket = self._buckets.get(who)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.clear()  # many clients: forgetting them all is the safe side
            bucket = self._buckets[who] = _Bucket(options.rate_limit, options.rate_burst)
        return bucket.take()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        status = 500
        key = self._key(scope)

        logged = False

        def log() -> None:
            # Once per request, before its last byte goes out: a client that has its
            # answer finds the request logged and counted.
            nonlocal logged
            if logged:
                return
            logged = True
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics = self.state.metrics
            metrics.requests.labels(route, str(status)).inc()
            metrics.duration.labels(route).observe(elapsed)
            logger.info("%s", json.dumps({
                "ts": round(time.time(), 3), "method": scope["method"], "path": path,
                "route": route, "status": status, "ms": round(elapsed * 1000, 1),
                # A key's fingerprint, never the key: enough to tell clients apart.
                "key": hashlib.sha256(key.encode()).hexdigest()[:8] if key else None,
                "client": (scope.get("client") or ("?",))[0],
            }, separators=(",", ":")))

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                log()
            await send(message)

        try:
            if path not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
                if not self._authorized(key):
                    error = ApiError(401, "a valid API key is required (Authorization: "
                                     "Bearer KEY or x-api-key: KEY)", code="invalid_api_key")
                    await error_response(error, path)(scope, receive, sending)
                    return
                client = scope.get("client")
                who = key if self._digests and key else (client[0] if client else "?")
                wait = self._wait(who)
                if wait > 0:
                    error = ApiError(429, "rate limit reached; retry after the time in "
                                     "Retry-After", code="rate_limit_exceeded", retry_after=wait)
                    await error_response(error, path)(scope, receive, sending)
                    return
            await self.app(scope, receive, sending)
        finally:
            log()


async def _health(request: Request) -> Response:
    rt = state_of(request).rt
    ready = not rt.closed
    return JSONResponse({"status": "ok" if ready else "closing", "live": True, "ready": ready},
                        status_code=200 if ready else 503)


async def _metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


def _handlers() -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    async def on_error(request: Request, exc: Exception) -> Response:
        error = api_error(exc)
        if error is None:
            logger.exception("unexpected error on %s", request.url.path, exc_info=exc)
            error = ApiError(500, "the server failed on this request", code="server_error")
        return error_response(error, request.url.path)

    async def on_http(request: Request, exc: Exception) -> Response:
        from starlette.exceptions import HTTPException

        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code),
                              request.url.path)

    from starlette.exceptions import HTTPException

    # The errors a request can cause are answered here; only the unexpected reach
    # Exception (a 500 in the API's shape, and the traceback in the log, not the response).
    return {ApiError: on_error, TroupeError: on_error, ValueError: on_error,
            TypeError: on_error, HTTPException: on_http, Exception: on_error}


def make_app(rt: Runtime, options: ServeOptions | None = None) -> Front:
    """The ASGI app serving ``rt`` (to run under another ASGI server; ``serve`` runs it)."""
    from . import _agents, _anthropic, _openai, _schema

    options = options or ServeOptions()
    state = ServerState(rt, options, Metrics(rt), options.model_name or rt.model.name,
                        Conversations(rt, options.kept_conversations))
    state.metrics.watch(state.conversations)
    routes = [
        Route("/health", _health, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        *_openai.routes(), *_anthropic.routes(), *_agents.routes(), *_schema.routes(),
    ]
    middleware = []
    if options.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                                     allow_methods=["*"], allow_headers=["*"]))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=_handlers())
    app.state.troupe = state
    return Front(app, state)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host.strip("[]"), port), family=family, backlog=1024)


async def serve(
    rt: Runtime,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServeOptions | None = None,
    shutdown: anyio.Event | None = None,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``rt`` over HTTP until cancelled, or until ``shutdown`` is set: then it stops
    accepting, lets requests in flight finish for ``options.grace_seconds``, cancels the
    rest and returns. Under trio or asyncio.

    Start it with ``await task_group.start(troupe.serve, rt, ...)`` to get the URL it
    listens on (``port=0`` picks a free port). ValueError if ``host`` is not a loopback
    address and no API key is set, unless ``options.insecure_no_auth``; OSError if the
    address cannot be bound.
    """
    import hypercorn.config

    options = options or ServeOptions()
    if not options.api_keys and not options.insecure_no_auth and not is_loopback(host):
        raise ValueError(f"refusing to serve {host} without an API key: give one "
                         "(--api-key), or --insecure-no-auth to serve it open")
    app = make_app(rt, options)
    sock = _listen(host, port)
    bound = sock.getsockname()
    url = f"http://{'[' + bound[0] + ']' if ':' in bound[0] else bound[0]}:{bound[1]}"
    config = hypercorn.config.Config()
    config.bind = [f"fd://{sock.detach()}"]  # Hypercorn owns the socket from here
    config.graceful_timeout = options.grace_seconds
    config.accesslog = None  # the Front logs one JSON line per request instead
    config.errorlog = logging.getLogger("troupe.server.hypercorn")
    stop = shutdown or anyio.Event()

    async def trigger() -> None:
        await stop.wait()

    try:
        if sniffio.current_async_library() == "trio":
            import hypercorn.trio

            async with anyio.create_task_group() as tg:
                await tg.start(functools.partial(
                    hypercorn.trio.serve, app, config,  # type: ignore[arg-type]
                    shutdown_trigger=trigger))
                logger.debug("serving %s on %s", rt.model.name, url)
                task_status.started(url)
        else:
            logger.debug("serving %s on %s", rt.model.name, url)
            task_status.started(url)
            await _serve_asyncio(app, config, stop)
    finally:
        # The short-lived agents kept for stateless clients go with the server.
        with anyio.CancelScope(shield=True):
            await app.state.conversations.aclose()


async def _serve_asyncio(app: ASGIApp, config: Any, stop: anyio.Event) -> None:
    """Hypercorn's asyncio server does not survive being cancelled (it fails in its own
    shutdown): it runs shielded, and a cancellation becomes a shutdown with no grace."""
    import hypercorn.asyncio

    finished = anyio.Event()

    async def run() -> None:
        try:
            with anyio.CancelScope(shield=True):
                await hypercorn.asyncio.serve(app, config,  # type: ignore[arg-type]
                                              shutdown_trigger=stop.wait)
        finally:
            finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            await finished.wait()
        except anyio.get_cancelled_exc_class():
            config.graceful_timeout = 0.0
            stop.set()
            with anyio.CancelScope(shield=True):
                await finished.wait()
            raise
