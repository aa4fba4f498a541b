"""The `/metrics` listener: a tiny HTTP/1.0-style server on its own address, never the API's.

Prometheus scrapes with one `GET /metrics` per connection or keeps it alive; this answers one
request per connection and closes it (`Connection: close`), which every scraper accepts. It is
bounded against slow and bad clients: a request head larger than `MAX_HEAD_BYTES`, or not
complete within `HEAD_TIMEOUT_S`, ends the connection; at most `MAX_CONNECTIONS` are served at
once, and one past that is closed at once. The body is never read (a scrape has none).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Final

import trio

from daemon.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("dinfer.metrics")

MAX_HEAD_BYTES: Final = 8 * 1024
HEAD_TIMEOUT_S: Final = 5.0
SEND_TIMEOUT_S: Final = 10.0
MAX_CONNECTIONS: Final = 16


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `/metrics` on host:port until cancelled; report the bound URL once listening."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    slots = trio.CapacityLimiter(MAX_CONNECTIONS)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(trio.serve_listeners, partial(_connection, metrics, slots), listeners)
        )
        task_status.started(_url(listeners[0]))


def _url(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _connection(
    metrics: Metrics, slots: trio.CapacityLimiter, stream: trio.SocketStream
) -> None:
    async with stream:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            return  # too many scrapers at once: this one retries later
        try:
            await _answer(metrics, stream)
        except trio.BrokenResourceError:
            pass  # the scraper hung up
        except Exception:
            # A scrape must never take the daemon down: the listener's nursery is its own.
            log.exception("answering a metrics scrape failed")
        finally:
            slots.release()


async def _answer(metrics: Metrics, stream: trio.SocketStream) -> None:
    with trio.move_on_after(HEAD_TIMEOUT_S):
        head = await _read_head(stream)
    if head is None:
        return  # too slow, too large, or closed before a whole head
    status, body = _route(metrics, head)
    lines = [
        f"HTTP/1.1 {status}",
        f"Content-Type: {CONTENT_TYPE if status.startswith('200') else 'text/plain'}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    with trio.move_on_after(SEND_TIMEOUT_S):
        await stream.send_all("\r\n".join(lines).encode() + (b"" if head[:5] == b"HEAD " else body))


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer:
        if len(buffer) > MAX_HEAD_BYTES:
            return None
        data = await stream.receive_some(MAX_HEAD_BYTES)
        if not data:
            return None
        buffer += data
    return bytes(buffer)


def _route(metrics: Metrics, head: bytes) -> tuple[str, bytes]:
    method, _, rest = head.partition(b" ")
    target = rest.partition(b" ")[0]
    path = target.partition(b"?")[0]
    if path != b"/metrics":
        return "404 Not Found", b"not found: the metrics are at /metrics\n"
    if method not in (b"GET", b"HEAD"):
        return "405 Method Not Allowed", b"use GET\n"
    return "200 OK", metrics.render()
