"""The lean HTTP/1.1 client (`provider.http1`) against raw scripted answers over loopback.

Each test's server answers every request on a connection with the next scripted bytes, written
in the pieces the test gives (so framing split at awkward places is exercised), and records
how many connections it accepted: that is how reuse of a kept-alive connection is seen.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import trio

from provider.http1 import Broken, Http1Origin, Timeouts, Unanswered

TIMEOUTS = Timeouts(connect=5, read=5, write=5)
SSE = b"data: one\n\ndata: two\r\n\r\ndata: three\r\rdata: four\n\n"
LINES = ["data: one", "", "data: two", "", "data: three", "", "data: four", ""]


@dataclass
class Server:
    answers: list[Sequence[bytes]]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            buffer = b""
            while self.answers:
                while b"\r\n\r\n" not in buffer:
                    piece = await stream.receive_some(65536)
                    if not piece:
                        return
                    buffer += piece
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                self.requests.append(buffer[:length])
                buffer = buffer[length:]
                for piece in self.answers.pop(0):
                    await stream.send_all(piece)  # one segment each: trio sets TCP_NODELAY


async def origin_for(nursery: trio.Nursery, server: Server) -> Http1Origin:
    serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
    listeners = await nursery.start(serve, server.handle, 0)
    port = listeners[0].socket.getsockname()[1]
    origin = Http1Origin.for_url(f"http://127.0.0.1:{port}", TIMEOUTS)
    assert origin is not None
    return origin


async def lines_of(origin: Http1Origin, body: bytes = b"{}") -> tuple[int, list[str]]:
    response = await origin.send("/v1/chat/completions", body, "text/event-stream")
    try:
        lines = response.lines()
        try:
            return response.status, [line async for line in lines]
        finally:
            await lines.aclose()
    finally:
        await response.aclose()


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    framed = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces)
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


def split(data: bytes, every: int) -> list[bytes]:
    return [data[i : i + every] for i in range(0, len(data), every)]


@pytest.mark.parametrize("every", [1, 3, 7, 1000])
async def test_a_chunked_answer_in_any_pieces_gives_its_lines_and_keeps_the_connection(
    nursery, every
) -> None:
    answer = chunked(SSE, 5)
    server = Server([split(answer, every), split(answer, every)])
    origin = await origin_for(nursery, server)
    assert await lines_of(origin, b'{"a": 1}') == (200, LINES)
    assert await lines_of(origin) == (200, LINES)
    assert server.connections == 1
    assert server.requests == [b'{"a": 1}', b"{}"]
    await origin.aclose()


async def test_a_sized_answer_after_an_interim_100_is_read_to_its_length(nursery) -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad\r\ncontent-length: 9\r\n\r\nfirst\nend"
    server = Server([split(answer, 4), [chunked(b"data: x\n", 3)]])
    origin = await origin_for(nursery, server)
    assert await lines_of(origin) == (400, ["first", "end"])
    assert await lines_of(origin) == (200, ["data: x"])
    assert server.connections == 1
    await origin.aclose()


async def test_an_answer_ended_by_closing_is_read_to_the_close_and_not_reused(nursery) -> None:
    answer = b"HTTP/1.0 200 OK\r\n\r\ndata: a\r\ndata: b"
    server = Server([[answer]])
    origin = await origin_for(nursery, server)
    assert await lines_of(origin) == (200, ["data: a", "data: b"])
    server.answers.append([chunked(b"data: c\n", 8)])
    assert await lines_of(origin) == (200, ["data: c"])
    assert server.connections == 2
    await origin.aclose()


async def test_connection_close_is_honoured(nursery) -> None:
    answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nabc"
    server = Server([[answer], [answer]])
    origin = await origin_for(nursery, server)
    assert await lines_of(origin) == (200, ["abc"])
    assert await lines_of(origin) == (200, ["abc"])
    assert server.connections == 2
    await origin.aclose()


async def test_a_server_that_closes_without_a_byte_leaves_the_request_unanswered(
    nursery,
) -> None:
    server = Server([[b""]])
    origin = await origin_for(nursery, server)
    with pytest.raises(Unanswered):
        await lines_of(origin)
    await origin.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", id="size"),
        pytest.param(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabX", id="crlf"),
        pytest.param(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab", id="cut"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab", id="short"),
        pytest.param(b"SMTP ready\r\n\r\n", id="not-http"),
    ],
)
async def test_a_broken_answer_is_broken(nursery, answer) -> None:
    server = Server([[answer]])
    origin = await origin_for(nursery, server)
    with pytest.raises(Broken):
        await lines_of(origin)
    await origin.aclose()


@pytest.mark.parametrize(
    "url",
    ["https://127.0.0.1:8080", "http://user:pw@127.0.0.1:8080", "http://127.0.0.1:8080/?x=1"],
)
def test_servers_it_cannot_speak_to_are_left_to_httpx(url) -> None:
    assert Http1Origin.for_url(url, TIMEOUTS) is None


def test_a_path_prefix_is_kept() -> None:
    origin = Http1Origin.for_url("http://localhost:8080/proxy/", TIMEOUTS)
    assert origin is not None
    assert origin._request("/v1/completions", b"{}", "text/event-stream").startswith(
        b"POST /proxy/v1/completions HTTP/1.1\r\nhost: localhost:8080\r\n"
    )
