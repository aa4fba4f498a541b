"""Rolling first-token latency: a bounded window of recent samples, and the prompt bands.

A `TtftWindow` keeps the most recent samples (at most `capacity`, none older than
`MAX_AGE_S`): a count window weights recent traffic, and the age limit keeps a quiet model
from being judged by an hour-old fleet. Samples sit in arrival order (for eviction) and in a
sorted list (for quantiles), so adding one is a binary search and a short memmove, and a
quantile is one index. The registry keeps one window per (model, prompt band) for the fleet,
and one per (provider, model, prompt band) on each entry; hedging reads high quantiles of
them, routing reads medians.

Prefill grows with the prompt, so a 20,000-token prompt is not judged by the first-token times
of chat turns: samples are kept per prompt band (`band_of`).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Final

# Samples older than this are forgotten, however few the window holds.
MAX_AGE_S: Final = 300.0
# Upper bounds (exclusive, estimated prompt tokens) of the prompt bands; the last band is open.
BAND_LIMITS: Final = (1024, 4096, 16384)
BAND_LABELS: Final = ("<1k", "1k-4k", "4k-16k", "16k+")

LatencyKey = tuple[str, int]  # (model, prompt band)


def band_of(prompt_tokens: int) -> int:
    return bisect.bisect_right(BAND_LIMITS, prompt_tokens)


class TtftWindow:
    """Recent first-token times in seconds; `quantile` and `count` forget expired samples."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._arrivals: deque[tuple[float, float]] = deque()  # (recorded at, seconds)
        self._sorted: list[float] = []

    def add(self, seconds: float, now: float) -> None:
        self._arrivals.append((now, seconds))
        bisect.insort(self._sorted, seconds)
        if len(self._arrivals) > self._capacity:
            self._drop_oldest()

    def count(self, now: float) -> int:
        self._expire(now)
        return len(self._sorted)

    def quantile(self, q: float, now: float) -> float | None:
        """The nearest-rank `q` quantile (0 < q <= 1; 0 gives the fastest), None when empty."""
        self._expire(now)
        if not self._sorted:
            return None
        return self._sorted[max(0, math.ceil(q * len(self._sorted)) - 1)]

    def samples(self, now: float) -> list[float]:
        """The samples held, fastest first."""
        self._expire(now)
        return list(self._sorted)

    @property
    def newest_at(self) -> float | None:
        """When the newest sample still held was recorded (the exploration rule asks)."""
        return self._arrivals[-1][0] if self._arrivals else None

    def _expire(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] <= now - MAX_AGE_S:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, seconds = self._arrivals.popleft()
        del self._sorted[bisect.bisect_left(self._sorted, seconds)]
