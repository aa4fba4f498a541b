"""The ASGI application: quart-trio for health and admin, hand-written ASGI handlers for the
hot paths (the consumer API and the provider WebSocket).

The consumer routes bypass quart on purpose: deferred commit means the status line may go out
only once the first content chunk exists, and the handler must own every byte it sends in one
task, with the dispatch nursery inside it. The provider route bypasses it for speed: every
relayed chunk crosses it. `HttpEdge` (daemon/api/edge.py) wraps them all, and `ForwardedFor`
(daemon/api/forwarded.py) wraps that: the client's address behind a trusted proxy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, cast

from quart import Response, request
from quart.json.provider import DefaultJSONProvider
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from daemon.api.admin import admin, json_error
from daemon.api.chat import ChatCodec
from daemon.api.completions import CompletionsCodec
from daemon.api.edge import INTERNAL_ERROR, HttpEdge
from daemon.api.errors import ApiError
from daemon.api.forwarded import ForwardedFor
from daemon.api.handler import InferenceRoute, authenticate
from daemon.api.messages import REQUEST_ID_HEADERS, CountTokensRoute, MessagesCodec
from daemon.api.models import ModelsRoute
from daemon.api.openapi import DOCUMENT_BYTES
from daemon.api.provider_socket import ProviderSocket
from daemon.api.responses import ResponsesCodec
from daemon.api.usage import UsageRoute
from daemon.nursery.supervisor import Supervisor

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class _JsonProvider(DefaultJSONProvider):
    """Quart's JSON, where a body nested too deeply to parse is invalid JSON (a 400, or None
    for `get_json(silent=True)`) rather than a RecursionError and a 500."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("the JSON is nested too deeply") from None


def create_quart_app(sup: Supervisor) -> QuartTrio:
    # No static folder: quart's default `/static/<path>` route would serve files with no key.
    app = QuartTrio("dinfer", static_folder=None)
    app.json = _JsonProvider(app)
    app.config.update(
        DINFER_SUPERVISOR=sup,
        RESPONSE_TIMEOUT=None,
        # HttpEdge bounds every body read and answers 408 itself (daemon/api/edge.py).
        BODY_TIMEOUT=None,
        MAX_CONTENT_LENGTH=1024 * 1024,
    )
    app.register_blueprint(admin)

    @app.get("/health")
    async def health() -> Response:
        return Response('{"status":"ok"}', 200, content_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        if sup.draining:  # at once on SIGTERM, so a load balancer stops sending here
            return json_error(503, "the daemon is shutting down", "shutting_down")
        if sup.ready:
            return Response('{"status":"ready"}', 200, content_type="application/json")
        return json_error(503, "the daemon is starting", "not_ready")

    @app.errorhandler(UnicodeDecodeError)
    async def not_utf8(_exc: UnicodeDecodeError) -> Response:
        # quart's get_json decodes the body before parsing it, outside its ValueError guard.
        return json_error(400, "the request body is not valid UTF-8", "invalid_request")

    @app.get("/openapi.json")
    async def openapi() -> Response:
        # For the daemon's consumers, with their key: every route but /health, /readyz and
        # /ws/provider takes its credential. It holds nothing of this daemon's (a test checks).
        try:
            await authenticate(sup, cast(dict[str, Any], request.scope))
        except ApiError as error:
            return json_error(error.status, error.message, error.code)
        return Response(DOCUMENT_BYTES, 200, content_type="application/json")

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return _json_http_error(exc, app.config["MAX_CONTENT_LENGTH"])

    return app


# Quart's own error pages are HTML; these are the JSON errors in their place. Quart hands an
# unhandled exception to the 500 entry (as InternalServerError) after logging it.
_QUART_ERRORS: Final = {
    400: ("invalid_request", "the request is malformed"),
    404: ("not_found", "no such route"),
    405: ("method_not_allowed", "method not allowed on this route"),
    408: ("request_timeout", "the request body did not arrive in time"),
    413: ("request_too_large", "the request body exceeds {limit} bytes"),
    500: ("internal_error", INTERNAL_ERROR),
}


def _json_http_error(exc: HTTPException, limit: int) -> Response:
    status = exc.code or 500
    name = (exc.name or "error").lower().replace(" ", "_")
    code, message = _QUART_ERRORS.get(status, (name, type(exc).description or name))
    message = message.format(limit=limit)
    if exc.description != type(exc).description and status != 500:
        message = str(exc.description)  # raised with a reason of its own: say it
    response = json_error(status, message, code)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
    return response


class Router:
    """Consumer API paths and the provider WebSocket to their ASGI handlers; the rest to quart.

    `routes` match a path exactly; `prefixes` match what starts with them, for a path that
    ends in an id which may itself hold `/` (model ids such as `Qwen/Qwen2.5-7B-Instruct`).
    """

    def __init__(
        self,
        fallback: ASGIApp,
        routes: Mapping[tuple[str, str], ASGIApp],
        prefixes: Mapping[tuple[str, str], ASGIApp] | None = None,
    ) -> None:
        self._fallback = fallback
        self._routes = dict(routes)
        self._prefixes = dict(prefixes or {})

    @property
    def routes(self) -> Mapping[tuple[str, str], ASGIApp]:
        return self._routes

    @property
    def prefixes(self) -> Mapping[tuple[str, str], ASGIApp]:
        return self._prefixes

    @property
    def fallback(self) -> ASGIApp:
        return self._fallback

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        key = (scope["type"], scope.get("path", ""))
        handler = self._routes.get(key) or self._by_prefix(*key)
        await handler(scope, receive, send)

    def _by_prefix(self, kind: str, path: str) -> ASGIApp:
        for (prefix_kind, prefix), handler in self._prefixes.items():
            if kind == prefix_kind and path.startswith(prefix):
                return handler
        return self._fallback


Routes = dict[tuple[str, str], ASGIApp]


def route_table(sup: Supervisor) -> tuple[Routes, Routes]:
    """The Router's exact routes and its prefixes (tests/test_openapi.py checks the OpenAPI
    document against them)."""
    models = ModelsRoute(sup)
    routes: Routes = {
        ("http", "/v1/chat/completions"): InferenceRoute(sup, ChatCodec, route="chat"),
        ("http", "/v1/responses"): InferenceRoute(sup, ResponsesCodec(), route="responses"),
        ("http", "/v1/completions"): InferenceRoute(sup, CompletionsCodec, route="completions"),
        ("http", "/v1/models"): models,
        ("http", "/v1/messages"): InferenceRoute(
            sup, MessagesCodec(), route="messages", id_headers=REQUEST_ID_HEADERS
        ),
        ("http", "/v1/messages/count_tokens"): CountTokensRoute(sup),
        ("http", "/v1/usage"): UsageRoute(sup),
        ("websocket", "/ws/provider"): ProviderSocket(sup),
    }
    prefixes: Routes = {("http", "/v1/models/"): models}
    return routes, prefixes


def create_router(sup: Supervisor) -> Router:
    """Every route the daemon serves (the security suite enumerates them from here)."""
    routes, prefixes = route_table(sup)
    return Router(cast(ASGIApp, create_quart_app(sup)), routes, prefixes)


def create_app(sup: Supervisor) -> ForwardedFor:
    edge = HttpEdge(create_router(sup), body_timeout=sup.settings.body_read_timeout_s)
    return ForwardedFor(edge, sup.settings.trusted_proxies)
