"""The frames waiting for one session's writer.

Anyone may post a frame without waiting; only the writer sends. Hypercorn shields its socket
writes from cancellation, so a provider that stops reading would otherwise hold any task that
writes to it; with the outbox it holds only the writer, and a full outbox means the provider
is not reading: `OutboxFull`, on which the session ends.
"""

from __future__ import annotations

from typing import Final

import trio

from daemon.routing.types import SessionGone
from protocol.messages import DaemonMessage, encode

# Frames waiting for the writer: past this the provider is not reading and the session ends.
OUTBOX_FRAMES: Final = 256


class OutboxFull(SessionGone):
    """The provider has not taken OUTBOX_FRAMES frames: it stopped reading."""


class Outbox:
    def __init__(self) -> None:
        self._send, self.frames = trio.open_memory_channel[str](OUTBOX_FRAMES)

    def post(self, message: DaemonMessage) -> None:
        """Queue one frame, never waiting: OutboxFull, or SessionGone once closed."""
        try:
            self._send.send_nowait(encode(message))
        except trio.WouldBlock:
            raise OutboxFull from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):  # closed, or writer gone
            raise SessionGone from None

    def close(self) -> None:
        """No more frames: the writer sends what is queued (if it still runs), then stops."""
        self._send.close()
