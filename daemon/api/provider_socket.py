"""The provider WebSocket route, `/ws/provider`, as a plain ASGI handler.

The handler accepts the connection and hands it to the supervisor, which runs the session in
its own nursery; the connection's task only waits. Serving it without quart keeps one task
switch, one memory channel and a signal dispatch off every frame.
"""

from __future__ import annotations

from typing import Any

import trio

from daemon.api.asgi import Receive, Send
from daemon.nursery.supervisor import Supervisor
from daemon.routing.transport import TransportClosed


class AsgiWebSocket:
    """ASGI websocket events as a session Transport; a gone peer is TransportClosed."""

    # What Hypercorn raises for a send on a connection that is already gone.
    _SEND_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, RuntimeError)

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed = False

    async def receive(self) -> str | bytes:
        while not self._closed:
            event = await self._receive()
            if event["type"] == "websocket.receive":
                text = event.get("text")
                return text if text is not None else bytes(event.get("bytes") or b"")
            if event["type"] == "websocket.disconnect":
                self._closed = True
        raise TransportClosed("the WebSocket is closed")

    async def send(self, text: str) -> None:
        await self._emit({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str) -> None:
        if not self._closed:
            await self._emit({"type": "websocket.close", "code": code, "reason": reason})
            self._closed = True

    async def _emit(self, event: dict[str, Any]) -> None:
        if self._closed:
            raise TransportClosed("the WebSocket is closed")
        try:
            await self._send(event)
        except self._SEND_ERRORS as exc:
            self._closed = True
            raise TransportClosed(str(exc)) from exc


class ProviderSocket:
    """The ASGI handler of `/ws/provider`."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        await self._sup.host_session(AsgiWebSocket(receive, send))
