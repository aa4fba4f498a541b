"""The HTTP client of the local OpenAI-compatible model server.

Owns every use of httpx and of the lean client (`provider.http1`): the clients' timeouts,
`GET /v1/models`, the streaming `POST` of a request, and the small JSON calls of the servers'
own APIs (llama-server's `/props`, the tokenizers). The streaming POST to a plain `http://`
server goes over the lean client's kept-alive connections, which cost a tenth of httpx's CPU
per request; httpx streams for every other server (`https`, credentials in the URL) and makes
the small calls. Both clients' exceptions are translated here, at the edge, into
`RequestFailure`, so the rest of the node never sees a library type. Cancelling the calling
task closes the HTTP stream: that is how `cancel` reaches the backend.

A request the server drops without a byte of answer (closing or resetting the connection it
had promised to keep alive) is sent once more (`_send`, `_lean_send`): llama-cpp-python does
that to the request after any stream its generator broke off, and that request must not fail
with it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import trio

from provider import http1
from provider.failures import RequestFailure, from_backend_error, from_link, from_transport
from provider.http1 import Http1Origin, Timeouts

CONNECT_TIMEOUT: Final = 10.0
WRITE_TIMEOUT: Final = 60.0
POOL_TIMEOUT: Final = 10.0
# An error body is read only to quote its message; a runaway one is cut off here.
ERROR_BODY_LIMIT: Final = 64 * 1024
# Raised by `send` before any answer: the connection broke under the request.
_UNANSWERED: Final = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_ACCEPT_SSE: Final = "text/event-stream"


class NodeClient(httpx.AsyncClient):
    """httpx's client, plus the lean client's kept-alive connections (`provider.http1`) for
    the streaming POSTs to plain `http://` servers; closing it closes those too."""

    def __init__(self, timeout: httpx.Timeout) -> None:
        super().__init__(timeout=timeout, trust_env=False)
        self._origins: dict[str, Http1Origin | None] = {}

    def origin(self, base_url: str) -> Http1Origin | None:
        """The lean client's pool for `base_url`; None where httpx must stream (`https`, ...)."""
        if base_url not in self._origins:
            timeouts = Timeouts(
                connect=_seconds(self.timeout.connect, CONNECT_TIMEOUT),
                read=_seconds(self.timeout.read, 1e9),
                write=_seconds(self.timeout.write, WRITE_TIMEOUT),
            )
            self._origins[base_url] = Http1Origin.for_url(base_url, timeouts)
        return self._origins[base_url]

    async def aclose(self) -> None:
        await self._close_origins()
        await super().aclose()

    async def __aexit__(self, *exc_info: Any) -> None:
        # httpx's own __aexit__ closes its transports without calling aclose().
        try:
            await self._close_origins()
        finally:
            await super().__aexit__(*exc_info)

    async def _close_origins(self) -> None:
        origins, self._origins = self._origins, {}
        for origin in origins.values():
            if origin is not None:
                await origin.aclose()


def _seconds(value: float | None, default: float) -> float:
    return default if value is None else value


def open_client(read_timeout: float) -> NodeClient:
    """The node's one client. `trust_env=False`: a system proxy must not capture loopback."""
    timeout = httpx.Timeout(
        connect=CONNECT_TIMEOUT, read=read_timeout, write=WRITE_TIMEOUT, pool=POOL_TIMEOUT
    )
    return NodeClient(timeout)


@dataclass(frozen=True)
class ModelListing:
    """What `GET /v1/models` said: its `data` entries and the `Server` header."""

    entries: tuple[dict[str, Any], ...]
    server: str | None = None
    ids: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        ids = (entry.get("id") for entry in self.entries)
        object.__setattr__(self, "ids", tuple(i for i in ids if isinstance(i, str) and i))


