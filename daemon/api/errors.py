"""The OpenAI error shape every HTTP error of the daemon answers with."""

from __future__ import annotations

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


def retry_headers(retry_after: int | None) -> dict[str, str]:
    return {} if retry_after is None else {"Retry-After": str(retry_after)}
