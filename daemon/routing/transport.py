"""The WebSocket as a provider session sees it: receive a frame, send one, close.

The app adapts the ASGI websocket to `Transport` (`daemon/api/provider_socket.py`); tests use
in-memory ones. Whatever a transport's own errors are, a gone peer is `TransportClosed`, and
`decode_frame` is the one place a received frame becomes a message.
"""

from __future__ import annotations

from typing import Protocol

from protocol.messages import ProtocolError, ProviderMessage, decode_provider_frame


class Transport(Protocol):
    """A WebSocket as the session needs it (the app adapts the ASGI one)."""

    async def receive(self) -> str | bytes: ...

    async def send(self, text: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class TransportClosed(Exception):
    """The WebSocket is gone: raised by transports in place of their own errors."""


def decode_frame(frame: str | bytes) -> ProviderMessage | ProtocolError:
    """A received frame as a message; binary frames are not part of the protocol (§1)."""
    if isinstance(frame, bytes):
        return ProtocolError("binary frames are not part of the protocol")
    return decode_provider_frame(frame)
