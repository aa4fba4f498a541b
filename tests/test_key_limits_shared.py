"""Per-key limits shared across a cluster, on a virtual clock: `Limiter.shares` says what this
instance spent, `Limiter.elsewhere` hands it the others', and `admit` counts both.

Two limiters stand for two instances; a test copies one's shares into the other (what
daemon/cluster/limits.py does through Redis) and asserts exact virtual times.
"""

from __future__ import annotations

import trio
import trio.testing

from daemon.accounts.limits import SHARE_TTL_S, Limiter, Share
from daemon.accounts.usage import RecentCharges
from daemon.key_policy import KeyLimits
from tests.test_key_limits import WALL0, headers, limiter, permit, refused


def tell(to: Limiter, *instances: Limiter) -> None:
    """What daemon/cluster/limits.py does: every other instance's shares, per key."""
    merged: dict[str, list[Share]] = {}
    for instance in instances:
        for key_id, share in instance.shares(every=True).items():
            if share is not None:
                merged.setdefault(key_id, []).append(share)
    to.elsewhere({k: tuple(v) for k, v in merged.items()})


async def test_a_peers_rpm_debt_refuses_here_and_decays_at_its_refill_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b, limits = limiter(), limiter(), KeyLimits(rpm=60)
    for _ in range(60):
        permit(a.admit("k", limits, "m"))
    tell(b, a)
    over = refused(b.admit("k", limits, "m"))
    assert (over.limit, over.retry_after) == ("rpm", 1)
    assert headers(over)["x-ratelimit-remaining-requests"] == "0"
    assert headers(over)["x-ratelimit-reset-requests"] == "1m0s"
    await trio.sleep(0.999)
    assert refused(b.admit("k", limits, "m")).limit == "rpm"
    await trio.sleep(0.001)  # a's debt fell from 60 to 59 (extrapolated: a published nothing)
    assert headers(permit(b.admit("k", limits, "m")))["x-ratelimit-remaining-requests"] == "0"
    assert refused(b.admit("k", limits, "m")).limit == "rpm"
    await trio.sleep(2)  # a republishes (every second in a cluster): b's debt refills too
    tell(b, a)
    permit(b.admit("k", limits, "m"))
    permit(b.admit("k", limits, "m"))
    assert refused(b.admit("k", limits, "m")).limit == "rpm"


async def test_two_instances_in_debt_refill_the_keys_bucket_at_rpm_per_minute_in_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b, limits = limiter(), limiter(), KeyLimits(rpm=2)
    permit(a.admit("k", limits, "m"))
    permit(b.admit("k", limits, "m"))  # each took one before hearing of the other: debt 2
    for _ in range(29):  # each publishes every second (daemon/cluster/limits.py)
        tell(a, b)
        tell(b, a)
        assert refused(a.admit("k", limits, "m")).limit == "rpm"
        assert refused(b.admit("k", limits, "m")).limit == "rpm"
        await trio.sleep(1)
    # Not twice as fast: after 29 s the key's bucket holds 29/30 of a request, not 1.93.
    tell(a, b)
    assert refused(a.admit("k", limits, "m")).retry_after == 1
    await trio.sleep(1)
    tell(a, b)
    permit(a.admit("k", limits, "m"))
    tell(b, a)
    assert refused(b.admit("k", limits, "m")).retry_after == 30


async def test_a_peers_tokens_of_the_last_minute_count_until_the_minute_slides(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b, limits = limiter(), limiter(), KeyLimits(tpm=100)
    permit(a.admit("k", limits, "m")).settle(60)
    await trio.sleep(10)
    permit(a.admit("k", limits, "m")).settle(40)
    tell(b, a)
    over = refused(b.admit("k", limits, "m"))
    assert (over.limit, over.retry_after) == ("tpm", 50)  # the 60 tokens leave at t=60
    assert headers(over)["x-ratelimit-remaining-tokens"] == "0"
    await trio.sleep(49.999)
    tell(b, a)  # a publishes every second: its minute, in whole seconds
    assert refused(b.admit("k", limits, "m")).retry_after == 1
    await trio.sleep(0.001)
    admitted = permit(b.admit("k", limits, "m"))
    assert headers(admitted)["x-ratelimit-remaining-tokens"] == "60"
    await trio.sleep(10)
    tell(b, a)
    assert headers(permit(b.admit("k", limits, "m")))["x-ratelimit-remaining-tokens"] == "100"


async def test_the_days_tokens_are_the_sum_of_every_instances(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b, c, limits = limiter(), limiter(), limiter(), KeyLimits(daily_tokens=100)
    permit(a.admit("k", limits, "m")).settle(50)
    permit(b.admit("k", limits, "m")).settle(30)
    tell(c, a, b)
    permit(c.admit("k", limits, "m")).settle(20)
    tell(a, b, c)
    over = refused(a.admit("k", limits, "m"))
    assert (over.limit, over.retry_after) == ("daily_tokens", 60)  # WALL0 is 23:59 UTC
    await trio.sleep(60)  # a new UTC day: yesterday's shares count no more
    tell(a, b, c)
    permit(a.admit("k", limits, "m"))


async def test_requests_in_flight_are_the_sum_of_every_instances(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b, limits = limiter(), limiter(), KeyLimits(max_concurrency=2)
    held = permit(a.admit("k", limits, "m"))
    permit(b.admit("k", limits, "m"))
    tell(b, a)
    assert refused(b.admit("k", limits, "m")).limit == "max_concurrency"
    held.settle(0)
    tell(b, a)
    permit(b.admit("k", limits, "m"))


async def test_a_share_older_than_its_ttl_counts_no_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b, limits = limiter(), limiter(), KeyLimits(max_concurrency=1, tpm=10)
    permit(a.admit("k", limits, "m"))  # held on a, whose daemon then dies
    tell(b, a)
    assert refused(b.admit("k", limits, "m")).limit == "max_concurrency"
    await trio.sleep(SHARE_TTL_S - 0.001)
    assert refused(b.admit("k", limits, "m")).limit == "max_concurrency"
    await trio.sleep(0.001)  # a's share is SHARE_TTL_S old: b counts alone
    permit(b.admit("k", limits, "m"))


async def test_an_instance_shares_what_it_spent_since_its_start_never_its_seed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, limits = limiter(), KeyLimits(tpm=1000, daily_tokens=1000)
    a.seed(RecentCharges(int((WALL0) // 86400), {"k": 500}, {"k": [(5.0, 200)]}))
    assert a.shares() == {}  # nothing spent here yet
    permit(a.admit("k", limits, "m")).settle(7)
    (share,) = [s for s in a.shares().values() if s is not None]
    assert (share.minute, share.day_tokens, share.in_flight) == (((WALL0, 7),), 7, 0)
    assert (
        headers(refused(a.admit("k", KeyLimits(tpm=207), "m")))["x-ratelimit-remaining-tokens"]
        == "0"
    )  # locally the seed still counts


async def test_shares_name_only_the_keys_that_changed_and_none_once_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, limits = limiter(), KeyLimits(max_concurrency=5)
    assert a.shares() == {}
    held = permit(a.admit("k", limits, "m"))
    first = a.shares()["k"]
    assert first is not None and first.in_flight == 1
    assert a.shares() == {}  # nothing changed since
    held.settle(0)
    assert a.shares() == {"k": None}  # nothing left to share: peers forget it
