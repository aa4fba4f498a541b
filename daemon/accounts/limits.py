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

In a cluster (DINFER_REDIS_URL) the limits are the key's, not each instance's: the cluster's
task (daemon/cluster/limits.py) publishes what this instance spent (`shares`: per key its
`Share`) and hands back every other instance's (`elsewhere`), and `admit` checks local plus
the others'. A peer's rpm debt is extrapolated from its wall-clock stamp at the refill rate it
published; a share older than `SHARE_TTL_S` counts no more (its instance died, or Redis is
down: each instance then falls back to its own counts). What an instance shares is what it
spent since it started, never what it was seeded with (`--workers` seed from one ledger: each
would otherwise count the others' past tokens again). The cluster's bucket refills at `rpm`/60
in all: each instance refills its own debt at its part of that rate, in proportion to its part
of the cluster's debt. Alone (no Redis, nothing elsewhere) every rule is exactly the one above.

Monotonic time (`trio.current_time`) measures the rate windows; the wall clock (`wall`, Unix
seconds) the UTC day, `expires_at` and the shares' stamps. Every admission carries OpenAI's
`x-ratelimit-*` headers for the limits the key has (requests for `rpm`, tokens for `tpm`), as
the cluster counts them.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import trio

from daemon.accounts.usage import RecentCharges
from daemon.key_policy import KeyLimits

WINDOW_S: Final = 60.0
DAY_S: Final = 86400
# A key at its concurrency limit: nothing says when a slot frees up; this is a hint.
CONCURRENCY_RETRY_S: Final = 1
# A share older than this (its instance's wall clock) counts no more.
SHARE_TTL_S: Final = 3.0

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


@dataclass(frozen=True, slots=True)
class Share:
    """What one instance of a cluster spent of one key since it started, at wall time `at`."""

    at: float  # Unix seconds when measured
    debt: float = 0.0  # requests taken from the rpm bucket, not yet refilled
    refill: float = 0.0  # requests per second `debt` decays by
    minute: tuple[tuple[float, int], ...] = ()  # (Unix second, tokens), oldest first
    day: int = -1  # the UTC day of `day_tokens`
    day_tokens: int = 0
    in_flight: int = 0

    @property
    def idle(self) -> bool:
        return not (self.debt or self.minute or self.day_tokens or self.in_flight)


@dataclass(frozen=True, slots=True)
class _Others:
    """The other instances' shares of one key, summed as of one moment."""

    debt: float
    charged: int
    charges: tuple[tuple[float, int], ...]  # (monotonic time, tokens), oldest first
    day_tokens: int
    in_flight: int


_NOBODY: Final = _Others(0.0, 0, (), 0, 0)


class _KeyState:
    """What one key's rate and token limits are measured against."""

    __slots__ = (
        "bucket",
        "bucket_at",
        "charged",
        "charges",
        "day",
        "day_seeded",
        "day_tokens",
        "in_flight",
        "key_id",
        "rpm",
        "seeded",
    )

    def __init__(self, key_id: str, rpm: int | None, now: float) -> None:
        self.key_id = key_id
        # A new key starts with a full bucket, and so does one that gains an rpm later.
        self.bucket = math.inf if rpm is None else float(rpm)
        self.bucket_at = now
        self.rpm = rpm
        self.charges: deque[tuple[float, int]] = deque()  # (when, tokens), the last 60 s
        self.charged = 0  # the sum of `charges`
        self.seeded = 0  # how many of the first `charges` came from the ledger (`seed`)
        self.day = -1
        self.day_tokens = 0
        self.day_seeded = 0  # of `day_tokens`, from the ledger
        self.in_flight = 0

    def refill(self, rpm: int, now: float, elsewhere: float = 0.0) -> None:
        """Refill at rpm/60 per second; with `elsewhere` (the others' debt) only at this
        instance's part of it, so the cluster's bucket refills at rpm/60 in all."""
        elapsed = now - self.bucket_at
        self.rpm = rpm
        rate = rpm / WINDOW_S
        if elsewhere > 0:
            debt = rpm - self.bucket
            rate *= debt / (debt + elsewhere)
        self.bucket = min(float(rpm), self.bucket + elapsed * rate)
        self.bucket_at = now

    def prune(self, now: float) -> None:
        while self.charges and self.charges[0][0] <= now - WINDOW_S:
            self.charged -= self.charges.popleft()[1]
            if self.seeded:
                self.seeded -= 1

    def roll(self, day: int) -> None:
        if day != self.day:
            self.day, self.day_tokens, self.day_seeded = day, 0, 0

    def tpm_wait(self, tpm: int, now: float, others: _Others) -> float:
        """Seconds until the last minute's charges (here and elsewhere) fall below `tpm`."""
        remaining = self.charged + others.charged
        charges = sorted([*self.charges, *others.charges]) if others.charges else self.charges
        for when, tokens in charges:
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
        self._elsewhere: dict[str, tuple[Share, ...]] = {}
        self._changed: set[str] = set()  # keys admitted or settled since the last `shares`
        self._sharing = False  # a cluster asked for `shares`: track `_changed`

    def seed(self, recent: RecentCharges) -> None:
        """Start from what the ledger charged before this start (a restart must not hand every
        key a fresh minute and day). Each key's request bucket starts full."""
        now = trio.current_time()
        for key_id in recent.day_tokens.keys() | recent.last_minute.keys():
            # No rpm yet: the bucket starts full when _state() first sees the key's rpm.
            state = self._states.setdefault(key_id, _KeyState(key_id, None, now))
            state.day, state.day_tokens = recent.day, recent.day_tokens.get(key_id, 0)
            state.day_seeded = state.day_tokens
            for ago, tokens in recent.last_minute.get(key_id, []):
                state.charges.append((now - ago, tokens))
                state.charged += tokens
                state.seeded += 1

    # The cluster's side ---------------------------------------------------------------------

    def shares(self, *, every: bool = False) -> dict[str, Share | None]:
        """What this instance spent of each key since it started, for the other instances:
        the keys admitted or settled since the last call (`every`: all keys), None for a key
        with nothing to share."""
        now, wall = trio.current_time(), self._wall()
        today = int(wall // DAY_S)
        shares: dict[str, Share | None] = {}
        self._sharing = True
        if every:
            states = list(self._states.values())
        else:
            states = [s for k in self._changed if (s := self._states.get(k)) is not None]
        self._changed.clear()
        for state in states:
            key_id = state.key_id
            debt = refill = 0.0
            if state.rpm is not None:
                others = self._others(key_id, now, wall)
                state.refill(state.rpm, now, others.debt)
                debt = state.rpm - state.bucket
                total = debt + others.debt
                refill = state.rpm / WINDOW_S * (debt / total if others.debt else 1.0)
            state.prune(now)
            minute: dict[float, int] = {}
            for when, tokens in list(state.charges)[state.seeded :]:
                # Whole seconds, rounded up: a peer holds a charge up to 1 s long, never less.
                second = float(math.ceil(wall + when - now))
                minute[second] = minute.get(second, 0) + tokens
            day_tokens = state.day_tokens - state.day_seeded if state.day == today else 0
            share = Share(
                wall, debt, refill, tuple(minute.items()), today, day_tokens, state.in_flight
            )
            shares[key_id] = None if share.idle else share
        return shares

    def elsewhere(self, shares: Mapping[str, tuple[Share, ...]]) -> None:
        """Every other instance's shares, per key: from now on `admit` counts them too."""
        self._elsewhere = dict(shares)

    def _others(self, key_id: str, now: float, wall: float) -> _Others:
        shares = self._elsewhere.get(key_id)
        if not shares:
            return _NOBODY
        debt = 0.0
        charged = day_tokens = in_flight = 0
        charges: list[tuple[float, int]] = []
        today = int(wall // DAY_S)
        for share in shares:
            age = wall - share.at
            if age >= SHARE_TTL_S:
                continue  # its instance stopped publishing: dead, or Redis is down
            debt += max(0.0, share.debt - share.refill * max(0.0, age))
            for second, tokens in share.minute:
                if second > wall - WINDOW_S:
                    charges.append((second - wall + now, tokens))
                    charged += tokens
            if share.day == today:
                day_tokens += share.day_tokens
            in_flight += share.in_flight
        charges.sort()
        return _Others(debt, charged, tuple(charges), day_tokens, in_flight)

    # Admission ------------------------------------------------------------------------------

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
        others = self._others(key_id, now, self._wall()) if self._elsewhere else _NOBODY
        state = self._state(key_id, limits, now, others)
        if limits.allowed_models is not None and model not in limits.allowed_models:
            return ModelNotAllowed(model, _headers(limits, state, now, others))
        if state is None:
            return UNLIMITED
        refused = self._over(limits, state, now, others)
        if refused is not None:
            return refused
        if limits.rpm is not None:
            state.bucket -= 1
        state.in_flight += 1
        if self._sharing:
            self._changed.add(key_id)
        return Permit(self, state, _headers(limits, state, now, others))

    def charge(self, state: _KeyState, tokens: int) -> None:
        now = trio.current_time()
        state.in_flight -= 1
        if self._sharing:
            self._changed.add(state.key_id)
        state.prune(now)
        if tokens > 0:
            state.charges.append((now, tokens))
            state.charged += tokens
            state.roll(self._day())
            state.day_tokens += tokens

    def _state(
        self, key_id: str, limits: KeyLimits, now: float, others: _Others
    ) -> _KeyState | None:
        if (
            limits.rpm is None
            and limits.tpm is None
            and limits.daily_tokens is None
            and limits.max_concurrency is None
        ):
            return self._states.get(key_id)  # in flight from before its limits were cleared
        state = self._states.get(key_id)
        if state is None:
            state = self._states[key_id] = _KeyState(key_id, limits.rpm, now)
        if limits.rpm is not None:
            state.refill(limits.rpm, now, others.debt)
        else:
            state.rpm = None
        state.prune(now)
        return state

    def _over(
        self, limits: KeyLimits, state: _KeyState, now: float, others: _Others
    ) -> RateLimited | None:
        def refuse(limit: str, message: str, wait: float) -> RateLimited:
            retry = max(1, math.ceil(wait))
            return RateLimited(limit, message, retry, _headers(limits, state, now, others))

        in_flight = state.in_flight + others.in_flight
        if limits.max_concurrency is not None and in_flight >= limits.max_concurrency:
            message = f"this key may have {limits.max_concurrency} requests in flight at once"
            return refuse("max_concurrency", message, CONCURRENCY_RETRY_S)
        bucket = state.bucket - others.debt
        if limits.rpm is not None and bucket < 1:
            wait = (1 - bucket) * WINDOW_S / limits.rpm
            return refuse("rpm", f"this key is limited to {limits.rpm} requests per minute", wait)
        if limits.tpm is not None and state.charged + others.charged >= limits.tpm:
            message = f"this key is limited to {limits.tpm} tokens per minute"
            return refuse("tpm", message, state.tpm_wait(limits.tpm, now, others))
        if limits.daily_tokens is not None:
            wall = self._wall()
            state.roll(int(wall // DAY_S))
            if state.day_tokens + others.day_tokens >= limits.daily_tokens:
                message = f"this key is limited to {limits.daily_tokens} tokens per UTC day"
                return refuse("daily_tokens", message, (state.day + 1) * DAY_S - wall)
        return None

    def _day(self) -> int:
        return int(self._wall() // DAY_S)


def _headers(
    limits: KeyLimits, state: _KeyState | None, now: float, others: _Others = _NOBODY
) -> Headers:
    """OpenAI's `x-ratelimit-*` headers for the limits the key has (the cluster's counts)."""
    if state is None:
        return ()
    headers: list[tuple[bytes, bytes]] = []
    if limits.rpm is not None:
        bucket = state.bucket - others.debt
        refill = (limits.rpm - bucket) * WINDOW_S / limits.rpm
        headers += [
            (b"x-ratelimit-limit-requests", str(limits.rpm).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, math.floor(bucket))).encode()),
            (b"x-ratelimit-reset-requests", reset_text(refill).encode()),
        ]
    if limits.tpm is not None:
        newest = state.charges[-1][0] if state.charges else now - WINDOW_S
        if others.charges:
            newest = max(newest, others.charges[-1][0])
        charged = state.charged + others.charged
        headers += [
            (b"x-ratelimit-limit-tokens", str(limits.tpm).encode()),
            (b"x-ratelimit-remaining-tokens", str(max(0, limits.tpm - charged)).encode()),
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
