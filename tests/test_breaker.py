"""The circuit breaker on exact times: which keys a scheduler must keep requests away from."""

from __future__ import annotations

import pytest

from daemon.routing.breaker import SWEEP_EVERY, BreakerKey, CircuitBreaker, shape_of

THRESHOLD = 3
WINDOW = 60.0
COOLDOWN = 300.0

TOOLS: BreakerKey = ("p1", "m", "tools")
BASE: BreakerKey = ("p1", "m", "base")
VISION: BreakerKey = ("p1", "m", "vision")


def make() -> CircuitBreaker:
    return CircuitBreaker(threshold=THRESHOLD, window=WINDOW, cooldown=COOLDOWN)


def strike(breaker: CircuitBreaker, key: BreakerKey, *times: float) -> list[bool]:
    return [breaker.record_failure(key, 500, t) for t in times]


@pytest.mark.parametrize(
    ("has_tools", "has_media", "shape"),
    [
        (True, True, "tools"),
        (True, False, "tools"),
        (False, True, "vision"),
        (False, False, "base"),
    ],
)
def test_shape_of_prefers_tools_then_media(has_tools: bool, has_media: bool, shape: str) -> None:
    assert shape_of(has_tools, has_media) == shape


def test_threshold_strikes_open_cooldown_until_exact_time() -> None:
    breaker = make()
    assert strike(breaker, TOOLS, 10.0, 20.0, 30.0) == [False, False, True]
    assert breaker.cooldown_until(TOOLS, 30.0) == 30.0 + COOLDOWN
    assert breaker.in_cooldown(TOOLS, 30.0 + COOLDOWN - 0.5)
    # The end is exclusive: at exactly `until` the key is routable again.
    assert not breaker.in_cooldown(TOOLS, 30.0 + COOLDOWN)
    assert breaker.cooldown_until(TOOLS, 30.0 + COOLDOWN) is None


@pytest.mark.parametrize("status", [500, 502, 504])
def test_server_faults_are_strikes(status: int) -> None:
    breaker = make()
    results = [breaker.record_failure(TOOLS, status, t) for t in (0.0, 1.0, 2.0)]
    assert results == [False, False, True]


@pytest.mark.parametrize("status", [503, 400, 413, 415, 422, 429])
def test_capacity_and_request_faults_are_not_strikes(status: int) -> None:
    breaker = make()
    assert not any(breaker.record_failure(TOOLS, status, float(t)) for t in range(10))
    assert not breaker.in_cooldown(TOOLS, 10.0)
    # They leave no half-count behind either: two real strikes are still one short.
    assert strike(breaker, TOOLS, 11.0, 12.0) == [False, False]


def test_strike_exactly_window_old_no_longer_counts() -> None:
    breaker = make()
    strike(breaker, TOOLS, 0.0, 30.0)
    assert strike(breaker, TOOLS, WINDOW) == [False]
    assert not breaker.in_cooldown(TOOLS, WINDOW)


def test_strike_just_inside_window_still_counts() -> None:
    breaker = make()
    strike(breaker, TOOLS, 0.0, 30.0)
    assert strike(breaker, TOOLS, WINDOW - 0.25) == [True]


def test_window_slides_over_older_strikes() -> None:
    breaker = make()
    # 0 and 30 each leave exactly as the next strike lands; 60, 90, 100 fit in one window.
    assert strike(breaker, TOOLS, 0.0, 30.0, 60.0, 90.0) == [False] * 4
    assert strike(breaker, TOOLS, 100.0) == [True]


def test_strike_during_cooldown_extends_it_without_second_transition() -> None:
    breaker = make()
    strike(breaker, TOOLS, 0.0, 1.0, 2.0)
    assert breaker.record_failure(TOOLS, 502, 100.0) is False
    assert breaker.cooldown_until(TOOLS, 100.0) == 100.0 + COOLDOWN
    assert breaker.in_cooldown(TOOLS, 2.0 + COOLDOWN)


def test_non_strike_during_cooldown_does_not_extend_it() -> None:
    breaker = make()
    strike(breaker, TOOLS, 0.0, 1.0, 2.0)
    assert breaker.record_failure(TOOLS, 503, 100.0) is False
    assert breaker.cooldown_until(TOOLS, 100.0) == 2.0 + COOLDOWN


def test_after_cooldown_expiry_strikes_count_from_zero() -> None:
    breaker = make()
    strike(breaker, TOOLS, 0.0, 1.0, 2.0)
    end = 2.0 + COOLDOWN
    # The strikes that opened the breaker are gone: two more are not enough, the third is.
    assert strike(breaker, TOOLS, end, end + 1.0) == [False, False]
    assert not breaker.in_cooldown(TOOLS, end + 1.0)
    assert strike(breaker, TOOLS, end + 2.0) == [True]
    assert breaker.cooldown_until(TOOLS, end + 2.0) == end + 2.0 + COOLDOWN


def test_cooldown_strikes_do_not_carry_over_past_expiry() -> None:
    # A cooldown shorter than the window, so carried-over strikes would still be in it.
    breaker = CircuitBreaker(threshold=THRESHOLD, window=WINDOW, cooldown=10.0)
    strike(breaker, TOOLS, 0.0, 1.0, 2.0)
    assert strike(breaker, TOOLS, 5.0, 6.0) == [False, False]
    assert not breaker.in_cooldown(TOOLS, 16.0)
    assert strike(breaker, TOOLS, 16.0) == [False]


