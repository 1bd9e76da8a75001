"""Errors as each API shapes them: one exception, rendered by the route's dialect."""

from __future__ import annotations

import math
from typing import Any, Literal

from starlette.responses import JSONResponse

Dialect = Literal["openai", "anthropic"]

# Anthropic names its error types by meaning; OpenAI's clients read the status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_overloaded",
}


class ApiError(Exception):
    """A request the server refuses: ``status`` and a message the client can act on."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after


def unsupported(what: str, param: str) -> ApiError:
    """A feature of the API this server does not serve yet: a 400, never a silent drop."""
    return ApiError(400, f"{what} is not supported by this server yet", code="unsupported",
                    param=param)


def error_body(error: ApiError, dialect: Dialect) -> dict[str, Any]:
    if dialect == "anthropic":
        return {"type": "error", "error": {
            "type": _ANTHROPIC_TYPES.get(error.status, "api_error"), "message": error.message}}
    return {"error": {"message": error.message,
                      "type": _OPENAI_TYPES.get(error.status, "server_error"),
                      "param": error.param, "code": error.code}}


def dialect_of(path: str) -> Dialect:
    return "anthropic" if path.startswith("/v1/messages") else "openai"


def error_response(error: ApiError, path: str) -> JSONResponse:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if error.status == 413:
        # The rest of the body is left unread, so the connection cannot carry another
        # request: say so, or a client reusing it races the server's close.
        headers["Connection"] = "close"
    return JSONResponse(error_body(error, dialect_of(path)), status_code=error.status,
                        headers=headers)
