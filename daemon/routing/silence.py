"""When a session gives up on a provider it no longer hears from.

The reader waits for frames inside one cancel scope whose deadline moves (cheaper than a
scope per frame). Two silences end a session: no frame at all for `heartbeat_timeout_s`
(PROTOCOL.md §4: 4002 stale), and, sooner, a frame of ours the provider has not taken for
`STALLED_WRITE_S` with nothing heard from it meanwhile.
"""

from __future__ import annotations

import math
from typing import Final

import trio

from protocol.messages import CloseCode

# Hypercorn holds a connection's send lock for the whole of a write, and needs that lock to
# answer a close frame before it passes the close on: a provider that closed on a frame it
# would not take (1009, too big) is invisible behind the stuck write, until TCP goes. A live
# provider heartbeats every 5 s (PROTOCOL.md §4) even while it takes in a large frame, so
# three missed beats mean it is gone, long before heartbeat_timeout.
STALLED_WRITE_S: Final = 15.0


class Silence:
    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.scope = trio.CancelScope()  # the reader waits inside it
        self._timeout = heartbeat_timeout_s
        self._last_heard = trio.current_time()
        self._writing_since: float | None = None

    def heard(self) -> None:
        """A frame arrived (or the reader starts listening)."""
        self._last_heard = trio.current_time()
        self._move()

    def writing(self, busy: bool) -> None:
        """The writer started (True) or finished (False) sending a frame."""
        self._writing_since = trio.current_time() if busy else None
        self._move()

    def verdict(self) -> tuple[int, str]:
        """The close code and reason, once the scope's deadline has passed."""
        if self._stalled_at() < self._stale_at():
            return CloseCode.GOING_AWAY, f"the provider took no frame for {STALLED_WRITE_S:g} s"
        return CloseCode.STALE, f"no frame for {self._timeout:g} s"

    def _move(self) -> None:
        self.scope.deadline = min(self._stale_at(), self._stalled_at())

    def _stale_at(self) -> float:
        return self._last_heard + self._timeout

    def _stalled_at(self) -> float:
        if self._writing_since is None:
            return math.inf
        return max(self._last_heard, self._writing_since) + STALLED_WRITE_S
