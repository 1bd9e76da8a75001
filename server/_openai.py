"""OpenAI's API: /v1/models, /v1/chat/completions and /v1/responses."""

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
from ._http import get_bool, get_dict, get_float, get_int, get_list, get_str, read_json
from ._sse import DONE, EventStream, data
from ._turns import (
    Conversation,
    api_error,
    open_stream,
    sampling,
    say,
    split_turn,
    text_of,
    usage_numbers,
)

DEFAULT_MAX_TOKENS = 512
MAX_SEED = 2**63 - 1
# A request names an agent to speak as that agent (its history is its own).
AGENT_HEADER = "x-troupe-agent"


def routes() -> list[Route]:
    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
    ]


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_id, "object": "model", "created": 0, "owned_by": "troupe"}


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(state_of(request))]})


async def model(request: Request) -> Response:
    state = state_of(request)
    state.check_model(request.path_params["model"])
    return JSONResponse(_model_card(state))


def named_agent(request: Request, body: dict[str, Any]) -> str | None:
    """The agent a request speaks as: the X-Troupe-Agent header or metadata.troupe_agent."""
    agent = request.headers.get(AGENT_HEADER)
    metadata = get_dict(body, "metadata") or {}
    if agent is None:
        value = metadata.get("troupe_agent")
        if value is not None and not isinstance(value, str):
            raise ApiError(400, "metadata.troupe_agent must be a string", param="metadata",
                           code="invalid_value")
        agent = value
    return agent


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """What needs typed replies and tools (not in this server yet) is refused, not dropped."""
    if body.get("tools"):
        raise unsupported("tools", "tools")
    if body.get("functions"):
        raise unsupported("functions", "functions")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise unsupported("tool_choice", "tool_choice")
    response_format = get_dict(body, "response_format")
    if response_format is not None and response_format.get("type") not in (None, "text"):
        raise unsupported(f"response_format {response_format.get('type')!r}", "response_format")
    text = get_dict(body, "text")
    if text is not None:
        fmt = text.get("format")
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            raise unsupported(f"text.format {fmt.get('type')!r}", "text")
    if get_bool(body, "logprobs"):
        raise unsupported("logprobs", "logprobs")
    if get_int(body, "n", 1, 128, 1) != 1:
        raise unsupported("n other than 1", "n")
    for penalty in ("frequency_penalty", "presence_penalty"):
        if get_float(body, penalty, -2.0, 2.0, 0.0) != 0.0:
            raise unsupported(penalty, penalty)


def _messages(items: list[Any], param: str) -> tuple[str, list[Message]]:
    """(system, the other messages) of OpenAI's message list."""
    system: list[str] = []
    messages: list[Message] = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object", param=param, code="invalid_value")
        role = item.get("role")
        if item.get("type") not in (None, "message"):
            raise unsupported(f"{where}: items of type {item.get('type')!r}", param)
        if role in ("tool", "function") or item.get("tool_calls") or item.get("function_call"):
            raise unsupported(f"{where}: tool calls and tool results", param)
        if role in ("system", "developer"):
            system.append(text_of(item.get("content"), f"{where}.content"))
        elif role in ("user", "assistant"):
            messages.append(Message(role, text_of(item.get("content"), f"{where}.content")))
        else:
            raise ApiError(400, f"{where}.role must be system, developer, user or assistant, "
                           f"got {role!r}", param=param, code="invalid_value")
    return "\n\n".join(system), messages


def _sampling(state: ServerState, body: dict[str, Any], *names: str) -> Sampling:
    limit = state.rt.model.context_length
    max_tokens = None
    for name in names:
        max_tokens = max_tokens or get_int(body, name, 1, limit)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str | list):
        raise ApiError(400, "stop must be a string or an array of strings", param="stop",
                       code="invalid_value")
    return sampling(
        max_tokens or min(DEFAULT_MAX_TOKENS, limit),
        get_float(body, "temperature", 0.0, 2.0, 1.0),
        get_float(body, "top_p", 0.0, 1.0, 1.0),
        _seed(body), stop,
    )


def _seed(body: dict[str, Any]) -> int | None:
    # OpenAI takes any integer; troupe's seeds are in [0, 2**63).
    seed = get_int(body, "seed", -MAX_SEED - 1, MAX_SEED)
    return None if seed is None else seed % 2**63


def usage(reply: Reply) -> dict[str, Any]:
    prompt, cached, completion = usage_numbers(reply)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def chat_completions(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, state.options.max_body_bytes)
    state.check_model(body.get("model"))
    _refuse_unsupported(body)
    items = get_list(body, "messages")
    if not items:
        raise ApiError(400, "messages must be a non-empty array", param="messages",
                       code="invalid_value")
    system, messages = _messages(items, "messages")
    conversation = split_turn(system, messages, named_agent(request, body))
    options = _sampling(state, body, "max_completion_tokens", "max_tokens")
    stream = get_bool(body, "stream")
    stream_options = get_dict(body, "stream_options") or {}
    include_usage = get_bool(stream_options, "include_usage")
    ident = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    state.admit()
    if not stream:
        try:
            reply = await say(state.conversations, conversation, options)
        finally:
            state.release()
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created,
            "model": state.model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "finish_reason": reply.finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": reply.text,
                                     "refusal": None}}],
            "usage": usage(reply),
        })
    return await _chat_stream(state, conversation, options, ident, created, include_usage)


