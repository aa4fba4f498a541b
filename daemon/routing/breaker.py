"""The daemon's circuit breaker: which (provider, model, shape) keys are cooling down.

A key is `(provider_id, model, shape)`. Keying by shape keeps a provider whose tool requests
crash serving plain chat, and a clean text answer from releasing its tool requests.

Only statuses 500, 502 and 504 are strikes: 503 is capacity (the provider is busy, not sick)
and 4xx is the request's own fault. `threshold` strikes inside a sliding `window` open the
breaker for `cooldown` seconds. The rules at the edges, all with `now` in
`trio.current_time()` seconds passed in by the caller:

- a strike counts while it is younger than `window`: one exactly `window` seconds old no
  longer counts;
- a key is cooling down while `now < until`: at exactly `until` it is eligible again;
- entering cooldown forgets the strikes that caused it, so after the cooldown expires a key
  counts from zero; strikes during a cooldown only push `until` to `now + cooldown`;
- `record_failure` returns True once per transition into cooldown, so the caller counts the
  metric and logs exactly once.

A stream that ended without a terminal frame is not a success: the caller just does not call
`record_success` for it.

Every method is plain synchronous code (atomic under Trio). The registry owns the instance and
wakes its admission queue at `next_expiry()`, since an expiring cooldown makes queued requests
routable again. Memory stays bounded by `sweep`, which the `record_*` methods also run,
amortized over as many calls as there are tracked keys.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Literal

Shape = Literal["base", "tools", "vision"]
BreakerKey = tuple[str, str, Shape]

STRIKE_STATUSES: Final = frozenset({500, 502, 504})
# The smallest number of record_* calls between opportunistic sweeps.
SWEEP_EVERY: Final = 1024


def shape_of(has_tools: bool, has_media: bool) -> Shape:
    """The request shape of PROTOCOL.md section 7: tools before media before plain chat."""
    if has_tools:
        return "tools"
    return "vision" if has_media else "base"


class CircuitBreaker:
    """Strikes and cooldowns per (provider_id, model, shape)."""

    def __init__(self, threshold: int, window: float, cooldown: float) -> None:
        if threshold < 1 or window <= 0 or cooldown <= 0:
            raise ValueError("threshold, window and cooldown must be positive")
        self._threshold = threshold
        self._window = window
        self._cooldown = cooldown
        # Only the newest `threshold` strikes can ever matter, so each deque is capped there.
        self._strikes: dict[BreakerKey, deque[float]] = {}
        self._until: dict[BreakerKey, float] = {}
        self._calls_until_sweep = SWEEP_EVERY

    def retune(self, threshold: int, window: float, cooldown: float) -> None:
        """New knobs from a reload: cooldowns in progress keep their end; strikes count
        against the new threshold and window from the next failure on."""
        if threshold < 1 or window <= 0 or cooldown <= 0:
            raise ValueError("threshold, window and cooldown must be positive")
        self._threshold, self._window, self._cooldown = threshold, window, cooldown
        self._strikes = {k: deque(s, maxlen=threshold) for k, s in self._strikes.items()}

    def record_failure(self, key: BreakerKey, status: int, now: float) -> bool:
        """Count a failed attempt; True exactly when this call put `key` into cooldown."""
        self._tick(now)
        if status not in STRIKE_STATUSES:
            return False
        if self.in_cooldown(key, now):
            self._until[key] = max(self._until[key], now + self._cooldown)
            return False
        strikes = self._strikes.setdefault(key, deque(maxlen=self._threshold))
        strikes.append(now)
        self._drop_old(strikes, now)
        if len(strikes) < self._threshold:
            return False
        del self._strikes[key]
        self._until[key] = now + self._cooldown
        return True

    def record_success(self, key: BreakerKey, now: float) -> None:
        """A request of this shape completed: clear its strikes and cooldown, no other shape's."""
        self._tick(now)
        self._strikes.pop(key, None)
        self._until.pop(key, None)

    def forget_provider(self, provider_id: str) -> None:
        """Drop every key of `provider_id`, so a provider that registers again starts clean."""
        for table in (self._strikes, self._until):
            for key in [k for k in table if k[0] == provider_id]:
                del table[key]

    def impose(self, key: BreakerKey, until: float) -> None:
        """A cooldown decided elsewhere (a cluster's owner of the provider): honour it."""
        self._strikes.pop(key, None)
        self._until[key] = max(self._until.get(key, until), until)

    def cooldown_until(self, key: BreakerKey, now: float) -> float | None:
        """When `key`'s cooldown ends, or None when it is not cooling down."""
        until = self._until.get(key)
        return until if until is not None and now < until else None

    def in_cooldown(self, key: BreakerKey, now: float) -> bool:
        return self.cooldown_until(key, now) is not None

    def cooldowns(self, provider_id: str, now: float) -> list[tuple[str, Shape, float]]:
        """The admin view: `(model, shape, until)` of each live cooldown, sorted."""
        return sorted(
            (model, shape, until)
            for (pid, model, shape), until in self._until.items()
            if pid == provider_id and now < until
        )

    def strikes(self, provider_id: str, now: float) -> list[tuple[str, Shape, int]]:
        """The admin view: `(model, shape, strikes in the window)` of each struck key, sorted."""
        found = []
        for (pid, model, shape), strikes in self._strikes.items():
            if pid == provider_id:
                count = sum(1 for at in strikes if now - at < self._window)
                if count:
                    found.append((model, shape, count))
        return sorted(found)

    def next_expiry(self, now: float) -> float | None:
        """The earliest cooldown end after `now`, for the task that wakes the admission queue."""
        return min((until for until in self._until.values() if now < until), default=None)

    def sweep(self, now: float) -> None:
        """Drop expired cooldowns and strike lists whose every strike left the window."""
        self._until = {k: until for k, until in self._until.items() if now < until}
        for strikes in self._strikes.values():
            self._drop_old(strikes, now)
        self._strikes = {k: strikes for k, strikes in self._strikes.items() if strikes}
        self._calls_until_sweep = max(SWEEP_EVERY, len(self._strikes) + len(self._until))

    def tracked_keys(self) -> int:
        """How many keys hold any state (strikes or a cooldown, live or not yet swept)."""
        return len(self._strikes.keys() | self._until.keys())

    def _tick(self, now: float) -> None:
        # The next sweep waits as many calls as entries survived the last one: each call pays
        # amortized O(1), and the tables never hold more than SWEEP_EVERY plus twice the keys
        # that were live at the last sweep.
        self._calls_until_sweep -= 1
        if self._calls_until_sweep <= 0:
            self.sweep(now)

    def _drop_old(self, strikes: deque[float], now: float) -> None:
        while strikes and now - strikes[0] >= self._window:
            strikes.popleft()
