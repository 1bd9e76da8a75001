"""Reading requests: the body under its size limit, and fields checked one by one, each
refusal a 400 that names the field."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request

from ._errors import ApiError


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``limit`` bytes (counted as it comes, so a
    false Content-Length gains nothing), 400 if it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over the limit of {limit} bytes",
                       code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", code="invalid_value", param=param)


def get_str(body: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = body.get(key, default)
    if value is None or isinstance(value, str):
        return value
    raise bad(key, f"must be a string, got {type(value).__name__}")


def get_int(
    body: dict[str, Any], key: str, low: int, high: int, default: int | None = None
) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(key, f"must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise bad(key, f"must be from {low} to {high}, got {value}")
    return value


def get_float(
    body: dict[str, Any], key: str, low: float, high: float, default: float
) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(key, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not low <= value <= high:
        raise bad(key, f"must be from {low} to {high}, got {value}")
    return float(value)


def get_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(key, f"must be true or false, got {type(value).__name__}")
    return value


def get_list(body: dict[str, Any], key: str) -> list[Any] | None:
    value = body.get(key)
    if value is None or isinstance(value, list):
        return value
    raise bad(key, f"must be an array, got {type(value).__name__}")


def get_dict(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise bad(key, f"must be an object, got {type(value).__name__}")