def test_success_clears_only_its_own_shape() -> None:
    breaker = make()
    strike(breaker, TOOLS, 0.0, 1.0, 2.0)
    strike(breaker, VISION, 0.0, 1.0)
    breaker.record_success(BASE, 3.0)
    assert breaker.cooldown_until(TOOLS, 3.0) == 2.0 + COOLDOWN
    # The vision strikes survived too: one more opens that breaker.
    assert strike(breaker, VISION, 4.0) == [True]


def test_success_clears_strikes_and_cooldown() -> None:
    breaker = make()
    strike(breaker, TOOLS, 0.0, 1.0, 2.0)
    strike(breaker, BASE, 0.0, 1.0)
    breaker.record_success(TOOLS, 3.0)
    breaker.record_success(BASE, 3.0)
    assert not breaker.in_cooldown(TOOLS, 3.0)
    assert strike(breaker, BASE, 4.0) == [False]
    assert strike(breaker, TOOLS, 4.0, 5.0) == [False, False]


def test_keys_are_independent_per_provider_and_model() -> None:
    breaker = make()
    others: list[BreakerKey] = [("p2", "m", "tools"), ("p1", "other", "tools"), BASE]
    for key in [TOOLS, *others]:
        assert strike(breaker, key, 0.0, 1.0) == [False, False]
    assert strike(breaker, TOOLS, 2.0) == [True]
    assert not any(breaker.in_cooldown(key, 2.0) for key in others)


def test_forget_provider_starts_it_clean() -> None:
    breaker = make()
    strike(breaker, TOOLS, 0.0, 1.0, 2.0)
    strike(breaker, BASE, 0.0, 1.0)
    other: BreakerKey = ("p2", "m", "tools")
    strike(breaker, other, 0.0, 1.0, 2.0)
    breaker.forget_provider("p1")
    assert breaker.cooldowns("p1", 3.0) == []
    assert strike(breaker, BASE, 3.0) == [False]
    assert breaker.cooldown_until(other, 3.0) == 2.0 + COOLDOWN


def test_cooldowns_lists_live_entries_of_one_provider() -> None:
    breaker = make()
    strike(breaker, VISION, 0.0, 1.0, 2.0)
    strike(breaker, TOOLS, 10.0, 11.0, 12.0)
    strike(breaker, ("p1", "a", "base"), 100.0, 101.0, 102.0)
    strike(breaker, ("p2", "m", "tools"), 0.0, 1.0, 2.0)
    strike(breaker, BASE, 0.0, 1.0)  # strikes, no cooldown
    assert breaker.cooldowns("p1", 200.0) == [
        ("a", "base", 102.0 + COOLDOWN),
        ("m", "tools", 12.0 + COOLDOWN),
        ("m", "vision", 2.0 + COOLDOWN),
    ]
    assert breaker.cooldowns("p1", 2.0 + COOLDOWN) == [
        ("a", "base", 102.0 + COOLDOWN),
        ("m", "tools", 12.0 + COOLDOWN),
    ]
    assert breaker.cooldowns("nobody", 0.0) == []


def test_next_expiry_is_the_earliest_future_cooldown_end() -> None:
    breaker = make()
    assert breaker.next_expiry(0.0) is None
    strike(breaker, TOOLS, 10.0, 11.0, 12.0)
    strike(breaker, ("p2", "m", "base"), 0.0, 1.0, 2.0)
    assert breaker.next_expiry(2.0) == 2.0 + COOLDOWN
    # An end that has been reached is no longer "next": the supervisor would spin on it.
    assert breaker.next_expiry(2.0 + COOLDOWN) == 12.0 + COOLDOWN
    assert breaker.next_expiry(12.0 + COOLDOWN) is None


def test_next_expiry_follows_an_extension() -> None:
    breaker = make()
    strike(breaker, TOOLS, 0.0, 1.0, 2.0)
    strike(breaker, TOOLS, 50.0)
    assert breaker.next_expiry(50.0) == 50.0 + COOLDOWN


def test_sweep_drops_10000_keys_with_old_strikes() -> None:
    breaker = make()
    for i in range(10_000):
        breaker.record_failure((f"p{i}", "m", "base"), 500, 0.0)
    strike(breaker, TOOLS, 0.0, 1.0, 2.0)
    assert breaker.tracked_keys() == 10_001
    breaker.sweep(WINDOW)
    # Only the live cooldown remains; it goes once it has expired.
    assert breaker.tracked_keys() == 1
    breaker.sweep(2.0 + COOLDOWN)
    assert breaker.tracked_keys() == 0


def test_sweep_keeps_strikes_still_inside_the_window() -> None:
    breaker = make()
    strike(breaker, TOOLS, 0.0, 30.0)
    breaker.sweep(WINDOW)
    assert breaker.tracked_keys() == 1
    assert strike(breaker, TOOLS, WINDOW + 1.0, WINDOW + 2.0) == [False, True]


def test_record_calls_sweep_so_memory_stays_bounded() -> None:
    breaker = make()
    peak = 0
    # A fresh key every second for 10,000 seconds: at most 60 are ever live.
    for i in range(10_000):
        breaker.record_failure((f"p{i}", "m", "tools"), 502, float(i))
        peak = max(peak, breaker.tracked_keys())
    assert peak <= SWEEP_EVERY + int(WINDOW)


@pytest.mark.parametrize(("threshold", "window", "cooldown"), [(0, 1.0, 1.0), (1, 0.0, 1.0)])
def test_rejects_non_positive_settings(threshold: int, window: float, cooldown: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        CircuitBreaker(threshold, window, cooldown)


def test_threshold_one_opens_on_first_strike() -> None:
    breaker = CircuitBreaker(threshold=1, window=WINDOW, cooldown=COOLDOWN)
    assert strike(breaker, TOOLS, 5.0) == [True]
    assert strike(breaker, TOOLS, 6.0) == [False]
