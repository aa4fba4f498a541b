"""How a failed request is reported: the `inference_error` status table of PROTOCOL.md §6.

Every way a request can fail on this node ends as one `RequestFailure`, raised where the fault
is seen and turned into the `inference_error` frame in one place. The status codes tell the
daemon what to do next: 503 try elsewhere (busy, draining, model missing), 500 this provider is
at fault, 502 the backend is unreachable or broke off, 504 it timed out, and 400/413/415/422 the
request itself is bad and must not be retried. A prompt longer than the model's context is a
400 `context_length_exceeded` whichever status the backend said it with (`provider.overflow`).
"""

from __future__ import annotations

from typing import Any, Final

import httpx

from protocol.messages import InferenceError
from provider import http1
from provider.overflow import overflow_message

# Codes that say the request itself is wrong: passed through with the backend's own message.
REQUEST_FAULTS: Final = frozenset({400, 413, 415, 422})
# Codes that say "not now": the daemon should try another provider.
CAPACITY: Final = frozenset({429, 503})
CONTEXT_LENGTH_EXCEEDED: Final = "context_length_exceeded"
_MESSAGE_LIMIT: Final = 500


class RequestFailure(Exception):
    """A request that ends in `inference_error`; `reason` is a short stable tag for logs."""

    def __init__(self, status_code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.reason = reason

    def frame(self, request_id: str) -> InferenceError:
        return InferenceError(
            request_id=request_id,
            error=self.message,
            status_code=self.status_code,
            error_reason=self.reason,
        )


def context_exceeded(message: str) -> RequestFailure:
    """The prompt does not fit the model's context: the request's fault, never retried."""
    return RequestFailure(400, _clip(message) or "prompt too long", CONTEXT_LENGTH_EXCEEDED)


def from_backend_error(status: int, document: Any) -> RequestFailure:
    """A backend's HTTP error answer (its parsed body, or its text) as this node's failure."""
    said = overflow_message(status, document)
    if said is not None:
        return context_exceeded(said)
    return from_backend_status(status, error_message(document) or "no details")


def from_backend_status(status: int, message: str) -> RequestFailure:
    """A backend HTTP error status (before or inside the stream) as this node's failure."""
    if status in REQUEST_FAULTS:
        return RequestFailure(status, message, "bad_request")
    if status in CAPACITY:
        return RequestFailure(503, f"backend busy ({status}): {message}", "backend_busy")
    if status == 404:
        # Mostly "model not found": a lifecycle problem (the model was unloaded), not a fault.
        return RequestFailure(503, f"backend has no such model or route: {message}", "not_found")
    if status >= 500:
        return RequestFailure(500, f"backend error ({status}): {message}", "backend_error")
    return RequestFailure(
        500, f"backend refused the request ({status}): {message}", "backend_error"
    )


def from_transport(exc: httpx.RequestError) -> RequestFailure:
    """An httpx transport error (nothing usable came back) as this node's failure."""
    match exc:
        case httpx.ConnectError() | httpx.ConnectTimeout():
            return RequestFailure(
                502, f"backend unreachable: {_detail(exc)}", "backend_unreachable"
            )
        case httpx.PoolTimeout():
            return RequestFailure(503, "no free connection to the backend", "backend_busy")
        case httpx.TimeoutException():
            return RequestFailure(504, "backend timed out", "backend_timeout")
        case httpx.ReadError() | httpx.WriteError() | httpx.RemoteProtocolError():
            return RequestFailure(
                502, f"backend connection broke: {_detail(exc)}", "backend_disconnected"
            )
        case httpx.DecodingError():
            return RequestFailure(502, "backend sent an undecodable body", "backend_disconnected")
    return RequestFailure(500, f"cannot talk to the backend: {_detail(exc)}", "backend_error")


def from_link(exc: http1.TransportError) -> RequestFailure:
    """A lean-client transport error (`provider.http1`) as this node's failure; the same
    answers as `from_transport` gives for httpx's errors of the same kind."""
    match exc:
        case http1.ConnectFailed():
            return RequestFailure(
                502, f"backend unreachable: {_detail(exc)}", "backend_unreachable"
            )
        case http1.TimedOut():
            return RequestFailure(504, "backend timed out", "backend_timeout")
        case http1.Broken():
            return RequestFailure(
                502, f"backend connection broke: {_detail(exc)}", "backend_disconnected"
            )
    return RequestFailure(500, f"cannot talk to the backend: {_detail(exc)}", "backend_error")


def from_error_event(event: dict[str, Any]) -> RequestFailure:
    """A mid-stream `data: {"error": ...}` event (llama-server, vLLM) as this node's failure.

    The event's own `code` picks the status when it has one; otherwise the backend failed on
    its side, which is a 500 like any backend 5xx.
    """
    said = overflow_message(None, event)
    if said is not None:
        return context_exceeded(said)
    error = event.get("error")
    status = _event_status(error)
    message = error_message(error) or "backend reported an error mid-stream"
    if status is None:
        return RequestFailure(500, f"backend error: {message}", "backend_error_event")
    failure = from_backend_status(status, message)
    failure.reason = "backend_error_event" if failure.reason == "backend_error" else failure.reason
    return failure


def error_message(document: Any) -> str | None:
    """The human message of a backend error body, in any of the shapes servers use."""
    if isinstance(document, str):
        return _clip(document) or None
    if not isinstance(document, dict):
        return None
    for key in ("error", "message", "detail"):
        found = error_message(document.get(key))
        if found:
            return found
    return None


def _event_status(error: Any) -> int | None:
    if not isinstance(error, dict):
        return None
    for key in ("code", "status"):
        value = error.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
            return value
    return None


def _detail(exc: Exception) -> str:
    return _clip(str(exc)) or type(exc).__name__


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"
