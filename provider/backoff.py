"""The reconnect schedule: exponential backoff with full jitter, and the prompt move on 1001.

The n-th consecutive failed session waits a uniformly random time in
[0, min(cap, base * 2**n)]: full jitter spreads a fleet of nodes that lost the same daemon, so
they do not all knock at once when it comes back. A session that stayed up long enough
(`STABLE_SESSION`) proves the daemon works, and the schedule starts over.

A `1001 going away` is the daemon asking the node to reconnect elsewhere: it is being
deployed (drained) or rebalanced (docs/cluster.md), and the balancer in front of it sends the
node to another instance. That is no failure: the node reconnects within `GOING_AWAY_JITTER`
(full jitter, so the providers one drain sends away at once reach the other instances spread
over a second) and the schedule starts over, however young the session was. Except a 1001
sooner than `GOING_AWAY_MIN_UPTIME` after the session opened: a daemon that took the node only
to send it away again (a balancer still routing to a draining instance, the sibling workers of
one draining `--workers` machine) is a failure to find a home like any other, and backs off.
"""

from __future__ import annotations

import random
from typing import Final

BASE: Final = 1.0
CAP: Final = 30.0
STABLE_SESSION: Final = 30.0
# After a 1001: reconnect within this many seconds (uniformly), the schedule starting over...
GOING_AWAY_JITTER: Final = 1.0
# ...if the session had been up this long; a sooner 1001 counts as a failure.
GOING_AWAY_MIN_UPTIME: Final = 1.0


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

    def going_away(self, uptime: float) -> float:
        """The delay after a session the daemon closed with 1001 (see the module's note)."""
        if uptime < GOING_AWAY_MIN_UPTIME:
            self.session_ended(uptime)
            return self.next_delay()
        self.attempt = 0
        return self._rng.uniform(0, GOING_AWAY_JITTER)
