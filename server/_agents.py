"""The agents API: troupe's own agents over HTTP (create, list, get, turn, tell, fork,
delete), and the runtime's statistics. Documented in the OpenAPI schema (_schema)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator
from typing import Any

import attrs
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import Agent, Message, Reply
from ._app import state_of
from ._errors import ApiError, error_body
from ._http import get_bool, get_float, get_int, get_str, read_json
from ._sse import DONE, EventStream, data
from ._turns import (
    Conversation,
    api_error,
    sampling,
    say,
    structured_agents,
    usage_numbers,
)

MAX_PAGE = 1000
MAX_SEED = 2**63 - 1


def routes() -> list[Route]:
    # Agent ids may hold "/": the longer paths are matched first.
    return [
        Route("/v1/agents", create, methods=["POST"]),
        Route("/v1/agents", list_agents, methods=["GET"]),
        Route("/v1/agents/{agent_id:path}/turns", turn, methods=["POST"]),
        Route("/v1/agents/{agent_id:path}/tell", tell, methods=["POST"]),
        Route("/v1/agents/{agent_id:path}/fork", fork, methods=["POST"]),
        Route("/v1/agents/{agent_id:path}", get, methods=["GET"]),
        Route("/v1/agents/{agent_id:path}", delete, methods=["DELETE"]),
        Route("/v1/statistics", statistics, methods=["GET"]),
    ]


def _card(agent: Agent, *, transcript: bool = False) -> dict[str, Any]:
    card: dict[str, Any] = {"id": agent.id, "object": "agent", "system": agent.system,
                            "statistics": attrs.asdict(agent.statistics())}
    if transcript:
        card["transcript"] = [{"role": m.role, "content": m.content}
                              for m in agent.transcript()]
    return card


def _reply(reply: Reply) -> dict[str, Any]:
    prompt, cached, completion = usage_numbers(reply)
    return {"object": "agent.reply", "agent_id": reply.agent_id, "text": reply.text,
            "finish_reason": reply.finish_reason, "data": reply.data,
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments}
                           for c in reply.tool_calls],
            "usage": {"prompt_tokens": prompt, "cached_tokens": cached,
                      "completion_tokens": completion}}


async def create(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, state.options.max_body_bytes)
    agent_id = get_str(body, "id") or f"agent-{secrets.token_hex(8)}"
    system = get_str(body, "system") or ""
    agent = await state.rt.spawn(agent_id, system=system)
    return JSONResponse(_card(agent), status_code=201)


async def list_agents(request: Request) -> Response:
    ids = state_of(request).rt.agent_ids()
    query = request.query_params
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        raise ApiError(400, "limit must be an integer", param="limit") from None
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, f"limit must be from 1 to {MAX_PAGE}", param="limit")
    start = 0
    after = query.get("after")
    if after is not None:
        if after not in ids:
            raise ApiError(404, f"no agent {after!r} to list after", param="after",
                           code="agent_not_found")
        start = ids.index(after) + 1
    page = ids[start : start + limit]
    return JSONResponse({"object": "list", "data": [{"id": i, "object": "agent"} for i in page],
                         "has_more": start + limit < len(ids),
                         "last_id": page[-1] if page else None})


async def get(request: Request) -> Response:
    agent = await state_of(request).rt.get(request.path_params["agent_id"])
    return JSONResponse(_card(agent, transcript=True))


async def delete(request: Request) -> Response:
    agent_id = request.path_params["agent_id"]
    await state_of(request).rt.delete(agent_id)
    return JSONResponse({"id": agent_id, "object": "agent.deleted", "deleted": True})


async def tell(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, state.options.max_body_bytes)
    message = get_str(body, "message")
    if message is None:
        raise ApiError(400, "message: a string is required", param="message")
    agent = await state.rt.get(request.path_params["agent_id"])
    await agent.tell(message)
    return JSONResponse({"id": agent.id, "object": "agent.told"}, status_code=202)


async def fork(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, state.options.max_body_bytes)
    new_id = get_str(body, "id")
    if new_id is None:
        raise ApiError(400, "id: the new agent's id is required", param="id")
    agent = await state.rt.get(request.path_params["agent_id"])
    return JSONResponse(_card(await agent.fork(new_id)), status_code=201)


async def turn(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, state.options.max_body_bytes)
    structure = structured_agents(body)
    message = get_str(body, "message")
    results = body.get("tool_results")
    if results is not None:
        # The turn answers the tools' results (as Agent.run's next turn), not a message.
        if message is not None or not isinstance(results, list) or not results \
                or not all(isinstance(r, str) for r in results):
            raise ApiError(400, "tool_results: a non-empty array of strings, instead of "
                           "message", param="tool_results")
    elif message is None:
        raise ApiError(400, "message: a string is required", param="message")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str | list):
        raise ApiError(400, "stop must be a string or an array of strings", param="stop")
    options = sampling(
        get_int(body, "max_tokens", 1, state.rt.model.context_length, 256) or 256,
        get_float(body, "temperature", 0.0, 2.0, 0.0),
        get_float(body, "top_p", 0.0, 1.0, 1.0),
        get_int(body, "seed", 0, MAX_SEED), stop)
    agent_id = request.path_params["agent_id"]
    await state.rt.get(agent_id)  # 404 now, before any stream starts
    conversation = Conversation("", (), (), message or "", agent_id,
                                tuple(Message("tool", r) for r in results or ()))
    state.admit()
    if not get_bool(body, "stream"):
        try:
            reply = await say(state.conversations, conversation, options, structure)
        finally:
            state.release()
        return JSONResponse(_reply(reply))
    opened = await state.open_stream(conversation, options, structure)

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            async for delta in opened.rest():
                yield data({"object": "agent.delta", "delta": delta})
            assert opened.reply is not None
            yield data(_reply(opened.reply))
            yield DONE
        except Exception as exc:
            error = api_error(exc) or ApiError(500, "the turn failed")
            yield data(error_body(error, "openai"))
        finally:
            await opened.aclose()

    return EventStream(events(), opened.aclose)


async def statistics(request: Request) -> Response:
    return JSONResponse({"object": "runtime.statistics",
                         **attrs.asdict(state_of(request).rt.statistics())})
