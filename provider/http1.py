"""A lean HTTP/1.1 client for the one request the node sends per inference: the streaming POST.

httpx spends about 2 ms of CPU on each streamed request to a local model server (its pool,
h11's per-chunk events and a chain of async generators per line), more than everything else
the node does for a short answer. This client does only what that request needs, over
kept-alive loopback or LAN connections to a plain `http://` server: one `send_all` of the
request head and body, the response head, and the body by its framing (chunked, a
`content-length`, or until the server closes), split into lines here.

What it does not do is refused at `Http1Origin.for_url` (TLS, credentials in the URL, a
query), and the node keeps httpx for those servers and for its small JSON calls.

Failures are raised as `TransportError` subclasses named after what broke, so the caller can
translate them once; a request that got no byte of answer on a connection that broke under it
is `Unanswered`, which the caller may send again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import trio

# Bounds on what a server may send before its body: a runaway head is a broken server.
MAX_HEAD_BYTES: Final = 64 * 1024
RECEIVE_BYTES: Final = 64 * 1024
# Idle kept-alive connections held per origin; more idle than this are closed.
MAX_IDLE: Final = 32


class TransportError(Exception):
    """Base of every error this module raises."""


class ConnectFailed(TransportError):
    """No TCP connection to the server (refused, unroutable, or not within the connect time)."""


class TimedOut(TransportError):
    """The server sent nothing for the read timeout, or did not take the request in time."""


class Broken(TransportError):
    """The connection broke or the server broke HTTP/1.1 after the answer began."""


class Unanswered(Broken):
    """The connection broke before any byte of answer: nothing was lost by asking again."""


@dataclass(frozen=True)
class Timeouts:
    connect: float
    read: float
    write: float


@dataclass(frozen=True)
class Head:
    status: int
    headers: dict[str, str]  # lowercased names; a repeated header keeps its last value


class _Connection:
    """One TCP connection and the bytes read from it that nobody has consumed yet."""

    __slots__ = ("buffer", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()


class Http1Origin:
    """One `http://host:port` server, its idle connections, and the streams sent to it."""

    def __init__(self, host: str, port: int, prefix: str, timeouts: Timeouts) -> None:
        self._host = host
        self._port = port
        self._prefix = prefix
        self._timeouts = timeouts
        self._host_header = (f"[{host}]" if ":" in host else host) + (
            "" if port == 80 else f":{port}"
        )
        self._idle: list[_Connection] = []

    @property
    def read_timeout(self) -> float:
        return self._timeouts.read

    @classmethod
    def for_url(cls, base_url: str, timeouts: Timeouts) -> Http1Origin | None:
        """The origin of a plain `http://` base URL; None for anything this client leaves
        to httpx (TLS, userinfo, a query or fragment)."""
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname or parts.username is not None:
            return None
        if parts.query or parts.fragment:
            return None
        try:
            port = parts.port or 80
        except ValueError:
            return None
        return cls(parts.hostname, port, parts.path.rstrip("/"), timeouts)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.stream.aclose()

    async def send(self, path: str, body: bytes, accept: str) -> Response:
        """POST `body` (JSON) to `path`; the response once its head has arrived.

        The caller must `aclose()` the response. Its connection goes back to the idle pool
        only if the body was read to its end; left early, by an error or a cancel, the
        connection is closed (that is how a cancel reaches the server).
        """
        request = self._request(path, body, accept)
        connection, head = await self._exchange(request)
        try:
            return Response(self, connection, head)
        except Broken:  # a body framing it cannot read
            await connection.stream.aclose()
            raise

    def _request(self, path: str, body: bytes, accept: str) -> bytes:
        head = (
            f"POST {self._prefix}{path} HTTP/1.1\r\nhost: {self._host_header}\r\n"
            f"content-type: application/json\r\naccept: {accept}\r\n"
            f"content-length: {len(body)}\r\nuser-agent: dinfer-provider\r\n\r\n"
        )
        return head.encode("latin-1") + body

    async def _exchange(self, request: bytes) -> tuple[_Connection, Head]:
        connection = self._idle.pop() if self._idle else await self._connect()
        try:
            return connection, await self._ask(connection, request)
        except BaseException:
            await connection.stream.aclose()
            raise

    async def _ask(self, connection: _Connection, request: bytes) -> Head:
        try:
            with trio.fail_after(self._timeouts.write):
                await connection.stream.send_all(request)
        except trio.TooSlowError:
            raise TimedOut("the server did not take the request in time") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Unanswered(f"connection broke while sending: {exc.__cause__ or exc}") from None
        return await _read_head(connection, self._timeouts.read)

    async def _connect(self) -> _Connection:
        where = f"{self._host}:{self._port}"
        try:
            with trio.fail_after(self._timeouts.connect):
                stream = await trio.open_tcp_stream(self._host, self._port)
        except trio.TooSlowError:
            raise ConnectFailed(f"no connection to {where} within the connect timeout") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {where}: {exc}") from None
        return _Connection(stream)

    async def _release(self, connection: _Connection, reusable: bool) -> None:
        if reusable and len(self._idle) < MAX_IDLE:
            self._idle.append(connection)
        else:
            await connection.stream.aclose()


async def _receive(connection: _Connection, read_timeout: float) -> bytes:
    try:
        with trio.fail_after(read_timeout):
            return await connection.stream.receive_some(RECEIVE_BYTES)
    except trio.TooSlowError:
        raise TimedOut("the server sent nothing within the read timeout") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise Broken(f"connection broke: {exc.__cause__ or exc}") from None


async def _read_head(connection: _Connection, read_timeout: float) -> Head:
    """The first non-1xx response head; `Unanswered` if the connection ends before a byte."""
    buffer = connection.buffer
    answered = False
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = _parse_head(bytes(buffer[:end]))
            del buffer[: end + 4]
            if 100 <= head.status < 200:
                continue  # 100 Continue and other interim answers: the real one follows
            return head
        if len(buffer) > MAX_HEAD_BYTES:
            raise Broken("the response head is too large")
        try:
            piece = await _receive(connection, read_timeout)
        except Broken as exc:
            if answered:
                raise
            raise Unanswered(str(exc)) from None
        if not piece:
            if answered:
                raise Broken("the server closed the connection inside the response head")
            raise Unanswered("the server closed the connection without answering")
        answered = True
        buffer += piece


def _parse_head(raw: bytes) -> Head:
    lines = raw.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        raise Broken(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    try:
        status = int(status_line[1])
    except ValueError:
        raise Broken(f"not an HTTP status: {status_line[1][:20]!r}") from None
    headers: dict[str, str] = {"": status_line[0]}  # the version, for keep-alive
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise Broken(f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return Head(status, headers)


class Response:
    """A response's status, headers and body; `lines()` or `pieces()` reads the body, once."""

    def __init__(self, origin: Http1Origin, connection: _Connection, head: Head) -> None:
        self._origin = origin
        self._connection = connection
        self._read_timeout = origin.read_timeout
        self.status = head.status
        self.headers = head.headers
        self._framing = _framing(head.headers)
        self._keep_alive = _keeps_alive(head.headers)
        self._released = False
        self.reusable = False  # set once the whole body has arrived on a kept-alive link

    def pieces(self) -> AsyncGenerator[bytes]:
        """The body's bytes as they arrive (dechunked)."""
        match self._framing:
            case _Chunked():
                return self._chunked()
            case _Sized(length=length):
                return self._sized(length)
            case _UntilClose():
                return self._until_close()

    async def aclose(self) -> None:
        """Give the connection back (body read to its end) or close it."""
        if not self._released:
            self._released = True
            await self._origin._release(self._connection, self.reusable)

    def lines(self) -> Lines:
        return Lines(self)

    def _ended(self) -> None:
        # Known before the last piece is handed out: a reader that stops at `[DONE]` never
        # asks for the end it already received, and the connection is still good for the next.
        # Bytes past the end would be a server out of step with us: such a link is not reused.
        self.reusable = self._keep_alive and not self._connection.buffer

    async def _more(self) -> bytes:
        return await _receive(self._connection, self._read_timeout)

    async def _sized(self, length: int) -> AsyncGenerator[bytes]:
        buffer = self._connection.buffer
        while length > 0:
            if not buffer:
                piece = await self._more()
                if not piece:
                    raise Broken("the server closed the connection inside the body")
                buffer += piece
            taken = bytes(buffer[:length])
            del buffer[:length]
            length -= len(taken)
            if length == 0:
                self._ended()
            yield taken

    async def _until_close(self) -> AsyncGenerator[bytes]:
        buffer = self._connection.buffer
        if buffer:
            yield bytes(buffer)
            buffer.clear()
        while piece := await self._more():
            yield piece

    async def _chunked(self) -> AsyncGenerator[bytes]:
        buffer = self._connection.buffer
        dechunker = _Dechunker()
        while True:
            # Everything already received comes out as one piece: a fast server's whole
            # answer often arrives in one read.
            data = dechunker.take(buffer)
            if dechunker.done:
                self._ended()
            if data:
                yield data
            if dechunker.done:
                return
            piece = await self._more()
            if not piece:
                raise Broken("the server closed the connection inside a chunked body")
            buffer += piece


