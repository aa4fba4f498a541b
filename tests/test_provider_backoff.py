"""The reconnect schedule: exponential ceilings, full jitter, reset after a stable session."""

from __future__ import annotations

import random

from provider.backoff import GOING_AWAY_JITTER, GOING_AWAY_MIN_UPTIME, Backoff, backoff_ceiling


def test_ceilings_double_from_one_second_to_the_thirty_second_cap() -> None:
    ceilings = [backoff_ceiling(attempt) for attempt in range(8)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff_ceiling(10_000) == 30.0  # no overflow after days of retrying


def test_delays_are_full_jitter_under_each_ceiling() -> None:
    backoff = Backoff(random.Random(7))
    reference = random.Random(7)
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays == [reference.uniform(0, backoff_ceiling(n)) for n in range(8)]
    assert all(0 <= d <= backoff_ceiling(n) for n, d in enumerate(delays))


def test_a_stable_session_resets_the_schedule_and_a_short_one_does_not() -> None:
    backoff = Backoff(random.Random(1))
    for _ in range(5):
        backoff.next_delay()
    backoff.session_ended(uptime=29.9)
    assert backoff.attempt == 5
    backoff.session_ended(uptime=30.0)
    assert backoff.attempt == 0


def test_a_1001_after_a_session_up_a_second_reconnects_within_the_jitter_window() -> None:
    backoff = Backoff(random.Random(3))
    for _ in range(4):
        backoff.next_delay()
    delays = [backoff.going_away(uptime=GOING_AWAY_MIN_UPTIME) for _ in range(50)]
    assert all(0 <= d <= GOING_AWAY_JITTER for d in delays) and backoff.attempt == 0
    backoff.going_away(uptime=0.2)  # a 1001 at once: an ordinary failure
    backoff.going_away(uptime=0.2)
    assert backoff.attempt == 2
