"""The OpenAPI document the server publishes at /openapi.json (what the fuzz test reads)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ._app import state_of

_STR = {"type": "string"}
_TEXT_PARTS = {"type": "array", "items": {"type": "object", "required": ["type", "text"],
               "properties": {"type": {"type": "string", "enum": ["text"]}, "text": _STR}}}
_CONTENT = {"oneOf": [_STR, _TEXT_PARTS]}
_STOP = {"oneOf": [_STR, {"type": "array", "items": _STR, "maxItems": 16}]}
# Tools and response formats: JSON Schemas are objects the grammar engine compiles (a 400
# for one it cannot).
_FUNCTION_FIELDS: dict[str, Any] = {
    "name": _STR, "description": _STR, "parameters": {"type": "object"}}
_FUNCTION = {"type": "object", "required": ["name"], "properties": _FUNCTION_FIELDS}
_CHOICE = {"type": "string", "enum": ["auto", "none", "required"]}
_JSON_SCHEMA_FIELDS: dict[str, Any] = {
    "name": _STR, "schema": {"type": "object"}, "strict": {"type": "boolean"}}
_JSON_SCHEMA = {"type": "object", "required": ["name", "schema"],
                "properties": _JSON_SCHEMA_FIELDS}
_FORMAT_TYPE = {"type": "string", "enum": ["text", "json_object", "json_schema"]}
_ERROR = {"description": "an error, in the API's own shape",
          "content": {"application/json": {"schema": {"type": "object"}}}}
_OK = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, body: dict[str, Any] | None = None, ok: str = "200",
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {
        ok: _OK, "400": _ERROR, "401": _ERROR, "404": _ERROR, "413": _ERROR, "429": _ERROR,
        "503": _ERROR}}
    if body is not None:
        op["requestBody"] = _body(body)
    if params:
        op["parameters"] = params
    return op


_RESPONSE_ID = [{"name": "response_id", "in": "path", "required": True, "schema": _STR}]
_AGENT_ID = [{"name": "agent_id", "in": "path", "required": True, "schema": _STR}]


def document(model: str) -> dict[str, Any]:
    chat_messages: dict[str, Any] = {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string",
                     "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": _CONTENT, "tool_call_id": _STR,
            "tool_calls": {"type": "array", "items": {
                "type": "object", "required": ["id", "type", "function"], "properties": {
                    "id": _STR, "type": {"type": "string", "enum": ["function"]},
                    "function": {"type": "object", "required": ["name", "arguments"],
                                 "properties": {"name": _STR, "arguments": _STR}}}}}}}}
    chat: dict[str, Any] = {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string", "enum": [model]},
        "messages": chat_messages,
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer"}, "stop": _STOP, "n": {"type": "integer", "enum": [1]},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object",
                           "properties": {"include_usage": {"type": "boolean"}}},
        "tools": {"type": "array", "items": {
            "type": "object", "required": ["type", "function"], "properties": {
                "type": {"type": "string", "enum": ["function"]}, "function": _FUNCTION}}},
        "tool_choice": {"oneOf": [_CHOICE, {
            "type": "object", "required": ["type", "function"], "properties": {
                "type": {"type": "string", "enum": ["function"]},
                "function": {"type": "object", "required": ["name"],
                             "properties": {"name": _STR}}}}]},
        "response_format": {"type": "object", "required": ["type"], "properties": {
            "type": _FORMAT_TYPE, "json_schema": _JSON_SCHEMA}},
        "user": _STR}}
    responses = {"type": "object", "required": ["model", "input"], "properties": {
        "model": {"type": "string", "enum": [model]},
        "input": {"oneOf": [_STR, chat_messages]},
        "instructions": _STR, "previous_response_id": _STR,
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "store": {"type": "boolean"}, "stream": {"type": "boolean"},
        "tools": {"type": "array", "items": {
            "type": "object", "required": ["type", "name"], "properties": {
                **_FUNCTION_FIELDS, "type": {"type": "string", "enum": ["function"]}}}},
        "tool_choice": {"oneOf": [_CHOICE, {
            "type": "object", "required": ["type", "name"], "properties": {
                "type": {"type": "string", "enum": ["function"]}, "name": _STR}}]},
        "text": {"type": "object", "properties": {"format": {
            "type": "object", "required": ["type"], "properties": {
                "type": _FORMAT_TYPE, **_JSON_SCHEMA_FIELDS}}}}}}
    anthropic_messages = {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string", "enum": ["user", "assistant"]}, "content": _CONTENT}}}
    messages = {"type": "object", "required": ["model", "max_tokens", "messages"],
                "properties": {
                    "model": {"type": "string", "enum": [model]},
                    "max_tokens": {"type": "integer", "minimum": 1},
                    "messages": anthropic_messages, "system": _CONTENT,
                    "temperature": {"type": "number", "minimum": 0, "maximum": 1},
                    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                    "stop_sequences": {"type": "array", "items": _STR, "maxItems": 16},
                    "stream": {"type": "boolean"},
                    "tools": {"type": "array", "items": {
                        "type": "object", "required": ["name", "input_schema"],
                        "properties": {"name": _STR, "description": _STR,
                                       "input_schema": {"type": "object"}}}},
                    "tool_choice": {"type": "object", "required": ["type"], "properties": {
                        "type": {"type": "string", "enum": ["auto", "any", "tool", "none"]},
                        "name": _STR}}}}
    count = {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string", "enum": [model]}, "messages": anthropic_messages,
        "system": _CONTENT}}
    turn = {"type": "object", "properties": {
        "message": _STR, "tool_results": {"type": "array", "items": _STR, "minItems": 1},
        "schema": {"type": "object"}, "choices": {"type": "array", "items": _STR},
        "regex": _STR, "tools": {"type": "array", "items": _FUNCTION},
        "tool_choice": _STR, "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer", "minimum": 0}, "stop": _STOP,
        "stream": {"type": "boolean"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "troupe", "version": __version__, "description":
                 "OpenAI- and Anthropic-compatible endpoints, and troupe's agents API. "
                 "Authenticate with 'Authorization: Bearer KEY' or 'x-api-key: KEY'."},
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/health": {"get": {**_op("liveness and readiness"), "security": []}},
            "/metrics": {"get": _op("Prometheus metrics")},
            "/v1/models": {"get": _op("the model served")},
            "/v1/chat/completions": {"post": _op("OpenAI chat completion", chat)},
            "/v1/responses": {"post": _op("OpenAI response; previous_response_id continues "
                                          "a chain (an agent)", responses)},
            "/v1/responses/{response_id}": {
                "get": _op("a stored response", params=_RESPONSE_ID),
                "delete": _op("delete a response's chain", params=_RESPONSE_ID)},
            "/v1/messages": {"post": _op("Anthropic message", messages)},
            "/v1/messages/count_tokens": {"post": _op("Anthropic token count", count)},
            "/v1/agents": {
                "get": _op("list agents (paged)", params=[
                    {"name": "limit", "in": "query", "schema": {
                        "type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "after", "in": "query", "schema": _STR}]),
                "post": _op("create an agent", {"type": "object", "properties": {
                    "id": _STR, "system": _STR}}, ok="201")},
            "/v1/agents/{agent_id}": {
                "get": _op("an agent: transcript and statistics", params=_AGENT_ID),
                "delete": _op("delete an agent", params=_AGENT_ID)},
            "/v1/agents/{agent_id}/turns": {"post": _op("take a turn", turn, params=_AGENT_ID)},
            "/v1/agents/{agent_id}/tell": {"post": _op("add a user message", {
                "type": "object", "required": ["message"], "properties": {"message": _STR}},
                ok="202", params=_AGENT_ID)},
            "/v1/agents/{agent_id}/fork": {"post": _op("fork an agent", {
                "type": "object", "required": ["id"], "properties": {"id": _STR}},
                ok="201", params=_AGENT_ID)},
            "/v1/statistics": {"get": _op("the runtime's statistics")},
        },
    }


async def openapi(request: Request) -> Response:
    return JSONResponse(document(state_of(request).model_id))


def routes() -> list[Route]:
    return [Route("/openapi.json", openapi, methods=["GET"])]