async def _chat_stream(
    state: ServerState, conversation: Conversation, options: Sampling, ident: str,
    created: int, include_usage: bool,
) -> Response:
    started = time.perf_counter()
    try:
        opened = await open_stream(state.conversations, conversation, options)
    except BaseException:
        state.release()
        raise
    state.metrics.ttft.observe(time.perf_counter() - started)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": ident, "object": "chat.completion.chunk", "created": created,
            "model": state.model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                         "logprobs": None}]}
        if include_usage:
            payload["usage"] = None
        return data(payload)

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            yield chunk({"role": "assistant", "content": ""})
            last = time.perf_counter()
            async for delta in opened.rest():
                now = time.perf_counter()
                state.metrics.inter_token.observe(now - last)
                last = now
                yield chunk({"content": delta})
            reply = opened.stream.reply
            assert reply is not None
            yield chunk({}, reply.finish_reason)
            if include_usage:
                yield data({"id": ident, "object": "chat.completion.chunk", "created": created,
                            "model": state.model_id, "choices": [], "usage": usage(reply)})
            yield DONE
        except Exception as exc:
            # The status line is sent: the error goes in the stream, in the API's shape.
            error = api_error(exc) or ApiError(500, "the turn failed", code="server_error")
            yield data(error_body(error, "openai"))
        finally:
            await opened.aclose()
            state.release()

    return EventStream(events())


# -- /v1/responses: a response chain is an agent

def _chain_of(response_id: str) -> tuple[str, int]:
    """(agent id, turns) a response id names: ``resp_<chain>_<turns>``."""
    chain, _, turns = response_id.rpartition("_")
    if not chain.startswith("resp_") or not turns.isdigit():
        raise ApiError(404, f"no response {response_id!r}", param="previous_response_id",
                       code="response_not_found")
    return chain, int(turns)


def _input(body: dict[str, Any]) -> tuple[str, list[Message]]:
    value = body.get("input")
    if isinstance(value, str):
        return "", [Message("user", value)]
    if isinstance(value, list) and value:
        return _messages(value, "input")
    raise ApiError(400, "input must be a string or a non-empty array of messages",
                   param="input", code="invalid_value")


async def responses(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, state.options.max_body_bytes)
    state.check_model(body.get("model"))
    _refuse_unsupported(body)
    if get_bool(body, "stream"):
        raise unsupported("stream on /v1/responses", "stream")
    if body.get("background"):
        raise unsupported("background", "background")
    options = _sampling(state, body, "max_output_tokens")
    system, messages = _input(body)
    instructions = get_str(body, "instructions") or ""
    system = "\n\n".join(s for s in (instructions, system) if s)
    previous = get_str(body, "previous_response_id")
    store = get_bool(body, "store", True)
    rt = state.rt
    state.admit()
    try:
        if previous is not None:
            chain, turns = _chain_of(previous)
            if chain not in rt.agent_ids():
                raise ApiError(404, f"no response {previous!r}", param="previous_response_id",
                               code="response_not_found")
            agent = await rt.get(chain)
            if agent.statistics().turns != turns:
                raise ApiError(400, f"{previous!r} is not the latest response of its chain: "
                               "only the latest can be continued", code="invalid_value",
                               param="previous_response_id")
            conversation = split_turn("", messages, chain, param="input")
            reply = await say(state.conversations, conversation, options)
        elif store:
            chain = f"resp_{secrets.token_hex(12)}"
            conversation = split_turn(system, messages, None, param="input")
            agent = await rt._spawn_with(chain, system, [
                *conversation.history, *(Message("user", t) for t in conversation.told)])
            conversation = Conversation("", (), (), conversation.last, chain)
            reply = await say(state.conversations, conversation, options)
        else:
            chain = f"resp_{secrets.token_hex(12)}"
            conversation = split_turn(system, messages, None, param="input")
            reply = await say(state.conversations, conversation, options)
    finally:
        state.release()
    turns = (await rt.get(chain)).statistics().turns if store or previous else 1
    prompt, cached, completion = usage_numbers(reply)
    incomplete = reply.finish_reason == "length"
    return JSONResponse({
        "id": f"{chain}_{turns}", "object": "response", "created_at": int(time.time()),
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None, "model": state.model_id, "instructions": instructions or None,
        "previous_response_id": previous, "store": store,
        "temperature": options.temperature, "top_p": options.top_p,
        "max_output_tokens": options.max_tokens, "parallel_tool_calls": False,
        "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}},
        "metadata": {}, "output": [{
            "type": "message", "id": f"msg_{secrets.token_hex(12)}", "role": "assistant",
            "status": "incomplete" if incomplete else "completed",
            "content": [{"type": "output_text", "text": reply.text, "annotations": []}]}],
        "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                  "output_tokens": completion,
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": prompt + completion},
    })
