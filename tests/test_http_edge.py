"""The HTTP edge as a raw socket sees it: body deadlines and how long connections live.

Each test drives a real daemon (in this process, on loopback) through a bare trio socket, so
it sees exactly which bytes come back and whether the server closed the connection. Timing
tests run on the autojump MockClock and assert exact virtual times.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
from trio.testing import MockClock

from daemon.api.serve import RunningDaemon
from tests.conftest import ADMIN_KEY, StartDaemon

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
        fields = [("host", "dinfer.test"), *((k.replace("_", "-"), v) for k, v in headers.items())]
        await self._send(h11.Request(method=method, target=path, headers=fields))

    async def send_data(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def request(self, method: str, path: str, body: bytes = b"", **headers: str) -> None:
        await self.send_head(method, path, content_length=str(len(body)), **headers)
        await self.send_data(body)
        await self._send(h11.EndOfMessage())

    async def read_response(self) -> tuple[int, dict[str, str], bytes]:
        """The next whole response: status, headers, body."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
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


def error_of(body: bytes) -> dict[str, Any]:
    parsed = json.loads(body)
    assert set(parsed) == {"error"} and set(parsed["error"]) == {"type", "message", "code", "param"}
    return dict(parsed["error"])


# The request body has a deadline -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/admin/keys"])
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
