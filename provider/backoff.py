"""The reconnect schedule: exponential backoff with full jitter.

The n-th consecutive failed session waits a uniformly random time in
[0, min(cap, base * 2**n)]: full jitter spreads a fleet of nodes that lost the same daemon, so
they do not all knock at once when it comes back. A session that stayed up long enough
(`STABLE_SESSION`) proves the daemon works, and the schedule starts over.
"""

from __future__ import annotations

import random
from typing import Final

BASE: Final = 1.0
CAP: Final = 30.0
STABLE_SESSION: Final = 30.0


def backoff_ceiling(attempt: int, *, base: float = BASE, cap: float = CAP) -> float:
    """The longest wait before reconnect attempt `attempt` (0 for the first retry)."""
    # min() before the power would overflow: 2**1100 is not a float.
    return min(cap, base * 2 ** min(attempt, 64))


class Backoff:
    def __init__(self, rng: random.Random, *, base: float = BASE, cap: float = CAP) -> None:
        self._rng = rng
        self._base = base
        self._cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = backoff_ceiling(self.attempt, base=self._base, cap=self._cap)
        self.attempt += 1
        return self._rng.uniform(0, ceiling)

    def session_ended(self, uptime: float) -> None:
        """Start the schedule over after a session that stayed up `STABLE_SESSION` seconds."""
        if uptime >= STABLE_SESSION:
            self.attempt = 0
