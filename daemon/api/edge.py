"""The HTTP edge: what every HTTP exchange gets before any route sees it.

`HttpEdge` wraps the whole ASGI app (WebSocket and lifespan scopes pass straight through).

The body has a deadline: it must have arrived `DINFER_BODY_READ_TIMEOUT_S` after the request
head. A client that trickles or withholds it looks to the route like one that disconnected
(every route, ours and quart's, already stops cleanly on `http.disconnect`); the edge then
answers 408 in the JSON error shape with `connection: close`, and Hypercorn closes the
connection, whose half-read request could not be followed by another anyway. The deadline
covers reading only: a route that answers without reading the body is not affected, and once
the body is in, the route's own deadlines take over.

The end of every response is written shielded from cancellation. That write is where
Hypercorn, in the route's task, closes the connection (`connection: close`, or a request it
could not finish reading) or re-arms the keep-alive timer, and on the way it hands the route
`http.disconnect`. Quart-trio and the chat handler both cancel themselves on that disconnect,
so unshielded they cancelled the write half way: the connection then stayed open forever,
with or without `connection: close`, since the keep-alive timer never restarted. The socket
writes inside are shielded by Hypercorn already, so the shield adds no new way to hang.

A route that raises before answering gets a JSON 500 in its place (Hypercorn's is empty).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import trio

from daemon.api.asgi import Receive, Send, drain, send_error

log = logging.getLogger("dinfer.api")

ASGIApp = Any
CLOSE: Final = (b"connection", b"close")
INTERNAL_ERROR: Final = "the daemon failed to answer; the cause is in its log"


class HttpEdge:
    """ASGI middleware: body deadline, shielded end of response, JSON 500 (module docstring)."""

    def __init__(self, app: ASGIApp, *, body_timeout: float) -> None:
        self._app = app
        self._body_timeout = body_timeout

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        exchange = Exchange(receive, send, trio.current_time() + self._body_timeout)
        try:
            await self._app(scope, exchange.receive, exchange.send)
        except Exception:
            # Not the request's content: the route's bug. Hypercorn would answer an empty 500.
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not exchange.answered:
                await send_error(send, 500, INTERNAL_ERROR, "internal_error")
            return
        if exchange.body_late and not exchange.answered:
            await self._refuse_late_body(receive, send)

    async def _refuse_late_body(self, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            # Hypercorn keeps queueing what the client sends until the connection closes; a
            # full queue would block the very write that closes it, so keep taking from it.
            nursery.start_soon(drain, receive)
            await send_error(
                send,
                408,
                f"the request body did not arrive within {self._body_timeout:g} s",
                "request_timeout",
                headers=[CLOSE],
            )
            nursery.cancel_scope.cancel(reason="the 408 is written")


class Exchange:
    """One request's `receive` and `send` as the route sees them."""

    __slots__ = ("_deadline", "_receive", "_send", "answered", "body_in", "body_late")

    def __init__(self, receive: Receive, send: Send, deadline: float) -> None:
        self._receive = receive
        self._send = send
        self._deadline = deadline
        self.body_in = False
        self.body_late = False
        self.answered = False

    async def receive(self) -> dict[str, Any]:
        if self.body_in:
            return await self._receive()
        if self.body_late:
            return {"type": "http.disconnect"}
        with trio.move_on_at(self._deadline) as scope:
            message = await self._receive()
        if scope.cancelled_caught:
            self.body_late = True
            return {"type": "http.disconnect"}
        self.body_in = message["type"] == "http.disconnect" or not message.get("more_body", False)
        return message

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.answered = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await self._send(message)
            return
        await self._send(message)
