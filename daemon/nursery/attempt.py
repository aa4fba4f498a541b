"""One attempt on one provider: seal and send the request, then read its frames as events.

A `ProviderStream` turns the session's raw frames for one request id into typed events:
decrypted, classified chunks (PROTOCOL.md §6), `accepted`, `completed`, or a `Failure` with the
status the breaker and the consumer see. It has no deadlines of its own: callers wrap
`next_event()` in cancel scopes. `close()` is the one cleanup path: it tells the provider to
stop (a `cancel` frame) unless the request already ended, and frees the slot.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Final

import trio

from daemon.routing.registry import Registry
from daemon.routing.types import Lease, SessionGone
from protocol import crypto
from protocol.messages import (
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceResponseChunk,
    Usage,
)
from protocol.sse import ChunkKind, classify, parse_data_line


@dataclass(frozen=True, slots=True)
class Chunk:
    """One SSE data line from the provider, classified."""

    kind: ChunkKind
    line: str
    event: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Accepted:
    """The provider is working on it (loading the model): first content may take long."""


@dataclass(frozen=True, slots=True)
class Completed:
    usage: Usage


@dataclass(frozen=True, slots=True)
class Failure:
    """An attempt that went wrong; `status` is what the breaker counts and the consumer sees."""

    status: int
    message: str
    kind: str = "provider_error"  # or "timeout"
    reason: str | None = None  # the provider's `error_reason`, e.g. context_length_exceeded

    @property
    def is_request_fault(self) -> bool:
        """400/413/415/422: the request itself is bad; retrying elsewhere cannot help."""
        return self.status in {400, 413, 415, 422}


Event = Chunk | Accepted | Completed | Failure

# A provider's words about a failure are its own strings, as long as a frame allows: they
# reach logs and consumers cut to this many characters, and a reason becomes the consumer's
# error `code` only when it is a short identifier such as `context_length_exceeded`.
MAX_PROVIDER_TEXT: Final = 1000
_REASON: Final = re.compile(r"[a-z0-9_.\-]{1,64}", re.ASCII)

DISCONNECTED: Final = Failure(502, "provider disconnected")
INVALID_CHUNK: Final = Failure(502, "provider returned invalid encrypted chunk")
# 503: not a breaker strike. The daemon (or its consumer) could not keep up with the stream.
FELL_BEHIND: Final = Failure(503, "the daemon fell behind this stream and dropped it")


class ProviderStream:
    def __init__(self, lease: Lease, registry: Registry) -> None:
        self.lease = lease
        self.entry = lease.entry
        self.request_id = str(uuid.uuid4())
        self._registry = registry
        self._session = lease.entry.session
        self._frames: trio.MemoryReceiveChannel[Any] | None = None
        self._opener: crypto.ChunkOpener | None = None
        # The rest of a frame that sealed several SSE lines (multi_sse), in reverse order.
        self._backlog: list[Chunk] = []
        self.ended = False
        self.closed = False

    @property
    def provider_id(self) -> str:
        return self.entry.provider_id

    def start(self, plaintext: bytes) -> Failure | None:
        """Seal the request to this provider with a fresh key and send it."""
        payload, self._opener = crypto.seal_request(plaintext, self.entry.public_key)
        self._frames = self._session.open_stream(self.request_id)
        try:
            self._session.start(self.request_id, payload, self.lease.model)
        except SessionGone:
            self.ended = True
            return DISCONNECTED
        return None

    async def next_event(self) -> Event:
        assert self._frames is not None
        if self._backlog:
            return self._backlog.pop()
        try:
            frame = await self._frames.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return self._end_of_frames()
        return self._event(frame)

    def poll_event(self) -> Event | None:
        """next_event without waiting: None when no frame is buffered."""
        assert self._frames is not None
        if self._backlog:
            return self._backlog.pop()
        try:
            frame = self._frames.receive_nowait()
        except trio.WouldBlock:
            return None
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return self._end_of_frames()
        return self._event(frame)

    def _end_of_frames(self) -> Failure:
        if self._session.fell_behind(self.request_id):
            return FELL_BEHIND  # our fault, not the provider's: it is still generating
        self.ended = True
        return DISCONNECTED

    def _event(self, frame: Any) -> Event:
        match frame:
            case InferenceResponseChunk():
                return self._chunk(frame)
            case InferenceAccepted():
                return Accepted()
            case InferenceComplete(usage=usage):
                self.ended = True
                return Completed(usage)
            case InferenceError(status_code=status, error=message, error_reason=reason):
                self.ended = True
                text = provider_text(message) or f"provider error {status}"
                known = reason if reason is not None and _REASON.fullmatch(reason) else None
                return Failure(status, text, reason=known)
        return DISCONNECTED  # unreachable: the session routes only these frames

    def _chunk(self, frame: InferenceResponseChunk) -> Chunk | Failure:
        assert self._opener is not None
        try:
            text = self._opener.open_chunk(frame).decode()
        except (crypto.CryptoError, UnicodeDecodeError):
            self._registry.ban(self.entry, INVALID_CHUNK.message)
            return INVALID_CHUNK
        if not self.entry.multi_sse or "\n" not in text:
            return _classified(text)
        # multi_sse (docs/protocol-extensions.md): the frame's lines, in order, one event each.
        first, *rest = text.split("\n")
        self._backlog[:0] = [_classified(line) for line in reversed(rest)]
        return _classified(first)

    def close(self) -> None:
        """Stop the provider if the request is still running, free the slot; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._registry.release(self.lease)
        if self.ended:
            self._session.finish(self.request_id)
            return
        self._session.cancel(self.request_id)


def _classified(line: str) -> Chunk:
    data = parse_data_line(line)
    if data is None:  # an SSE comment or event: line: nothing to relay
        return Chunk(ChunkKind.DONE, line, None)
    kind, event = classify(data)
    return Chunk(kind, line, event)


def provider_text(text: str) -> str:
    """A provider's (or its backend's) message, cut to MAX_PROVIDER_TEXT characters."""
    return text if len(text) <= MAX_PROVIDER_TEXT else text[:MAX_PROVIDER_TEXT] + "…"


def error_message(event: dict[str, Any] | None) -> str:
    """The text of an SSE `{"error": ...}` event, for logs and the in-band error."""
    error = (event or {}).get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return provider_text(str(error["message"]))
    if isinstance(error, str) and error:
        return provider_text(error)
    return "the provider's backend reported an error"
