"""The few ASGI moves the consumer handlers need: read a bounded body, answer, stream, and
notice the client hanging up."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from daemon.api.errors import ApiError, error_body, openai_error, retry_headers

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = (b"content-type", b"application/json")


class ClientGone(Exception):
    """The consumer disconnected."""


class BodyTooLarge(Exception):
    pass


def header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def read_body(scope: dict[str, Any], receive: Receive, limit: int) -> bytes:
    """The whole request body; BodyTooLarge past `limit` (after draining the rest)."""
    declared = header(scope, b"content-length")
    too_large = declared is not None and declared.isdigit() and int(declared) > limit
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        too_large = too_large or size > limit
        if not too_large:
            parts.append(chunk)
        if not message.get("more_body", False):
            break
    if too_large:
        raise BodyTooLarge
    return b"".join(parts)


async def drain(receive: Receive) -> None:
    """Read and discard what is left of the body, so the connection can be reused."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def send_json(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [JSON, *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    retry_after: int | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    extra = [(k.lower().encode(), v.encode()) for k, v in retry_headers(retry_after).items()]
    await send_json(send, status, error_body(status, message, code, param), [*extra, *headers])


async def send_api_error(
    send: Send,
    error: ApiError,
    headers: Iterable[tuple[bytes, bytes]] = (),
    render: Callable[[ApiError], bytes] = openai_error,
) -> None:
    """The one place an `ApiError` becomes a response: `render` gives the route's body."""
    extra = [(k.lower().encode(), v.encode()) for k, v in retry_headers(error.retry_after).items()]
    await send_json(send, error.status, render(error), [*extra, *headers, *error.headers])