class _Dechunker:
    """Chunked transfer coding, decoded from a buffer as far as the buffer goes."""

    __slots__ = ("_crlf", "_remaining", "_trailers", "done")

    def __init__(self) -> None:
        self._remaining = 0  # bytes of the current chunk not yet taken
        self._crlf = False  # the CRLF after a chunk's data is due
        self._trailers = False  # past the last chunk: trailer lines up to an empty one
        self.done = False

    def take(self, buffer: bytearray) -> bytes:
        """The data decodable from `buffer`, which loses what was consumed."""
        out: list[bytes] = []
        pos = self._advance(buffer, out)
        del buffer[:pos]
        return out[0] if len(out) == 1 else b"".join(out)

    def _advance(self, buffer: bytearray, out: list[bytes]) -> int:
        pos = 0
        size = len(buffer)
        while not self.done:
            if self._remaining:
                taken = min(self._remaining, size - pos)
                if taken == 0:
                    return pos
                out.append(bytes(buffer[pos : pos + taken]))
                pos += taken
                self._remaining -= taken
                if self._remaining:
                    return pos
                self._crlf = True
            if self._crlf:
                if size - pos < 2:
                    return pos
                if buffer[pos : pos + 2] != b"\r\n":
                    raise Broken("a chunk is not followed by CRLF")
                pos += 2
                self._crlf = False
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                if size - pos > MAX_HEAD_BYTES:
                    raise Broken("a chunk size or trailer line is too long")
                return pos
            line, pos = bytes(buffer[pos:end]), end + 2
            if self._trailers:
                self.done = not line
            elif (length := _chunk_size(line)) == 0:
                self._trailers = True
            else:
                self._remaining = length
        return pos


