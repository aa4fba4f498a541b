"""The HTTP client of the local OpenAI-compatible model server.

Owns every use of httpx: the client's timeouts, `GET /v1/models`, the streaming `POST` of a
request, and the small JSON calls of the servers' own APIs (llama-server's `/props`, the
tokenizers). httpx's exceptions are translated here, at the edge, into `RequestFailure`, so the
rest of the node never sees a library type. httpx runs under Trio through anyio, and
cancelling the calling task closes the HTTP stream: that is how `cancel` reaches the backend.

A request the server drops without a byte of answer (closing or resetting the connection it
had promised to keep alive) is sent once more (`_send`): llama-cpp-python does that to the
request after any stream its generator broke off, and that request must not fail with it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import trio

from provider.failures import RequestFailure, from_backend_error, from_transport

CONNECT_TIMEOUT: Final = 10.0
WRITE_TIMEOUT: Final = 60.0
POOL_TIMEOUT: Final = 10.0
# An error body is read only to quote its message; a runaway one is cut off here.
ERROR_BODY_LIMIT: Final = 64 * 1024
# Raised by `send` before any answer: the connection broke under the request.
_UNANSWERED: Final = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def open_client(read_timeout: float) -> httpx.AsyncClient:
    """The node's one client. `trust_env=False`: a system proxy must not capture loopback."""
    timeout = httpx.Timeout(
        connect=CONNECT_TIMEOUT, read=read_timeout, write=WRITE_TIMEOUT, pool=POOL_TIMEOUT
    )
    return httpx.AsyncClient(timeout=timeout, trust_env=False)


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
