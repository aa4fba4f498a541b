"""The HTTP edge as a raw socket sees it: body deadlines, how long connections live, and the
JSON error shape of every error, whichever layer raises it.

Each test drives a real daemon (in this process, on loopback) through a bare trio socket, so
it sees exactly which bytes come back and whether the server closed the connection. Timing
tests run on the autojump MockClock and assert exact virtual times.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import h11
import pytest
import trio
from quart import Response
from trio.testing import MockClock
from werkzeug.exceptions import (
    BadRequest,
    HTTPException,
    NotFound,
    RequestEntityTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)

from daemon.api.app import create_quart_app
from daemon.api.serve import RunningDaemon
from tests.conftest import ADMIN_KEY, StartDaemon
from tests.consumer_harness import (
    BOUND_S,
    Api,
    OpenApi,
    assert_openai_error,
    chat_body,
    error_of,
)

# Virtual-time bound on the MockClock tests: a deadline that never fires fails the test at
# once instead of hanging it.
VIRTUAL_BOUND_S = 600


class Client:
    """One HTTP/1.1 connection over a bare socket, its requests written by hand (with h11),
    so a request can stop half way and the test sees whether the server closed it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._h11 = h11.Connection(our_role=h11.CLIENT)

    async def send_head(self, method: str, path: str, **headers: str) -> None:
        if self._h11.our_state is h11.DONE:
            self._h11.start_next_cycle()  # raises unless both sides left the connection open
        fields = [("host", "dinfer.test"), *((k.replace("_", "-"), v) for k, v in headers.items())]
        await self._send(h11.Request(method=method, target=path, headers=fields))

    async def send_data(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def send_raw(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def request(self, method: str, path: str, body: bytes = b"", **headers: str) -> None:
        await self.send_head(method, path, content_length=str(len(body)), **headers)
        await self.send_data(body)
        await self._send(h11.EndOfMessage())

    async def read_response(self) -> tuple[int, dict[str, str], bytes]:
        """The next whole response: status, headers, body."""
        status, headers, parts = 0, {}, []
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, b"".join(parts)
            else:
                raise AssertionError(f"the response was cut short: {event!r}")

    async def closed_by_server(self) -> bool:
        """Waits for the server's next move: True when it closes the connection."""
        return await self._stream.receive_some(65536) == b""

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def _next_event(self) -> Any:
        while (event := self._h11.next_event()) is h11.NEED_DATA:
            self._h11.receive_data(await self._stream.receive_some(65536))
        return event

    async def _send(self, event: Any) -> None:
        data = self._h11.send(event)
        assert data is not None
        await self._stream.send_all(data)


@asynccontextmanager
async def connect(daemon: RunningDaemon) -> AsyncIterator[Client]:
    host, port = daemon.base_url.removeprefix("http://").rsplit(":", 1)
    client = Client(await trio.open_tcp_stream(host, int(port)))
    try:
        yield client
    finally:
        await client.aclose()


def open_descriptors() -> int:
    """This process's open file descriptors: the daemon's and the test's clients'."""
    return len(os.listdir("/proc/self/fd"))


# The request body has a deadline -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/admin/keys"])
@pytest.mark.parametrize("sent", [b"", b'{"model": "m", "mess'], ids=["no body", "half a body"])
async def test_a_body_that_stops_arriving_is_refused_408_at_the_deadline_then_closed(
    autojump_clock: MockClock, start_daemon: StartDaemon, path: str, sent: bytes
) -> None:
    daemon = await start_daemon(body_read_timeout_s="3")
    async with connect(daemon) as client:
        await client.send_head(
            "POST",
            path,
            authorization=f"Bearer {ADMIN_KEY}",
            content_type="application/json",
            content_length="100",
        )
        await client.send_data(sent)
        sent_at = trio.current_time()

        with trio.fail_after(VIRTUAL_BOUND_S):
            status, headers, body = await client.read_response()
        answered_at = trio.current_time()

        assert answered_at == sent_at + 3
        assert status == 408
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert error_of(body)["code"] == "request_timeout"
        with trio.fail_after(VIRTUAL_BOUND_S):
            assert await client.closed_by_server()
        assert trio.current_time() == answered_at


@pytest.mark.parametrize("sent", [b"", b'{"model": "m", "mess'], ids=["no body", "half a body"])
async def test_a_consumer_body_that_stops_arriving_is_refused_408_then_closed(
    start_daemon: StartDaemon, sent: bytes
) -> None:
    # On the real clock: a keyed consumer request opens its usage row, written by the
    # ledger's worker thread, which a virtual clock would jump past. The key is checked
    # first (a wrong one is 401 before any body is read), so this one is valid.
    daemon = await start_daemon(body_read_timeout_s="0.5")
    key = (await daemon.supervisor.store.create_api_key("slow")).secret
    async with connect(daemon) as client:
        await client.send_head(
            "POST",
            "/v1/chat/completions",
            authorization=f"Bearer {key}",
            content_type="application/json",
            content_length="100",
        )
        await client.send_data(sent)
        sent_at = trio.current_time()
        with trio.fail_after(10):
            status, headers, body = await client.read_response()
        assert trio.current_time() - sent_at >= 0.5
        assert status == 408
        assert headers["connection"] == "close"
        assert error_of(body)["code"] == "request_timeout"
        with trio.fail_after(10):
            assert await client.closed_by_server()


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        # Answers that need no database: a worker thread would let the autojump clock run.
        ("/v1/chat/completions", {}, 401, "invalid_api_key"),
        ("/v1/admin/keys", {"authorization": f"Bearer {ADMIN_KEY}"}, 400, "invalid_name"),
    ],
)
async def test_a_slow_body_that_arrives_in_time_is_read_whole_and_answered(
    autojump_clock: MockClock,
    start_daemon: StartDaemon,
    path: str,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    daemon = await start_daemon(body_read_timeout_s="3")
    body = b'{"name": "", "model": "m", "messages": []}'
    async with connect(daemon) as client:
        await client.send_head(
            "POST", path, content_type="application/json", content_length=str(len(body)), **headers
        )
        await client.send_data(body[:10])
        await trio.sleep(2.9)
        await client.send_data(body[10:])
        with trio.fail_after(VIRTUAL_BOUND_S):
            answer = await client.read_response()

    assert answer[0] == status
    assert error_of(answer[2])["code"] == code


# Connections end: after `connection: close`, and after the keep-alive timeout ---------------


@pytest.mark.parametrize("route", ["health", "chat completion"])
async def test_the_server_closes_the_connection_after_answering_a_connection_close_request(
    open_api: OpenApi, route: str
) -> None:
    api = await open_api()
    await api.connect(api.fake())
    async with connect(api.daemon) as client:
        with trio.fail_after(BOUND_S):
            if route == "health":
                await client.request("GET", "/health", connection="close")
            else:
                body = json.dumps(chat_body()).encode()
                await client.request(
                    "POST", "/v1/chat/completions", body, connection="close", **api.auth
                )
            status, _, _ = await client.read_response()
            assert status == 200
            assert await client.closed_by_server()


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    autojump_clock: MockClock, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(keepalive_timeout_s="7")
    async with connect(daemon) as client:
        for _ in range(2):  # the connection is reused, then left idle
            await client.request("GET", "/health")
            with trio.fail_after(VIRTUAL_BOUND_S):
                status, _, _ = await client.read_response()
            assert status == 200
        answered_at = trio.current_time()
        with trio.fail_after(VIRTUAL_BOUND_S):
            assert await client.closed_by_server()
        assert trio.current_time() == answered_at + 7


async def test_a_request_head_that_never_ends_is_closed_after_the_keepalive_timeout(
    autojump_clock: MockClock, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(keepalive_timeout_s="7")
    async with connect(daemon) as client:
        connected_at = trio.current_time()
        await client.send_raw(b"GET /health HTTP/1.1\r\nHost: dinfer.test\r\nX-Slow: ")
        with trio.fail_after(VIRTUAL_BOUND_S):
            assert await client.closed_by_server()
        assert trio.current_time() == connected_at + 7


async def test_two_hundred_idle_clients_are_closed_and_their_descriptors_freed(
    autojump_clock: MockClock, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(keepalive_timeout_s="7")
    before = open_descriptors()
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(daemon)) for _ in range(200)]
        for client in clients:
            await client.request("GET", "/health")
            assert (await client.read_response())[0] == 200
        assert open_descriptors() >= before + 2 * 200  # each socket, at both ends
        answered_at = trio.current_time()
        with trio.fail_after(VIRTUAL_BOUND_S):
            for client in clients:
                assert await client.closed_by_server()
        assert trio.current_time() == answered_at + 7
    assert open_descriptors() == before


# Every error is JSON in the OpenAI shape --------------------------------------------------


async def test_an_admin_body_over_the_size_limit_answers_413_in_the_json_error_shape(
    daemon: RunningDaemon,
) -> None:
    async with connect(daemon) as client:
        with trio.fail_after(BOUND_S):
            await client.send_head(
                "POST",
                "/v1/admin/keys",
                authorization=f"Bearer {ADMIN_KEY}",
                content_type="application/json",
                content_length=str(2 * 1024 * 1024),
            )
            status, headers, body = await client.read_response()
            assert await client.closed_by_server()  # the unread body cannot be skipped

    assert status == 413
    assert headers["content-type"] == "application/json"
    assert error_of(body)["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [
        (BadRequest(), 400, "invalid_request"),
        (BadRequest("the body is not valid JSON"), 400, "invalid_request"),
        (NotFound(), 404, "not_found"),
        (RequestTimeout(), 408, "request_timeout"),
        (RequestEntityTooLarge(), 413, "request_too_large"),
        (UnsupportedMediaType(), 415, "unsupported_media_type"),
        (RuntimeError("a bug"), 500, "internal_error"),
    ],
    ids=["400", "400 with its reason", "404", "408", "413", "415", "500"],
)
async def test_every_error_a_quart_route_raises_is_json_with_its_status(
    daemon: RunningDaemon, raised: Exception, status: int, code: str
) -> None:
    app = create_quart_app(daemon.supervisor)

    @app.post("/raise")
    async def raise_it() -> Response:
        raise raised

    response = await app.test_client().post("/raise")

    assert response.status_code == status
    assert response.content_type == "application/json"
    error = error_of(await response.get_data())
    assert error["code"] == code
    if isinstance(raised, HTTPException) and raised.description != type(raised).description:
        assert error["message"] == raised.description


async def test_a_wrong_method_names_the_allowed_ones(daemon: RunningDaemon) -> None:
    async with connect(daemon) as client:
        with trio.fail_after(BOUND_S):
            await client.request("POST", "/health")
            status, headers, body = await client.read_response()

    assert status == 405
    assert set(headers["allow"].replace(" ", "").split(",")) >= {"GET"}
    assert error_of(body)["code"] == "method_not_allowed"


async def test_a_consumer_route_that_crashes_answers_500_in_the_json_error_shape(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(_secret: str) -> str | None:
        raise RuntimeError("the store is broken")

    monkeypatch.setattr(api.daemon.supervisor.store, "find_api_key", broken)

    response = await api.chat()

    assert_openai_error(response, 500, "internal_error")
