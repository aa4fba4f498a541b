"""The hedging budget: backups at most a share of the dispatches over a sliding window.

Every race's primary dispatch deposits; a backup may start only while the backups of the
last `window_s` seconds, itself included, stay within `share` of that window's dispatches
(5%: one backup per 20 dispatches). Once spent, backups wait for more dispatches or for old
backups to leave the window. The window slides in `STEPS` steps, so memory is two fixed
arrays however busy the daemon is, and a count leaves the window between
`window_s - window_s / STEPS` and `window_s` after it was made.

With fewer than 1/share dispatches in a window there is no backup at all: a strict bound,
which leaves a quiet daemon to the first-token deadline's failover.

In a cluster the budget is the cluster's: `elsewhere` holds the other instances' window
totals as they last published them (daemon/cluster/node.py, at most `REFRESH_S` old), and a
backup must fit the sum.
"""

from __future__ import annotations

import math
from typing import Final

STEPS: Final = 60
# Floating-point slack in `share * dispatches`: 0.05 * 20 must allow one backup.
_EPSILON: Final = 1e-9


class HedgeBudget:
    def __init__(self, share: float, window_s: float) -> None:
        self.share = share
        self.window_s = window_s
        self._width = window_s / STEPS
        self._dispatches = [0] * STEPS
        self._backups = [0] * STEPS
        self._step: int | None = None  # the step the newest counts belong to
        self.dispatches = 0  # in the window
        self.backups = 0
        self.elsewhere = (0, 0)  # (dispatches, backups) of the cluster's other instances

    def deposit(self, now: float) -> None:
        """A primary dispatch."""
        self._dispatches[self._slot(now)] += 1
        self.dispatches += 1

    def allows(self, now: float) -> bool:
        """May one more backup start now?"""
        self._slot(now)
        dispatches, backups = self.elsewhere
        return self.backups + backups + 1 <= self.share * (self.dispatches + dispatches) + _EPSILON

    def totals(self, now: float) -> tuple[int, int]:
        """(dispatches, backups) in this instance's window now."""
        self._slot(now)
        return self.dispatches, self.backups

    def spend(self, now: float) -> None:
        """A backup started (only after `allows`)."""
        self._backups[self._slot(now)] += 1
        self.backups += 1

    def _slot(self, now: float) -> int:
        """Slide the window to `now`, forgetting the steps that left it; the index of now's."""
        step = math.floor(now / self._width)
        if self._step is None:
            self._step = step
        for old in range(self._step + 1, min(step, self._step + STEPS) + 1):
            self._forget(old % STEPS)
        self._step = max(self._step, step)
        return self._step % STEPS

    def _forget(self, slot: int) -> None:
        self.dispatches -= self._dispatches[slot]
        self.backups -= self._backups[slot]
        self._dispatches[slot] = self._backups[slot] = 0
