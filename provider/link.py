"""The WebSocket connection to the daemon, with its TCP (or TLS) stream owned here.

trio-websocket's `open_websocket_url` leaves the client's socket open when the daemon is the
side that closes (as it does for a rejected token or a stale session), leaking one socket per
reconnect. So the node opens the stream itself, lets trio-websocket speak the protocol over it
(`wrap_client_stream`), and closes the stream whatever happened. Connection failures of any
kind are translated here, once, into `LinkError`.
"""

from __future__ import annotations

import os
import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)
from wsproto.connection import ConnectionState
from wsproto.events import TextMessage

from protocol.messages import MAX_FRAME_BYTES

CONNECT_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 5.0

T = TypeVar("T")
Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class LinkError(Exception):
    """The daemon could not be reached or refused the WebSocket upgrade; says which."""


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    resource: str
    tls: bool

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return host if self.port in (80, 443) else f"{host}:{self.port}"


async def connected(url: str, use: Callable[[WebSocketConnection], Awaitable[T]]) -> T:
    """Open a WebSocket to `url`, run `use` on it, then close it and its stream."""
    target = _target(url)
    stream = await _open_stream(target)
    async with stream:
        return await _speak(stream, target, use)


async def _speak(
    stream: Stream, target: _Target, use: Callable[[WebSocketConnection], Awaitable[T]]
) -> T:
    failure: LinkError | None = None
    try:
        # The nursery owns trio-websocket's reader task for this connection.
        async with trio.open_nursery() as nursery:
            ws = await _handshake(nursery, stream, target)
            try:
                return await use(ws)
            finally:
                await _close(ws)
                nursery.cancel_scope.cancel(reason="session over")
    except* LinkError as group:
        failure = group.exceptions[0]  # type: ignore[assignment]
    except* HandshakeError as group:  # the reader task raises the upgrade's rejection
        failure = LinkError(_refusal_detail(group.exceptions[0]))
    raise failure or LinkError("WebSocket connection failed")


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise LinkError(f"{url!r} is not a ws:// or wss:// URL")
    tls = parts.scheme == "wss"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(parts.hostname, parts.port or (443 if tls else 80), resource, tls)


async def _open_stream(target: _Target) -> Stream:
    where = f"{target.host}:{target.port}"
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            if not target.tls:
                return await trio.open_tcp_stream(target.host, target.port)
            stream = await trio.open_ssl_over_tcp_stream(
                target.host, target.port, ssl_context=ssl.create_default_context()
            )
            await _tls_handshake(stream, where)
            return stream
    except trio.TooSlowError:
        raise LinkError(f"no connection to {where} within {CONNECT_TIMEOUT:g} s") from None
    except OSError as exc:
        raise LinkError(f"cannot connect to {where}: {exc}") from None


async def _tls_handshake(stream: trio.SSLStream[trio.SocketStream], where: str) -> None:
    # Done here, not lazily inside trio-websocket, so a certificate error is reported as such.
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await stream.aclose()
        raise LinkError(f"TLS with {where} failed: {exc.__cause__ or exc}") from None


async def _handshake(nursery: trio.Nursery, stream: Stream, target: _Target) -> WebSocketConnection:
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            return await wrap_client_stream(
                nursery,
                stream,
                target.host_header,
                target.resource,
                max_message_size=MAX_FRAME_BYTES,
            )
    except trio.TooSlowError:
        raise LinkError(
            f"no WebSocket handshake from {target.host_header}{target.resource} "
            f"within {CONNECT_TIMEOUT:g} s"
        ) from None


async def _close(ws: WebSocketConnection) -> None:
    # Not shielded: when the node itself is cancelled, trio-websocket's reader is cancelled too
    # and could never read the daemon's close reply, so the stream is just closed (trio closes
    # a socket even under cancellation); the daemon sees the drop as a disconnect.
    with trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose()


async def send_frames(ws: WebSocketConnection, frames: Sequence[str]) -> None:
    """Send `frames` as text messages, in order, with one write to the socket.

    trio-websocket writes each message with its own `send_all`; a node relaying a fast stream
    queues several at once, and one system call for all of them is most of what relaying a
    chunk costs. This does what its `send_message` does (refuse once closed, frame with
    wsproto, write under the connection's write lock, abort on a broken stream), for a batch,
    through its internals; a trio-websocket without them gets one `send_message` per frame.
    Raises ConnectionClosed like `send_message`.
    """
    if len(frames) == 1 or not _speaks_batches(ws):
        for frame in frames:
            await ws.send_message(frame)
        return
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    if _plain_and_open(ws):
        data = masked_text_frames(frames)
    else:  # an extension to apply, or a state wsproto must refuse in
        data = b"".join(ws._wsproto.send(TextMessage(data=frame)) for frame in frames)
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws._close_reason) from None


_INTERNALS: Final = ("_close_reason", "_wsproto", "_stream_lock", "_stream", "_abort_web_socket")


def _speaks_batches(ws: WebSocketConnection) -> bool:
    return all(hasattr(ws, name) for name in _INTERNALS)


def _plain_and_open(ws: WebSocketConnection) -> bool:
    connection = getattr(ws._wsproto, "_connection", None)
    proto = getattr(connection, "_proto", None)
    return (
        connection is not None
        and connection.state is ConnectionState.OPEN
        and proto is not None
        and not proto.extensions
    )


def masked_text_frames(frames: Sequence[str]) -> bytes:
    """Client text frames (RFC 6455 §5.2-5.3), FIN set, no extension, each masked.

    What wsproto writes, at a fraction of its cost (it masks in Python a byte table at a time
    and asks the OS for randomness per frame): the masks come from one `os.urandom` call per
    batch, a fresh unpredictable key for every frame all the same.
    """
    keys = os.urandom(4 * len(frames))
    out = []
    for index, frame in enumerate(frames):
        payload = frame.encode("utf-8")
        size = len(payload)
        if size <= 125:
            out.append(bytes((0x81, 0x80 | size)))
        elif size <= 0xFFFF:
            out.append(struct.pack("!BBH", 0x81, 0xFE, size))
        else:
            out.append(struct.pack("!BBQ", 0x81, 0xFF, size))
        key = keys[4 * index : 4 * index + 4]
        mask = (key * (size // 4 + 1))[:size]
        masked = int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")
        out.append(key)
        out.append(masked.to_bytes(size, "big"))
    return b"".join(out)


def _refusal_detail(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRejected):
        return f"the daemon refused the WebSocket upgrade (HTTP {exc.status_code}); check the URL"
    return f"WebSocket handshake failed: {exc!r}"
