"""Fewer socket writes per HTTP/1.1 answer: a small adaptation of Hypercorn's h11 protocol.

Stock Hypercorn writes each piece of an answer on its own: the response head, each body
message, and the end of the body (`0\\r\\n\\r\\n` of a chunked answer) are one `send_all` each,
so a one-object answer costs three socket sends and a short stream one more than its body
messages. Here, on the HTTP/1.1 path only:

- the head of a final response (status >= 200) is held and written with the next bytes of the
  same response (its first body, or its end);
- the last body message (`more_body: False`) is written together with the body's end.

So a one-object answer is one write and a stream is one write per body message. Nothing else
changes: 1xx answers (100-continue, 101 for WebSocket) and WebSocket frames are written at once
as before; Hypercorn's own error answers (head, then end) become one write; whatever is held is
written before the stream closes, so keep-alive recycling and a close after an unfinished
answer see the same bytes in the same order. HTTP/2 streams are untouched (`FinalBody` is a
`Body`, which any other protocol handles as one).

`install()` swaps the two classes in where Hypercorn looks them up (the names
`hypercorn.protocol.H11Protocol` and `hypercorn.protocol.h11.HTTPStream`, read each time a
connection or a request starts); it checks they are the ones it adapts, so a Hypercorn whose
internals moved keeps its stock behaviour instead of breaking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h11
import hypercorn.protocol as hypercorn_protocol
import hypercorn.protocol.h11 as hypercorn_h11
from hypercorn.events import RawData
from hypercorn.protocol.events import Body, Event, StreamClosed
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.typing import H11SendableEvent
from hypercorn.utils import suppress_body

__all__ = ["install"]


@dataclass(frozen=True)
class FinalBody(Body):
    """The last body of an answer: the protocol writes it with the end that follows."""


class CoalescingHTTPStream(HTTPStream):
    """Hypercorn's HTTP stream, marking an answer's last body as `FinalBody`."""

    async def app_send(self, message: Any) -> None:
        if (
            message is not None
            and message["type"] == "http.response.body"
            and self.state == ASGIHTTPState.RESPONSE
            and not message.get("more_body", False)
            and not self.response.get("trailers", False)
            and message.get("body", b"") != b""
            and not suppress_body(self.scope["method"], int(self.response["status"]))
        ):
            # Upstream's branch for this message, with the body marked final: Body, then the
            # end (`_send_closed`: EndBody, the access log, StreamClosed).
            await self.send(FinalBody(stream_id=self.stream_id, data=bytes(message["body"])))
            await self._send_closed()
        else:
            await super().app_send(message)


class CoalescingH11Protocol(hypercorn_h11.H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, holding a response head and a final body until the bytes
    that follow them, then writing all in one send."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: list[bytes] = []
        self._hold_data = False

    async def stream_send(self, event: Event) -> None:
        if isinstance(event, FinalBody):
            self._hold_data = True
            try:
                await super().stream_send(event)
            finally:
                self._hold_data = False
        elif isinstance(event, StreamClosed):
            await self._flush()  # before the connection is recycled or closed
            await super().stream_send(event)
        else:
            await super().stream_send(event)

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Response) or (self._hold_data and isinstance(event, h11.Data)):
            self._held.append(data)
            return
        if self._held:
            self._held.append(data)
            data = b"".join(self._held)
            self._held.clear()
        if data:
            await self.send(RawData(data=data))

    async def _flush(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            await self.send(RawData(data=data))


def install() -> None:
    """Use the coalescing classes for every HTTP/1.1 connection from now on (idempotent)."""
    if hypercorn_protocol.H11Protocol is CoalescingH11Protocol:
        return
    if (
        hypercorn_protocol.H11Protocol is not hypercorn_h11.H11Protocol
        or hypercorn_h11.HTTPStream is not HTTPStream
        or not hasattr(HTTPStream, "_send_closed")
        or not hasattr(hypercorn_h11.H11Protocol, "_send_h11_event")
    ):
        return  # not the Hypercorn this adapts: keep its stock writes
    hypercorn_h11.HTTPStream = CoalescingHTTPStream  # type: ignore[misc]
    hypercorn_protocol.H11Protocol = CoalescingH11Protocol  # type: ignore[misc]
