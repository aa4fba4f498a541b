"""The HTTP application: quart-trio for health, admin and the provider WebSocket route, and
hand-written ASGI handlers for the consumer API.

The consumer routes bypass quart on purpose: deferred commit means the status line may go out
only once the first content chunk exists, and the handler must own every byte it sends in one
task, with the dispatch nursery inside it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import trio
from quart import Response, websocket
from quart_trio import QuartTrio

from daemon.admin import admin, json_error
from daemon.api.chat import ChatCompletions
from daemon.nursery.supervisor import Supervisor
from daemon.session import TransportClosed

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class QuartTransport:
    """quart-trio's WebSocket as a session Transport; its errors become TransportClosed."""

    _ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, RuntimeError)

    def __init__(self, ws: Any) -> None:
        self._ws = ws

    async def receive(self) -> str | bytes:
        try:
            data: str | bytes = await self._ws.receive()
        except self._ERRORS as exc:
            raise TransportClosed(str(exc)) from exc
        return data

    async def send(self, text: str) -> None:
        try:
            await self._ws.send(text)
        except self._ERRORS as exc:
            raise TransportClosed(str(exc)) from exc

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._ws.close(code, reason)
        except self._ERRORS as exc:
            raise TransportClosed(str(exc)) from exc


def create_quart_app(sup: Supervisor) -> QuartTrio:
    app = QuartTrio("dinfer")
    app.config.update(
        DINFER_SUPERVISOR=sup,
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=60,
        MAX_CONTENT_LENGTH=1024 * 1024,
    )
    app.register_blueprint(admin)

    @app.get("/health")
    async def health() -> Response:
        return Response('{"status":"ok"}', 200, content_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        if sup.ready:
            return Response('{"status":"ready"}', 200, content_type="application/json")
        return json_error(503, "the daemon is starting", "not_ready")

    @app.websocket("/ws/provider")
    async def provider_socket() -> None:
        ws = websocket._get_current_object()  # type: ignore[attr-defined]
        await sup.host_session(QuartTransport(ws))

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return json_error(404, "no such route", "not_found")

    @app.errorhandler(405)
    async def wrong_method(_: Exception) -> Response:
        return json_error(405, "method not allowed on this route", "method_not_allowed")

    return app


class Router:
    """Consumer API paths to their ASGI handlers; everything else to quart."""

    def __init__(self, fallback: ASGIApp, routes: Mapping[str, ASGIApp]) -> None:
        self._fallback = fallback
        self._routes = dict(routes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        handler = self._routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        await (handler or self._fallback)(scope, receive, send)


def create_app(sup: Supervisor) -> Router:
    routes: dict[str, ASGIApp] = {"/v1/chat/completions": ChatCompletions(sup)}
    return Router(cast(ASGIApp, create_quart_app(sup)), routes)