def _chunk_size(line: bytes) -> int:
    text = line.split(b";", 1)[0].strip()
    try:
        size = int(text, 16)
    except ValueError:
        raise Broken(f"malformed chunk size {text[:20]!r}") from None
    if size < 0 or text.startswith((b"+", b"-")):
        raise Broken(f"malformed chunk size {text[:20]!r}")
    return size


class Lines:
    """The body's lines as text (UTF-8, undecodable bytes replaced), without their endings.

    Lines end at LF, CRLF or a lone CR, as in server-sent events; empty lines (event
    separators) are kept. A line that already arrived is handed out without a checkpoint.
    """

    def __init__(self, response: Response) -> None:
        self._pieces = response.pieces()
        self._ready: deque[str] = deque()
        self._partial = b""
        self._ended = False

    def __aiter__(self) -> Lines:
        return self

    async def __anext__(self) -> str:
        ready = self._ready
        while not ready:
            if self._ended:
                raise StopAsyncIteration
            await self._read()
        return ready.popleft()

    async def aclose(self) -> None:
        await self._pieces.aclose()

    async def _read(self) -> None:
        try:
            piece = await anext(self._pieces)
        except StopAsyncIteration:
            self._ended = True
            if self._partial:
                self._split(self._partial, final=True)
            return
        self._split(self._partial + piece if self._partial else piece, final=False)

    def _split(self, data: bytes, *, final: bool) -> None:
        held = b""
        if b"\r" in data:
            if not final and data.endswith(b"\r"):
                data, held = data[:-1], b"\r"  # may be the first half of a CRLF
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        pieces = data.split(b"\n")
        rest = pieces.pop()  # what follows the last line ending: a line still arriving
        if final:
            if rest:
                pieces.append(rest)
            self._partial = b""
        else:
            self._partial = rest + held
        self._ready.extend(piece.decode("utf-8", errors="replace") for piece in pieces)


@dataclass(frozen=True)
class _Chunked:
    pass


@dataclass(frozen=True)
class _Sized:
    length: int


@dataclass(frozen=True)
class _UntilClose:
    pass


def _framing(headers: dict[str, str]) -> _Chunked | _Sized | _UntilClose:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _Chunked()
    length = headers.get("content-length")
    if length is not None:
        try:
            size = int(length.split(",")[0])
        except ValueError:
            raise Broken(f"malformed content-length {length[:20]!r}") from None
        if size < 0:
            raise Broken(f"malformed content-length {length[:20]!r}")
        return _Sized(size)
    return _UntilClose()


def _keeps_alive(headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if headers[""] == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection
