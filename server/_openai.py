"""OpenAI's API: /v1/models, /v1/chat/completions and /v1/responses."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import attrs
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import (
    Agent,
    AgentNotFoundError,
    Message,
    Reply,
    Runtime,
    Sampling,
    ToolCall,
    TroupeError,
)
from ._app import ServerState, state_of
from ._errors import ApiError, error_body, unsupported
from ._http import get_bool, get_dict, get_float, get_int, get_list, get_str, read_json
from ._sse import DONE, EventStream, data, event
from ._turns import (
    CallFilter,
    Conversation,
    OpenStream,
    Structure,
    api_error,
    arguments_json,
    call_arguments,
    call_name,
    reply_text,
    sampling,
    say,
    split_turn,
    structured_openai,
    text_of,
    usage_numbers,
    with_calls,
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
        Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
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
    """What this server does not serve is refused, not dropped."""
    if get_bool(body, "logprobs"):
        raise unsupported("logprobs", "logprobs")
    if get_int(body, "n", 1, 128, 1) != 1:
        raise unsupported("n other than 1", "n")
    for penalty in ("frequency_penalty", "presence_penalty"):
        if get_float(body, penalty, -2.0, 2.0, 0.0) != 0.0:
            raise unsupported(penalty, penalty)


def _messages(items: list[Any], param: str) -> tuple[str, list[Message]]:
    """(system, the other messages) of OpenAI's message list (chat completions) or input
    items (the Responses API's, ``function_call`` and ``function_call_output`` included).

    An assistant message's tool calls are written into its text in troupe's
    ``<tool_call>`` format; a tool result becomes a tool message (its ``tool_call_id`` is
    not kept: results follow their calls in order, as templates render them)."""
    system: list[str] = []
    messages: list[Message] = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object", param=param, code="invalid_value")
        role = item.get("role")
        kind = item.get("type")
        if kind == "function_call":
            call = [(call_name(item.get("name"), where, param),
                     call_arguments(item.get("arguments"), where, param))]
            if messages and messages[-1].role == "assistant":
                # A response's calls come as items of their own after its message.
                messages[-1] = Message("assistant", with_calls(messages[-1].content, call))
            else:
                messages.append(Message("assistant", with_calls("", call)))
            continue
        if kind == "function_call_output":
            messages.append(Message("tool", text_of(item.get("output"), f"{where}.output")))
            continue
        if kind not in (None, "message"):
            raise unsupported(f"{where}: items of type {kind!r}", param)
        if role == "function" or item.get("function_call"):
            raise unsupported(f"{where}: function messages (use tools)", param)
        if role in ("system", "developer"):
            system.append(text_of(item.get("content"), f"{where}.content"))
        elif role == "user":
            messages.append(Message(role, text_of(item.get("content"), f"{where}.content")))
        elif role == "assistant":
            calls = _calls(item.get("tool_calls"), f"{where}.tool_calls", param)
            content = item.get("content")
            text = "" if content is None and calls else text_of(content, f"{where}.content")
            messages.append(Message(role, with_calls(text, calls)))
        elif role == "tool":
            messages.append(Message(role, text_of(item.get("content"), f"{where}.content")))
        else:
            raise ApiError(400, f"{where}.role must be system, developer, user, assistant or "
                           f"tool, got {role!r}", param=param, code="invalid_value")
    return "\n\n".join(system), messages


def _calls(value: object, where: str, param: str) -> list[tuple[str, dict[str, Any]]]:
    """An assistant message's ``tool_calls``: (name, arguments) in order."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be an array", param=param, code="invalid_value")
    calls = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise ApiError(400, f"{where}[{i}].function must be an object", param=param,
                           code="invalid_value")
        calls.append((call_name(function.get("name"), f"{where}[{i}]", param),
                      call_arguments(function.get("arguments"), f"{where}[{i}]", param)))
    return calls


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
    structure = structured_openai(body)
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
            reply = await say(state.conversations, conversation, options, structure)
        finally:
            state.release()
        message: dict[str, Any] = {
            "role": "assistant", "refusal": None,
            "content": reply_text(reply, state.conversations.call_starts)}
        if reply.tool_calls:
            message["tool_calls"] = _tool_calls(reply)
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created,
            "model": state.model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "finish_reason": _finish(reply), "logprobs": None,
                         "message": message}],
            "usage": usage(reply),
        })
    return await _chat_stream(state, conversation, options, structure, ident, created,
                              include_usage)


def _finish(reply: Reply) -> str:
    return "tool_calls" if reply.tool_calls else reply.finish_reason


def _tool_calls(reply: Reply, *, indexed: bool = False) -> list[dict[str, Any]]:
    """A reply's calls in OpenAI's shape (``indexed``: as stream deltas)."""
    return [{**({"index": i} if indexed else {}), "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": arguments_json(call)}}
            for i, call in enumerate(reply.tool_calls)]


async def _chat_stream(
    state: ServerState, conversation: Conversation, options: Sampling, structure: Structure,
    ident: str, created: int, include_usage: bool,
) -> Response:
    opened = await state.open_stream(conversation, options, structure)
    calls = CallFilter(structure, state.conversations.call_starts)

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
                text = calls.feed(delta)
                if text:
                    yield chunk({"content": text})
            reply = opened.reply
            assert reply is not None
            held = calls.rest(reply)
            if held:
                yield chunk({"content": held})
            if reply.tool_calls:
                # Each call whole, in one delta, once the reply is in (as many servers do).
                yield chunk({"tool_calls": _tool_calls(reply, indexed=True)})
            yield chunk({}, _finish(reply))
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

    return EventStream(events(), opened.aclose)


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


@attrs.frozen
class _Chain:
    """What one /v1/responses request continues or starts."""

    chain: str
    conversation: Conversation
    fresh: bool  # a chain made for this request: deleted if its first turn fails
    stored: bool

    async def turns(self, rt: Runtime) -> int:
        return (await rt.get(self.chain)).statistics().turns if self.stored else 1

    async def failed(self, rt: Runtime) -> None:
        if self.fresh:
            # A chain whose first response failed is no chain.
            with anyio.CancelScope(shield=True), contextlib.suppress(TroupeError):
                await rt.delete(self.chain)


async def _chain(
    rt: Runtime, previous: str | None, store: bool, system: str, messages: list[Message]
) -> _Chain:
    if previous is not None:
        chain, turns = _chain_of(previous)
        try:
            agent = await rt.get(chain)
        except AgentNotFoundError:
            raise ApiError(404, f"no response {previous!r}", param="previous_response_id",
                           code="response_not_found") from None
        if agent.statistics().turns != turns:
            raise ApiError(400, f"{previous!r} is not the latest response of its chain: "
                           "only the latest can be continued", code="invalid_value",
                           param="previous_response_id")
        return _Chain(chain, split_turn("", messages, chain, param="input"), False, True)
    chain = f"resp_{secrets.token_hex(12)}"
    conversation = split_turn(system, messages, None, param="input")
    if not store:
        return _Chain(chain, conversation, False, False)
    await rt._spawn_with(chain, system, [
        *conversation.history, *(Message("user", t) for t in conversation.told)])
    return _Chain(chain, attrs.evolve(conversation, system="", history=(), told=(),
                                      agent_id=chain), True, True)


def _response(
    state: ServerState, rid: str, body: dict[str, Any], options: Sampling,
    reply: Reply | None, items: list[dict[str, Any]],
) -> dict[str, Any]:
    """The response object; ``reply`` None: one still in progress."""
    incomplete = reply is not None and reply.finish_reason == "length"
    usage = None
    if reply is not None:
        prompt, cached, completion = usage_numbers(reply)
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                 "output_tokens": completion,
                 "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt + completion}
    return {
        "id": rid, "object": "response", "created_at": int(time.time()),
        "status": ("in_progress" if reply is None
                   else "incomplete" if incomplete else "completed"),
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None, "model": state.model_id,
        "instructions": body.get("instructions") or None,
        "previous_response_id": body.get("previous_response_id"),
        "store": get_bool(body, "store", True),
        "temperature": options.temperature, "top_p": options.top_p,
        "max_output_tokens": options.max_tokens, "parallel_tool_calls": False,
        "tool_choice": body.get("tool_choice") or ("auto" if body.get("tools") else "none"),
        "tools": body.get("tools") or [],
        "text": {"format": (get_dict(body, "text") or {}).get("format") or {"type": "text"}},
        "metadata": {}, "output": items, "usage": usage,
    }


def _call_item(call: ToolCall, arguments: str | None = None) -> dict[str, Any]:
    """A function_call output item (``arguments`` None: complete, else in progress)."""
    return {"type": "function_call", "id": f"fc_{call.id}", "call_id": call.id,
            "name": call.name, "arguments": arguments_json(call) if arguments is None
            else arguments, "status": "completed" if arguments is None else "in_progress"}


def _output(state: ServerState, msg_id: str, reply: Reply) -> list[dict[str, Any]]:
    """A response's output items: its message (unless it is only calls), then its calls."""
    status = "incomplete" if reply.finish_reason == "length" else "completed"
    text = reply_text(reply, state.conversations.call_starts)
    items = [_message_item(msg_id, text or "", status)] if text is not None \
        or not reply.tool_calls else []
    return items + [_call_item(call) for call in reply.tool_calls]


def _message_item(ident: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status else []
    return {"type": "message", "id": ident, "role": "assistant",
            "status": status or "in_progress", "content": content}


async def responses(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, state.options.max_body_bytes)
    state.check_model(body.get("model"))
    _refuse_unsupported(body)
    structure = structured_openai(body, responses=True)
    if body.get("background"):
        raise unsupported("background", "background")
    options = _sampling(state, body, "max_output_tokens")
    system, messages = _input(body)
    instructions = get_str(body, "instructions") or ""
    system = "\n\n".join(s for s in (instructions, system) if s)
    previous = get_str(body, "previous_response_id")
    store = get_bool(body, "store", True)
    stream = get_bool(body, "stream")
    rt = state.rt
    state.admit()
    try:
        chain = await _chain(rt, previous, store, system, messages)
    except BaseException:
        state.release()
        raise
    msg_id = f"msg_{secrets.token_hex(12)}"
    if not stream:
        try:
            reply = await say(state.conversations, chain.conversation, options, structure)
        except BaseException:
            await chain.failed(rt)
            raise
        finally:
            state.release()
        rid = f"{chain.chain}_{await chain.turns(rt)}"
        return JSONResponse(_response(state, rid, body, options, reply,
                                      _output(state, msg_id, reply)))
    try:
        opened = await state.open_stream(chain.conversation, options, structure)
    except BaseException:
        await chain.failed(rt)
        raise
    return EventStream(_response_events(state, chain, opened, body, options, structure,
                                        msg_id), opened.aclose)


async def _response_events(
    state: ServerState, chain: _Chain, opened: OpenStream, body: dict[str, Any],
    options: Sampling, structure: Structure, msg_id: str,
) -> AsyncGenerator[bytes, None]:
    """OpenAI's event sequence for a streamed response: the message item (opened at once,
    or, when the reply may call tools, at its first text), then each call's item whole."""
    seq = 0

    def emit(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        seq += 1
        return event(kind, {"type": kind, "sequence_number": seq, **fields})

    part = {"type": "output_text", "text": "", "annotations": []}
    opened_message = False
    said: list[str] = []

    def open_message() -> list[bytes]:
        nonlocal opened_message
        opened_message = True
        return [emit("response.output_item.added", output_index=0,
                     item=_message_item(msg_id, "", "")),
                emit("response.content_part.added", item_id=msg_id, output_index=0,
                     content_index=0, part=part)]

    def text(delta: str) -> list[bytes]:
        if not delta:
            return []
        said.append(delta)
        return [*([] if opened_message else open_message()),
                emit("response.output_text.delta", item_id=msg_id, output_index=0,
                     content_index=0, delta=delta, logprobs=[])]

    calls = CallFilter(structure, state.conversations.call_starts)
    # The id is known once the turn is in: the chain's turns then.
    rid = f"{chain.chain}_{await chain.turns(state.rt) + 1 if chain.stored else 1}"
    try:
        started = _response(state, rid, body, options, None, [])
        yield emit("response.created", response=started)
        yield emit("response.in_progress", response=started)
        if not structure.calls:
            for out in open_message():
                yield out
        async for delta in opened.rest():
            for out in text(calls.feed(delta)):
                yield out
        reply = opened.reply
        assert reply is not None
        for out in text(calls.rest(reply)):
            yield out
        status = "incomplete" if reply.finish_reason == "length" else "completed"
        items = []
        if opened_message or not reply.tool_calls:
            for out in [] if opened_message else open_message():
                yield out
            whole = "".join(said)
            yield emit("response.output_text.done", item_id=msg_id, output_index=0,
                       content_index=0, text=whole, logprobs=[])
            yield emit("response.content_part.done", item_id=msg_id, output_index=0,
                       content_index=0, part={**part, "text": whole})
            items.append(_message_item(msg_id, whole, status))
            yield emit("response.output_item.done", output_index=0, item=items[-1])
        for call in reply.tool_calls:
            index, item = len(items), _call_item(call)
            yield emit("response.output_item.added", output_index=index,
                       item=_call_item(call, ""))
            yield emit("response.function_call_arguments.delta", item_id=item["id"],
                       output_index=index, delta=item["arguments"])
            yield emit("response.function_call_arguments.done", item_id=item["id"],
                       output_index=index, arguments=item["arguments"])
            items.append(item)
            yield emit("response.output_item.done", output_index=index, item=item)
        final = _response(state, rid, body, options, reply, items)
        yield emit(f"response.{status}", response=final)
    except Exception as exc:
        error = api_error(exc) or ApiError(500, "the turn failed", code="server_error")
        yield emit("error", code=error.code, message=error.message, param=error.param)
    finally:
        await opened.aclose()


async def _stored_chain(state: ServerState, response_id: str) -> tuple[str, int, Agent]:
    chain, turns = _chain_of(response_id)
    try:
        agent = await state.rt.get(chain)
    except AgentNotFoundError:
        raise ApiError(404, f"no response {response_id!r}",
                       code="response_not_found") from None
    if not 1 <= turns <= agent.statistics().turns:
        raise ApiError(404, f"no response {response_id!r}", code="response_not_found")
    return chain, turns, agent


async def get_response(request: Request) -> Response:
    """A stored response, read back from its chain's transcript (its text; the usage of
    a past turn is not kept)."""
    state = state_of(request)
    response_id = request.path_params["response_id"]
    _, turns, agent = await _stored_chain(state, response_id)
    replies = [m.content for m in agent.transcript() if m.role == "assistant"]
    body = {"instructions": agent.system or None,
            "previous_response_id": response_id.rpartition("_")[0] + f"_{turns - 1}"
            if turns > 1 else None}
    item = _message_item(f"msg_{response_id}", replies[turns - 1], "completed")
    response = _response(state, response_id, body, Sampling(), None, [item])
    response["status"] = "completed"
    return JSONResponse(response)


async def delete_response(request: Request) -> Response:
    """Deletes the whole chain the response belongs to (the agent it is)."""
    state = state_of(request)
    response_id = request.path_params["response_id"]
    chain, _, _ = await _stored_chain(state, response_id)
    await state.rt.delete(chain)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