class Backend:
    """The model server at `base_url` (its root, without `/v1`)."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self._client = client
        self.base_url = base_url.rstrip("/")
        self._origin = client.origin(self.base_url) if isinstance(client, NodeClient) else None

    async def list_models(self) -> ModelListing:
        response = await self._send(self._client.build_request("GET", self._url("/v1/models")))
        if response.status_code != 200:
            raise from_backend_error(response.status_code, _document(response.content))
        return ModelListing(_entries(response.content), response.headers.get("server"))

    async def get_json(self, path: str) -> Any:
        """`GET path` and its JSON answer; RequestFailure unless it is a 200 with JSON."""
        response = await self._send(self._client.build_request("GET", self._url(path)))
        return _json_answer(response)

    async def post_json(self, path: str, document: Any) -> Any:
        """`POST path` with a JSON body and its JSON answer; RequestFailure as for get_json."""
        request = self._client.build_request("POST", self._url(path), json=document)
        return _json_answer(await self._send(request))

    @asynccontextmanager
    async def stream(self, endpoint: str, body: bytes) -> AsyncIterator[AsyncIterator[str]]:
        """POST `body` to `endpoint` and yield the answer's lines as they arrive.

        Leaving the block (normally, by an error or by cancellation) closes the stream.
        """
        if self._origin is not None:
            async with _lean_stream(self._origin, endpoint, body) as lean:
                yield lean
            return
        request = self._client.build_request(
            "POST",
            self._url(endpoint),
            content=body,
            headers={"content-type": "application/json", "accept": "text/event-stream"},
        )
        response = await self._send(request, stream=True)
        try:
            if not response.is_success:
                raise from_backend_error(response.status_code, await _error_document(response))
            lines = _Lines(response)
            try:
                yield lines
            finally:
                await _abandon(lines.raw)
        finally:
            await response.aclose()

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        with _translated():
            try:
                return await self._client.send(request, stream=stream)
            except _UNANSWERED:
                # Broken before the status line: no answer came, so none is lost by asking
                # again. The dead connection has left the pool; this goes out on another.
                return await self._client.send(request, stream=stream)


@asynccontextmanager
async def _lean_stream(
    origin: Http1Origin, endpoint: str, body: bytes
) -> AsyncIterator[_LeanLines]:
    response = await _lean_send(origin, endpoint, body)
    try:
        if not 200 <= response.status < 300:
            raise from_backend_error(response.status, await _lean_error_document(response))
        lines = _LeanLines(response.lines())
        try:
            yield lines
        finally:
            await lines.raw.aclose()
    finally:
        await response.aclose()


async def _lean_send(origin: Http1Origin, endpoint: str, body: bytes) -> http1.Response:
    try:
        try:
            return await origin.send(endpoint, body, _ACCEPT_SSE)
        except http1.Unanswered:
            # As in `Backend._send`: no answer came, so none is lost by asking again, on a
            # new connection (the broken one is closed).
            return await origin.send(endpoint, body, _ACCEPT_SSE)
    except http1.TransportError as exc:
        raise from_link(exc) from exc


async def _lean_error_document(response: http1.Response) -> Any:
    body = bytearray()
    pieces = response.pieces()
    try:
        async for piece in pieces:
            body += piece
            if len(body) >= ERROR_BODY_LIMIT:
                break
    except http1.TransportError as exc:
        raise from_link(exc) from exc
    finally:
        await pieces.aclose()
    return _document(bytes(body))


class _LeanLines:
    """The lean client's lines, with its errors translated as each line is read."""

    __slots__ = ("raw",)

    def __init__(self, lines: http1.Lines) -> None:
        self.raw = lines

    def __aiter__(self) -> _LeanLines:
        return self

    async def __anext__(self) -> str:
        try:
            return await self.raw.__anext__()
        except http1.TransportError as exc:
            raise from_link(exc) from exc


class _Lines:
    """The response's lines, with httpx errors translated as each line is read."""

    def __init__(self, response: httpx.Response) -> None:
        self.raw = response.aiter_lines()

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        with _translated():
            return await anext(self.raw)


async def _abandon(chunks: AsyncIterator[object]) -> None:
    """Finish one of httpx's chains of async generators that its reader left early.

    Closing the outer generator would leave the inner ones suspended for the garbage
    collector; a cancelled read instead raises through every one of them, so each one ends.
    """
    with trio.CancelScope() as scope:
        scope.cancel(reason="backend stream abandoned")
        async for _ in chunks:
            pass  # what httpx already decoded comes out without a checkpoint: few, finite


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except httpx.RequestError as exc:
        raise from_transport(exc) from exc
    except httpx.StreamError as exc:  # a response read twice or after close: our own bug
        raise RequestFailure(500, f"backend stream misused: {exc}", "provider_error") from exc


async def _error_document(response: httpx.Response) -> Any:
    body = bytearray()
    pieces = response.aiter_bytes()
    with _translated():
        async for piece in pieces:
            body += piece
            if len(body) >= ERROR_BODY_LIMIT:
                await _abandon(pieces)
                break
    return _document(bytes(body))


def _document(body: bytes) -> Any:
    """A body as JSON when it is JSON, else as text: error bodies come in both."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")


def _json_answer(response: httpx.Response) -> Any:
    if response.status_code != 200:
        raise from_backend_error(response.status_code, _document(response.content))
    try:
        return json.loads(response.content)
    except ValueError:
        raise RequestFailure(502, "backend answer is not JSON", "backend_error") from None


def _entries(body: bytes) -> tuple[dict[str, Any], ...]:
    try:
        document = json.loads(body)
    except ValueError:
        raise RequestFailure(502, "backend /v1/models is not JSON", "backend_error") from None
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        raise RequestFailure(502, "backend /v1/models has no data list", "backend_error")
    return tuple(entry for entry in data if isinstance(entry, dict))
