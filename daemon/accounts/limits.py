"""Per-key limits, enforced in memory: `Limiter.admit` gives a `Permit` or says why not.

The limits themselves (`KeyLimits`) come from the store's in-memory cache; this module keeps
what they are measured against, per key id: a token bucket of `rpm` requests refilled at
`rpm / 60` per second, the tokens charged in the last 60 s (`tpm`: from reported usage, so
checked at admission, refused once the window already holds the limit), the tokens charged in
the current UTC day (`daily_tokens`) and the requests in flight (`max_concurrency`). At start
the token counts are seeded from the ledger (`seed`), so a restart resets neither a key's
minute nor its day; its request bucket starts full. Nothing
here awaits or touches the database; a key without limits costs one dict probe in the store
and gets the shared `UNLIMITED` permit.

A permit is settled exactly once, when its request ends however it ends: `settle(tokens)`
releases its concurrency slot and charges the tokens the provider reported. Later calls do
nothing.

Monotonic time (`trio.current_time`) measures the rate windows; the wall clock (`wall`, Unix
seconds) the UTC day and `expires_at`. Every admission carries OpenAI's `x-ratelimit-*` headers
for the limits the key has (requests for `rpm`, tokens for `tpm`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from daemon.accounts.usage import RecentCharges
from daemon.key_policy import KeyLimits

WINDOW_S: Final = 60.0
DAY_S: Final = 86400
# A key at its concurrency limit: nothing says when a slot frees up; this is a hint.
CONCURRENCY_RETRY_S: Final = 1

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class RateLimited:
    """Over one of the key's limits (429); `retry_after` is whole seconds until it passes."""

    limit: str  # "rpm", "tpm", "daily_tokens" or "max_concurrency"
    message: str
    retry_after: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class ModelNotAllowed:
    """The key may not use this model (403)."""

    model: str
    headers: Headers


class _KeyState:
    """What one key's rate and token limits are measured against."""

    __slots__ = ("bucket", "bucket_at", "charged", "charges", "day", "day_tokens", "in_flight")

    def __init__(self, rpm: int | None, now: float) -> None:
        # A new key starts with a full bucket, and so does one that gains an rpm later.
        self.bucket = math.inf if rpm is None else float(rpm)
        self.bucket_at = now
        self.charges: deque[tuple[float, int]] = deque()  # (when, tokens), the last 60 s
        self.charged = 0  # the sum of `charges`
        self.day = -1
        self.day_tokens = 0
        self.in_flight = 0

    def refill(self, rpm: int, now: float) -> None:
        elapsed = now - self.bucket_at
        self.bucket = min(float(rpm), self.bucket + elapsed * rpm / WINDOW_S)
        self.bucket_at = now

    def prune(self, now: float) -> None:
        while self.charges and self.charges[0][0] <= now - WINDOW_S:
            self.charged -= self.charges.popleft()[1]

    def roll(self, day: int) -> None:
        if day != self.day:
            self.day, self.day_tokens = day, 0

    def tpm_wait(self, tpm: int, now: float) -> float:
        """Seconds until the last minute's charges fall below `tpm`."""
        remaining = self.charged
        for when, tokens in self.charges:
            remaining -= tokens
            if remaining < tpm:
                return when + WINDOW_S - now
        return 0.0


class Permit:
    """An admitted request's hold on its key's limits; `settle` it exactly once."""

    __slots__ = ("_limiter", "_settled", "_state", "headers")

    def __init__(self, limiter: Limiter | None, state: _KeyState | None, headers: Headers):
        self._limiter = limiter
        self._state = state
        self._settled = False
        self.headers = headers

    def settle(self, tokens: int) -> None:
        """Release the request's slot and charge its reported tokens; later calls do nothing."""
        if self._settled or self._state is None or self._limiter is None:
            return
        self._settled = True
        self._limiter.charge(self._state, tokens)


UNLIMITED: Final = Permit(None, None, ())

Admission = Permit | RateLimited | ModelNotAllowed


