"""Errors at the edge: `ApiError`, raised once by a route's checks, and the shapes it takes.

A route's checks raise `ApiError(status, code, message)`; one place (`asgi.send_api_error`)
turns it into a response, with the body the route's codec renders (`openai_error` is
OpenAI's shape, `{"error": {"type", "message", "code", "param"}}`; `anthropic_error` is
Anthropic's, `{"type": "error", "error": {"type", "message"}}`) and `Retry-After`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

TYPE_BY_STATUS: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """A request the daemon answers with an error status, before anything else was sent."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.headers = headers  # sent with the error (the key's x-ratelimit-* headers)


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> bytes:
    """`{"error": {"type", "message", "code", "param"}}` for an HTTP error."""
    kind = TYPE_BY_STATUS.get(status, "server_error" if status < 503 else "service_unavailable")
    return msgspec.json.encode(ErrorBody(ErrorDetail(message, kind, code, param)))


def openai_error(error: ApiError) -> bytes:
    """OpenAI's body for `error`."""
    return error_body(error.status, error.message, error.code, error.param)


def retry_headers(retry_after: int | None) -> dict[str, str]:
    return {} if retry_after is None else {"Retry-After": str(retry_after)}


# Anthropic's error types by status; other 4xx are invalid_request_error, other 5xx (502,
# 504) api_error.
ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def anthropic_error(error: ApiError) -> bytes:
    """Anthropic's body for `error`: `{"type": "error", "error": {"type", "message"}}`."""
    default = "api_error" if error.status >= 500 else "invalid_request_error"
    detail = {"type": ANTHROPIC_ERROR_TYPES.get(error.status, default), "message": error.message}
    return msgspec.json.encode({"type": "error", "error": detail})
