"""Anthropic's API: /v1/messages (and its event stream) and /v1/messages/count_tokens."""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import Message, Reply, Sampling, ToolCall
from ._app import ServerState, state_of
from ._errors import ApiError, error_body, unsupported
from ._http import get_bool, get_dict, get_float, get_int, get_list, read_json
from ._openai import AGENT_HEADER
from ._sse import EventStream, event
from ._turns import (
    CallFilter,
    Conversation,
    Structure,
    api_error,
    arguments_json,
    call_arguments,
    call_name,
    reply_text,
    sampling,
    say,
    split_turn,
    structured_anthropic,
    text_of,
    with_calls,
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
    """(system, messages): an assistant message's ``tool_use`` blocks are written into
    its text in troupe's ``<tool_call>`` format; a user message's ``tool_result`` blocks
    become tool messages (their ``tool_use_id`` is not kept: results follow their calls
    in order), its text blocks user messages, in the order given."""
    items = get_list(body, "messages")
    if not items:
        raise ApiError(400, "messages: must be a non-empty array", param="messages")
    messages: list[Message] = []
    for i, item in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"{where}: must be an object whose role is user or assistant",
                           param="messages")
        content = item.get("content")
        if not isinstance(content, list):
            messages.append(Message(item["role"], text_of(content, f"{where}.content")))
            continue
        if item["role"] == "assistant":
            parts, calls = [], []
            for j, block in enumerate(content):
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    at = f"{where}.content.{j}"
                    calls.append((call_name(block.get("name"), at, "messages"),
                                  call_arguments(block.get("input", {}), at, "messages")))
                elif not calls:
                    parts.append(text_of([block], f"{where}.content"))
                else:
                    raise ApiError(400, f"{where}.content.{j}: text after a tool_use block "
                                   "is not supported", param="messages")
            messages.append(Message("assistant", with_calls("".join(parts), calls)))
            continue
        for j, block in enumerate(content):
            if isinstance(block, dict) and block.get("type") == "tool_result":
                result = block.get("content", "")
                output = text_of(result, f"{where}.content.{j}.content")
                # The model should know a call failed: the error is the result's text.
                messages.append(Message("tool", f"error: {output}" if block.get("is_error")
                                        else output))
            else:
                said = text_of([block], f"{where}.content")
                if messages and messages[-1].role == "user" and j > 0:
                    messages[-1] = Message("user", messages[-1].content + said)
                else:
                    messages.append(Message("user", said))
    return _system(body), messages


def _agent(request: Request, body: dict[str, Any]) -> str | None:
    agent = request.headers.get(AGENT_HEADER)
    if agent is None:
        metadata = get_dict(body, "metadata") or {}
        value = metadata.get("troupe_agent")
        agent = value if isinstance(value, str) else None
    return agent


def _stop_reason(state: ServerState, reply: Reply, stops: list[str]) -> tuple[str, str | None]:
    if reply.tool_calls:
        return "tool_use", None
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
    structure = structured_anthropic(body)
    system, history = _conversation(body)
    conversation = split_turn(system, history, _agent(request, body))
    ident = f"msg_{secrets.token_hex(12)}"
    state.admit()
    if not get_bool(body, "stream"):
        try:
            reply = await say(state.conversations, conversation, options, structure)
        finally:
            state.release()
        stop_reason, stop_sequence = _stop_reason(state, reply, stops)
        text = reply_text(reply, state.conversations.call_starts)
        content = [{"type": "text", "text": text}] if text is not None else []
        content += [_tool_use(call) for call in reply.tool_calls]
        return JSONResponse({
            "id": ident, "type": "message", "role": "assistant", "model": state.model_id,
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": _usage(reply)})
    return await _stream(state, conversation, options, structure, ident, stops)


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}


async def _stream(
    state: ServerState, conversation: Conversation, options: Sampling, structure: Structure,
    ident: str, stops: list[str],
) -> Response:
    opened = await state.open_stream(conversation, options, structure)
    calls = CallFilter(structure, state.conversations.call_starts)

    async def events() -> AsyncGenerator[bytes, None]:
        blocks = 0  # content blocks started; the text block, if any, is the first

        def text(delta: str) -> list[bytes]:
            nonlocal blocks
            if not delta:
                return []
            start = []
            if not blocks:
                blocks = 1
                start = [event("content_block_start", {
                    "type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}})]
            return [*start, event("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": delta}})]

        try:
            yield event("message_start", {"type": "message_start", "message": {
                "id": ident, "type": "message", "role": "assistant", "model": state.model_id,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}})
            if not structure.calls:
                # A reply without tools always has its text block, opened at once.
                blocks = 1
                yield event("content_block_start", {
                    "type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}})
            yield event("ping", {"type": "ping"})
            async for delta in opened.rest():
                for out in text(calls.feed(delta)):
                    yield out
            reply = opened.reply
            assert reply is not None
            for out in text(calls.rest(reply)):
                yield out
            if blocks:
                yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            for call in reply.tool_calls:
                # Each call whole: its block, its input as one JSON delta, its end.
                yield event("content_block_start", {
                    "type": "content_block_start", "index": blocks,
                    "content_block": {**_tool_use(call), "input": {}}})
                yield event("content_block_delta", {
                    "type": "content_block_delta", "index": blocks,
                    "delta": {"type": "input_json_delta",
                              "partial_json": arguments_json(call)}})
                yield event("content_block_stop", {"type": "content_block_stop",
                                                   "index": blocks})
                blocks += 1
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