class Limiter:
    """Every key's counters; one per daemon."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._states: dict[str, _KeyState] = {}

    def seed(self, recent: RecentCharges) -> None:
        """Start from what the ledger charged before this start (a restart must not hand every
        key a fresh minute and day). Each key's request bucket starts full."""
        now = trio.current_time()
        for key_id in recent.day_tokens.keys() | recent.last_minute.keys():
            # No rpm yet: the bucket starts full when _state() first sees the key's rpm.
            state = self._states.setdefault(key_id, _KeyState(None, now))
            state.day, state.day_tokens = recent.day, recent.day_tokens.get(key_id, 0)
            for ago, tokens in recent.last_minute.get(key_id, []):
                state.charges.append((now - ago, tokens))
                state.charged += tokens

    def expired(self, limits: KeyLimits | None) -> bool:
        return (
            limits is not None
            and limits.expires_at is not None
            and (self._wall() >= limits.expires_at)
        )

    def admit(self, key_id: str, limits: KeyLimits | None, model: str) -> Admission:
        """Admit one request of `key_id` for `model`, or the first limit it is over."""
        if limits is None:
            return UNLIMITED
        now = trio.current_time()
        state = self._state(key_id, limits, now)
        if limits.allowed_models is not None and model not in limits.allowed_models:
            return ModelNotAllowed(model, _headers(limits, state, now))
        if state is None:
            return UNLIMITED
        refused = self._over(limits, state, now)
        if refused is not None:
            return refused
        if limits.rpm is not None:
            state.bucket -= 1
        state.in_flight += 1
        return Permit(self, state, _headers(limits, state, now))

    def charge(self, state: _KeyState, tokens: int) -> None:
        now = trio.current_time()
        state.in_flight -= 1
        state.prune(now)
        if tokens > 0:
            state.charges.append((now, tokens))
            state.charged += tokens
            state.roll(self._day())
            state.day_tokens += tokens

    def _state(self, key_id: str, limits: KeyLimits, now: float) -> _KeyState | None:
        if (
            limits.rpm is None
            and limits.tpm is None
            and limits.daily_tokens is None
            and limits.max_concurrency is None
        ):
            return self._states.get(key_id)  # in flight from before its limits were cleared
        state = self._states.get(key_id)
        if state is None:
            state = self._states[key_id] = _KeyState(limits.rpm, now)
        if limits.rpm is not None:
            state.refill(limits.rpm, now)
        state.prune(now)
        return state

    def _over(self, limits: KeyLimits, state: _KeyState, now: float) -> RateLimited | None:
        def refuse(limit: str, message: str, wait: float) -> RateLimited:
            retry = max(1, math.ceil(wait))
            return RateLimited(limit, message, retry, _headers(limits, state, now))

        if limits.max_concurrency is not None and state.in_flight >= limits.max_concurrency:
            message = f"this key may have {limits.max_concurrency} requests in flight at once"
            return refuse("max_concurrency", message, CONCURRENCY_RETRY_S)
        if limits.rpm is not None and state.bucket < 1:
            wait = (1 - state.bucket) * WINDOW_S / limits.rpm
            return refuse("rpm", f"this key is limited to {limits.rpm} requests per minute", wait)
        if limits.tpm is not None and state.charged >= limits.tpm:
            message = f"this key is limited to {limits.tpm} tokens per minute"
            return refuse("tpm", message, state.tpm_wait(limits.tpm, now))
        if limits.daily_tokens is not None:
            wall = self._wall()
            state.roll(int(wall // DAY_S))
            if state.day_tokens >= limits.daily_tokens:
                message = f"this key is limited to {limits.daily_tokens} tokens per UTC day"
                return refuse("daily_tokens", message, (state.day + 1) * DAY_S - wall)
        return None

    def _day(self) -> int:
        return int(self._wall() // DAY_S)


def _headers(limits: KeyLimits, state: _KeyState | None, now: float) -> Headers:
    """OpenAI's `x-ratelimit-*` headers for the limits the key has."""
    if state is None:
        return ()
    headers: list[tuple[bytes, bytes]] = []
    if limits.rpm is not None:
        refill = (limits.rpm - state.bucket) * WINDOW_S / limits.rpm
        headers += [
            (b"x-ratelimit-limit-requests", str(limits.rpm).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, math.floor(state.bucket))).encode()),
            (b"x-ratelimit-reset-requests", reset_text(refill).encode()),
        ]
    if limits.tpm is not None:
        newest = state.charges[-1][0] if state.charges else now - WINDOW_S
        headers += [
            (b"x-ratelimit-limit-tokens", str(limits.tpm).encode()),
            (b"x-ratelimit-remaining-tokens", str(max(0, limits.tpm - state.charged)).encode()),
            (b"x-ratelimit-reset-tokens", reset_text(newest + WINDOW_S - now).encode()),
        ]
    return tuple(headers)


def reset_text(seconds: float) -> str:
    """A duration as OpenAI writes its reset headers (Go's style): `20ms`, `1.5s`, `6m0s`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, secs = divmod(round(seconds, 3), 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    return f"{hours}h{text}" if hours else text
