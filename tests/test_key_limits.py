"""Per-key limits on a virtual clock: what `Limiter.admit` decides, and when a refusal passes.

Each test names the rule it protects; times are exact (MockClock, autojump). The limiter's wall
clock is the virtual clock shifted to a fixed UTC moment, so day and expiry edges are exact too.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio
import trio.testing

from daemon.accounts.limits import (
    UNLIMITED,
    Admission,
    Limiter,
    ModelNotAllowed,
    Permit,
    RateLimited,
    reset_text,
)
from daemon.accounts.usage import RecentCharges
from daemon.key_policy import KeyLimits, LimitError, format_time, parse_changes

# 2027-01-01T23:59:00Z: one virtual minute before a UTC midnight.
WALL0 = datetime(2027, 1, 1, 23, 59, tzinfo=UTC).timestamp()


def limiter() -> Limiter:
    return Limiter(wall=lambda: WALL0 + trio.current_time())


def permit(admission: Admission) -> Permit:
    assert isinstance(admission, Permit), admission
    return admission


def refused(admission: Admission) -> RateLimited:
    assert isinstance(admission, RateLimited), admission
    return admission


def headers(admission: Permit | RateLimited) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in admission.headers}


async def test_a_key_without_limits_gets_the_shared_permit_and_no_headers() -> None:
    assert limiter().admit("key_a", None, "m") is UNLIMITED
    assert UNLIMITED.headers == ()
    UNLIMITED.settle(100)  # settling the shared permit does nothing, however often


async def test_rpm_is_a_bucket_refilled_at_rpm_per_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lim, limits = limiter(), KeyLimits(rpm=2)
    first = permit(lim.admit("k", limits, "m"))
    assert headers(first) == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
    }
    permit(lim.admit("k", limits, "m"))
    over = refused(lim.admit("k", limits, "m"))
    assert (over.limit, over.retry_after) == ("rpm", 30)
    assert headers(over)["x-ratelimit-remaining-requests"] == "0"
    assert headers(over)["x-ratelimit-reset-requests"] == "1m0s"
    await trio.sleep(29.9)
    assert refused(lim.admit("k", limits, "m")).retry_after == 1  # 0.1 s left, rounded up
    await trio.sleep(0.1)
    assert headers(permit(lim.admit("k", limits, "m")))["x-ratelimit-remaining-requests"] == "0"


async def test_a_refused_request_takes_nothing_from_the_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lim, limits = limiter(), KeyLimits(rpm=1)
    permit(lim.admit("k", limits, "m"))
    for _ in range(5):
        refused(lim.admit("k", limits, "m"))
    await trio.sleep(60)
    permit(lim.admit("k", limits, "m"))


async def test_keys_are_counted_apart() -> None:
    lim, limits = limiter(), KeyLimits(rpm=1)
    permit(lim.admit("a", limits, "m"))
    permit(lim.admit("b", limits, "m"))
    refused(lim.admit("a", limits, "m"))


async def test_tpm_refuses_once_the_last_minute_holds_the_limit_until_it_slides_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lim, limits = limiter(), KeyLimits(tpm=100)
    permit(lim.admit("k", limits, "m")).settle(60)
    await trio.sleep(10)
    second = permit(lim.admit("k", limits, "m"))  # 60 < 100: admitted, though it may go over
    assert headers(second) == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "40",
        "x-ratelimit-reset-tokens": "50s",
    }
    second.settle(50)
    over = refused(lim.admit("k", limits, "m"))
    # 110 charged: the first 60 leave the window at t=60, 50 s from now, and 50 < 100.
    assert (over.limit, over.retry_after) == ("tpm", 50)
    assert headers(over)["x-ratelimit-remaining-tokens"] == "0"
    await trio.sleep(49.5)
    refused(lim.admit("k", limits, "m"))
    await trio.sleep(0.5)
    assert headers(permit(lim.admit("k", limits, "m")))["x-ratelimit-remaining-tokens"] == "50"


async def test_daily_tokens_reset_at_the_utc_midnight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lim, limits = limiter(), KeyLimits(daily_tokens=10)
    permit(lim.admit("k", limits, "m")).settle(10)
    over = refused(lim.admit("k", limits, "m"))
    assert (over.limit, over.retry_after) == ("daily_tokens", 60)
    assert over.headers == ()  # no tpm, no rpm: no x-ratelimit headers
    await trio.sleep(60)
    permit(lim.admit("k", limits, "m"))


async def test_max_concurrency_counts_requests_until_their_permits_settle() -> None:
    lim, limits = limiter(), KeyLimits(max_concurrency=2)
    held = [permit(lim.admit("k", limits, "m")) for _ in range(2)]
    over = refused(lim.admit("k", limits, "m"))
    assert (over.limit, over.retry_after) == ("max_concurrency", 1)
    held[0].settle(0)
    held[0].settle(0)  # a second settle must not free a second slot
    permit(lim.admit("k", limits, "m"))
    refused(lim.admit("k", limits, "m"))


async def test_settling_twice_charges_once() -> None:
    lim, limits = limiter(), KeyLimits(daily_tokens=10)
    held = permit(lim.admit("k", limits, "m"))
    held.settle(6)
    held.settle(6)
    permit(lim.admit("k", limits, "m"))


async def test_a_model_outside_allowed_models_is_refused_and_counts_nothing() -> None:
    lim, limits = limiter(), KeyLimits(rpm=1, allowed_models=frozenset({"a"}))
    refusal = lim.admit("k", limits, "b")
    assert isinstance(refusal, ModelNotAllowed) and refusal.model == "b"
    assert (
        dict((k.decode(), v.decode()) for k, v in refusal.headers)["x-ratelimit-remaining-requests"]
        == "1"
    )
    permit(lim.admit("k", limits, "a"))


async def test_a_key_with_only_a_model_list_costs_no_counters() -> None:
    lim = limiter()
    assert lim.admit("k", KeyLimits(allowed_models=frozenset({"m"})), "m") is UNLIMITED


async def test_a_key_expires_exactly_at_expires_at(autojump_clock: trio.testing.MockClock) -> None:
    lim, limits = limiter(), KeyLimits(expires_at=WALL0 + 5)
    assert not lim.expired(limits) and not lim.expired(None)
    await trio.sleep(4.999)
    assert not lim.expired(limits)
    await trio.sleep(0.001)
    assert lim.expired(limits)


async def test_limits_changed_while_a_request_is_in_flight_release_its_slot() -> None:
    lim = limiter()
    held = permit(lim.admit("k", KeyLimits(max_concurrency=1), "m"))
    assert lim.admit("k", None, "m") is UNLIMITED  # limits cleared meanwhile
    held.settle(0)
    permit(lim.admit("k", KeyLimits(max_concurrency=1), "m"))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.02, "20ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3725, "1h2m5s")],
)
def test_reset_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert reset_text(seconds) == text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rpm": -1}, "rpm"),
        ({"tpm": 0}, "tpm"),
        ({"daily_tokens": 1.5}, "daily_tokens"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"allowed_models": "m"}, "allowed_models"),
        ({"allowed_models": [1]}, "allowed_models"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": "2027-01-01T00:00:00"}, "expires_at"),
        ({"expires_at": 1700000000}, "expires_at"),
        ({"rpn": 5}, "rpn"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(LimitError) as caught:
        parse_changes(body)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_changes_set_and_clear_limits() -> None:
    limits = KeyLimits(rpm=5, tpm=9).with_changes(
        parse_changes({"rpm": None, "allowed_models": ["a"], "expires_at": "2027-01-01T00:00:00Z"})
    )
    assert limits == KeyLimits(
        tpm=9,
        allowed_models=frozenset({"a"}),
        expires_at=datetime(2027, 1, 1, tzinfo=UTC).timestamp(),
    )
    assert format_time(limits.expires_at) == "2027-01-01T00:00:00Z"


async def test_seeded_charges_count_until_they_leave_their_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # What the ledger charged before a restart (Limiter.seed): key "m" 80 tokens 50 s ago and
    # 30 tokens 20 s ago; key "d" 110 tokens today.
    lim = limiter()
    day = int(WALL0 // 86400)
    lim.seed(RecentCharges(day, {"m": 110, "d": 110}, {"m": [(50.0, 80), (20.0, 30)]}))
    per_minute = KeyLimits(tpm=100, rpm=1)
    over = refused(lim.admit("m", per_minute, "m"))
    assert (over.limit, over.retry_after) == ("tpm", 10)  # the 80 leave the minute in 10 s
    await trio.sleep(10)
    admitted = permit(lim.admit("m", per_minute, "m"))  # the request bucket starts full
    assert headers(admitted)["x-ratelimit-remaining-tokens"] == "70"
    daily = KeyLimits(daily_tokens=200)
    permit(lim.admit("d", daily, "m")).settle(90)  # 110 + 90: the day is spent
    assert refused(lim.admit("d", daily, "m")).limit == "daily_tokens"
