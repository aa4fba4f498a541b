"""The in-flight requests of one provider session: request id -> a bounded channel of frames.

The reader routes each frame to its request's channel without waiting; a terminal closes it,
and frames for unknown or finished ids are dropped (PROTOCOL.md §6). A request whose consumer
cannot keep up is dropped rather than stall every other request on the provider, and
remembered as having fallen behind: the daemon's fault, not the provider's. When the session
ends every channel is closed, which dispatch reads as 502 `provider disconnected`.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from protocol.messages import ProviderMessage

log = logging.getLogger("dinfer.session")

# Frames buffered per in-flight request before the reader gives up on that request rather
# than stall every other request on this provider.
STREAM_BUFFER: Final = 1024

StreamFrame = ProviderMessage


class Streams:
    def __init__(self) -> None:
        self._streams: dict[str, trio.MemorySendChannel[StreamFrame]] = {}
        self._fell_behind: set[str] = set()

    def open(self, request_id: str) -> trio.MemoryReceiveChannel[StreamFrame]:
        """The frames of one request, closed after its terminal or when the session ends."""
        send, receive = trio.open_memory_channel[StreamFrame](STREAM_BUFFER)
        self._streams[request_id] = send
        return receive

    def route(self, request_id: str, message: StreamFrame, *, final: bool) -> None:
        """Hand a frame to its request without waiting; `final` frames end the stream."""
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
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.close()

    def fell_behind(self, request_id: str) -> bool:
        """Was this request's stream closed because its reader could not keep up?"""
        return request_id in self._fell_behind

    def __len__(self) -> int:
        """How many requests are in flight."""
        return len(self._streams)

    def close_all(self) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.close()
