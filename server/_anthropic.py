"""Anthropic's API: /v1/messages (and its event stream) and /v1/messages/count_tokens."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import Message, Reply, Sampling
from ._app import ServerState, state_of
from ._errors import ApiError, error_body, unsupported
from ._http import get_bool, get_dict, get_float, get_int, get_list, read_json
from ._openai import AGENT_HEADER
from ._sse import EventStream, event
from ._turns import (
    Conversation,
    api_error,
    open_stream,
    sampling,
    say,
    split_turn,
    structured_anthropic,
    text_of,
)


def routes() -> list[Route]:
    return [
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ]


def _system(body: dict[str, Any]) -> str:
    value = body.get("system")
    if value is None:
        return ""
    return text_of(value, "system")


def _conversation(body: dict[str, Any]) -> tuple[str, list[Message]]:
    structured_anthropic(body)
    items = get_list(body, "messages")
    if not items:
        raise ApiError(400, "messages: must be a non-empty array", param="messages")
    messages = []
    for i, item in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"{where}: must be an object whose role is user or assistant",
                           param="messages")
        messages.append(Message(item["role"], text_of(item.get("content"), f"{where}.content")))
    return _system(body), messages


def _agent(request: Request, body: dict[str, Any]) -> str | None:
    agent = request.headers.get(AGENT_HEADER)
    if agent is None:
        metadata = get_dict(body, "metadata") or {}
        value = metadata.get("troupe_agent")
        agent = value if isinstance(value, str) else None
    return agent


def _stop_reason(state: ServerState, reply: Reply, stops: list[str]) -> tuple[str, str | None]:
    if reply.finish_reason == "length":
        return "max_tokens", None
    ended_by_eos = bool(reply.tokens) and reply.tokens[-1] in state.rt.model.eos_token_ids
    if stops and not ended_by_eos:
        return "stop_sequence", stops[0] if len(stops) == 1 else None
    return "end_turn", None


def _usage(reply: Reply) -> dict[str, Any]:
    # Anthropic counts cached prompt tokens apart from input_tokens.
    return {"input_tokens": reply.prompt_tokens, "output_tokens": len(reply.tokens),
            "cache_read_input_tokens": reply.cached_tokens, "cache_creation_input_tokens": 0}


async def messages(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, state.options.max_body_bytes)
    state.check_model(body.get("model"))
    limit = state.rt.model.context_length
    max_tokens = get_int(body, "max_tokens", 1, limit)
    if max_tokens is None:
        raise ApiError(400, "max_tokens: a number of tokens is required", param="max_tokens")
    if body.get("top_k") is not None:
        raise unsupported("top_k", "top_k")
    thinking = get_dict(body, "thinking")
    if thinking is not None and thinking.get("type") != "disabled":
        raise unsupported("thinking", "thinking")
    stops = get_list(body, "stop_sequences") or []
    options = sampling(max_tokens, get_float(body, "temperature", 0.0, 1.0, 1.0),
                       get_float(body, "top_p", 0.0, 1.0, 1.0), None, stops,
                       param="stop_sequences")
    system, history = _conversation(body)
    conversation = split_turn(system, history, _agent(request, body))
    ident = f"msg_{secrets.token_hex(12)}"
    state.admit()
    if not get_bool(body, "stream"):
        try:
            reply = await say(state.conversations, conversation, options)
        finally:
            state.release()
        stop_reason, stop_sequence = _stop_reason(state, reply, stops)
        return JSONResponse({
            "id": ident, "type": "message", "role": "assistant", "model": state.model_id,
            "content": [{"type": "text", "text": reply.text}],
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": _usage(reply)})
    return await _stream(state, conversation, options, ident, stops)


async def _stream(
    state: ServerState, conversation: Conversation, options: Sampling, ident: str,
    stops: list[str],
) -> Response:
    started = time.perf_counter()
    try:
        opened = await open_stream(state.conversations, conversation, options,
                                   on_close=state.release)
    except BaseException:
        state.release()
        raise
    state.metrics.ttft.observe(time.perf_counter() - started)

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            yield event("message_start", {"type": "message_start", "message": {
                "id": ident, "type": "message", "role": "assistant", "model": state.model_id,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}})
            yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})
            yield event("ping", {"type": "ping"})
            async for delta in opened.rest():
                yield event("content_block_delta", {
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": delta}})
            reply = opened.stream.reply
            assert reply is not None
            yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            stop_reason, stop_sequence = _stop_reason(state, reply, stops)
            yield event("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": _usage(reply)})
            yield event("message_stop", {"type": "message_stop"})
        except Exception as exc:
            error = api_error(exc) or ApiError(500, "the turn failed")
            yield event("error", error_body(error, "anthropic"))
        finally:
            await opened.aclose()

    return EventStream(events(), opened.aclose)


async def count_tokens(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, state.options.max_body_bytes)
    state.check_model(body.get("model"))
    system, history = _conversation(body)
    return JSONResponse({"input_tokens": await state.rt._count_tokens(system, history)})
