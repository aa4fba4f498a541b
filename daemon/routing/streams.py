"""The in-flight requests of one provider session: request id -> a bounded channel of frames.

The reader routes each frame to its request's channel without waiting; a terminal closes it,
and frames for unknown or finished ids are dropped (PROTOCOL.md §6). A request whose consumer
cannot keep up is dropped rather than stall every other request on the provider, and
remembered as having fallen behind: the daemon's fault, not the provider's. When the session
ends every channel is closed, which dispatch reads as 502 `provider disconnected`.

A request relayed for another daemon of a cluster (daemon/cluster/relay.py) has a `RawSink`
instead of a channel: the reader hands it the frame's text exactly as the provider sent it,
synchronously, so relaying a frame costs no task switch and no re-encoding.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

import trio

from protocol.messages import ProviderMessage

log = logging.getLogger("dinfer.session")

# Frames buffered per in-flight request before the reader gives up on that request rather
# than stall every other request on this provider.
STREAM_BUFFER: Final = 1024

StreamFrame = ProviderMessage


class RawSink(Protocol):
    """Where the frames of one relayed request go, as text; neither method may wait."""

    def frame(self, text: str, final: bool) -> None: ...

    def session_ended(self) -> None: ...


class Streams:
    def __init__(self) -> None:
        self._streams: dict[str, trio.MemorySendChannel[StreamFrame]] = {}
        self._fell_behind: set[str] = set()
        self._sinks: dict[str, RawSink] = {}

    def open(self, request_id: str) -> trio.MemoryReceiveChannel[StreamFrame]:
        """The frames of one request, closed after its terminal or when the session ends."""
        send, receive = trio.open_memory_channel[StreamFrame](STREAM_BUFFER)
        self._streams[request_id] = send
        return receive

    def open_raw(self, request_id: str, sink: RawSink) -> None:
        """Hand the frames of one request to `sink` as the provider's text, until its
        terminal (`final`), `finish`, or the session's end (`session_ended`)."""
        self._sinks[request_id] = sink

    def route(self, request_id: str, message: StreamFrame, *, final: bool, text: str = "") -> None:
        """Hand a frame to its request without waiting; `final` frames end the stream.
        `text` is the frame as received, for a raw sink."""
        if self._sinks:
            sink = self._sinks.pop(request_id, None) if final else self._sinks.get(request_id)
            if sink is not None:
                sink.frame(text, final)
                return
        stream = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
        if stream is None:
            return  # finished, cancelled or never ours: PROTOCOL.md §6 says drop it
        try:
            stream.send_nowait(message)
        except trio.WouldBlock:
            log.warning("request %s fell %d frames behind; dropping it", request_id, STREAM_BUFFER)
            self._streams.pop(request_id, None)
            self._fell_behind.add(request_id)
            final = True
        if final:
            stream.close()

    def finish(self, request_id: str) -> None:
        """Forget a request that ended, was cancelled or was abandoned."""
        self._fell_behind.discard(request_id)
        self._sinks.pop(request_id, None)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.close()

    def fell_behind(self, request_id: str) -> bool:
        """Was this request's stream closed because its reader could not keep up?"""
        return request_id in self._fell_behind

    def __len__(self) -> int:
        """How many requests are in flight."""
        return len(self._streams) + len(self._sinks)

    def close_all(self) -> None:
        streams, self._streams = self._streams, {}
        sinks, self._sinks = self._sinks, {}
        for stream in streams.values():
            stream.close()
        for sink in sinks.values():
            sink.session_ended()
