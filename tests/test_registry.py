"""Selection and the preflight on a virtual clock: who gets a request, and what a user is told."""

from __future__ import annotations

from collections import Counter

import trio
import trio.testing

from daemon.config import load_settings
from daemon.nursery.supervisor import build_registry
from daemon.routing.registry import Registry
from daemon.routing.types import RequestTraits
from tests.fakes.entries import make_entry

BASE = RequestTraits(model="m")
TOOLS = RequestTraits(model="m", has_tools=True)


def registry(seed: int | None = 1) -> Registry:
    return build_registry(load_settings({}), seed=seed)


def chosen(
    reg: Registry,
    traits: RequestTraits = BASE,
    *,
    exclude: frozenset[str] = frozenset(),
    avoid_version: str | None = None,
) -> str | None:
    """The provider `reserve` picks, with its slot given back at once."""
    lease = reg.reserve(traits, exclude=exclude, avoid_version=avoid_version)
    if lease is None:
        return None
    reg.release(lease)
    return lease.entry.provider_id


# Selection --------------------------------------------------------------------------------


async def test_fastest_advertised_decode_wins(autojump_clock: trio.testing.MockClock) -> None:
    reg = registry()
    reg.add(make_entry("slow", advertised_decode_tps=20.0))
    reg.add(make_entry("fast", advertised_decode_tps=60.0))
    assert chosen(reg) == "fast"


async def test_fastest_advertised_prefill_wins_a_long_prompt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    # 8000 prompt tokens: 16 s of prefill at 500 tps against 2 s at 4000 tps.
    reg.add(make_entry("slow-prefill", advertised_prefill_tps=500.0, advertised_decode_tps=50.0))
    reg.add(make_entry("fast-prefill", advertised_prefill_tps=4000.0, advertised_decode_tps=40.0))
    long_prompt = RequestTraits(model="m", prompt_tokens=8000, max_tokens=64)
    assert chosen(reg, long_prompt) == "fast-prefill"
    short_prompt = RequestTraits(model="m", prompt_tokens=10, max_tokens=512)
    assert chosen(reg, short_prompt) == "slow-prefill"


async def test_observed_speed_replaces_the_advertised_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    boaster = make_entry("boaster", advertised_decode_tps=100.0)
    reg.add(boaster)
    reg.add(make_entry("honest", advertised_decode_tps=50.0))
    assert chosen(reg) == "boaster"
    reg.record_success(boaster, "m", "base", decode_tps=10.0)
    assert chosen(reg) == "honest"


async def test_observed_first_token_times_replace_the_advertised_prefill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    quick = make_entry("quick-prefill", advertised_prefill_tps=4000.0, advertised_decode_tps=50.0)
    steady = make_entry("steady", advertised_prefill_tps=1000.0, advertised_decode_tps=50.0)
    reg.add(quick)
    reg.add(steady)
    long_prompt = RequestTraits(model="m", prompt_tokens=8000, max_tokens=64)
    assert chosen(reg, long_prompt) == "quick-prefill"  # 2 s of prefill against 8 s
    reg.record_ttft(quick, long_prompt, 12.0)  # it was not so quick after all
    assert chosen(reg, long_prompt) == "steady"


async def test_a_median_of_first_token_times_shrugs_off_a_straggler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    usually_fast, steady = make_entry("usually-fast"), make_entry("steady")
    reg.add(usually_fast)
    reg.add(steady)
    for seconds in [0.1] * 4 + [60.0]:
        reg.record_ttft(usually_fast, BASE, seconds)
    for _ in range(5):
        reg.record_ttft(steady, BASE, 4.0)
    assert chosen(reg) == "usually-fast"  # a mean would be 12 s


async def test_speed_is_observed_per_model_and_per_prompt_band(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    a, b = make_entry("a", ["m", "n"]), make_entry("b", ["m", "n"])
    reg.add(a)
    reg.add(b)
    reg.record_ttft(a, BASE, 0.1)
    reg.record_ttft(b, BASE, 3.0)
    reg.record_ttft(a, RequestTraits(model="n"), 3.0)
    reg.record_ttft(b, RequestTraits(model="n"), 0.1)
    reg.record_success(a, "n", "base", decode_tps=5.0)
    assert chosen(reg, BASE) == "a"
    assert chosen(reg, RequestTraits(model="n")) == "b"
    # Nothing observed for long prompts: the advertised (default) figures decide, and a's
    # decode speed on n does not leak into m.
    long_prompt = RequestTraits(model="m", prompt_tokens=8000, max_tokens=64)
    assert a.decode_tps == {"n": 5.0}
    assert {chosen(reg, long_prompt) for _ in range(20)} == {"a", "b"}  # a near tie


async def test_every_twentieth_first_choice_re_measures_a_provider_stale_for_ten_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    slow_once, fast = make_entry("slow-once"), make_entry("fast")
    reg.add(slow_once)
    reg.add(fast)
    reg.record_ttft(slow_once, BASE, 30.0)  # at 0 s

    def first_choices(n: int) -> list[str]:
        picks = []
        for _ in range(n):
            lease = reg.reserve(BASE, explore=True)
            assert lease is not None
            reg.release(lease)
            picks.append(lease.entry.provider_id)
        return picks

    await trio.sleep(9.5)
    reg.record_ttft(fast, BASE, 0.1)
    assert first_choices(20) == ["fast"] * 20  # the 20th explores, but nothing is stale yet
    await trio.sleep(0.5)
    assert first_choices(20) == ["fast"] * 19 + ["slow-once"]  # last measured 10 s ago
    reg.record_ttft(slow_once, BASE, 20.0)  # measured again: fresh, and still slow
    assert first_choices(20) == ["fast"] * 20
    # Backups and retries never explore.
    assert [chosen(reg) for _ in range(40)] == ["fast"] * 40


async def test_in_flight_load_penalises_a_busy_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for seed in range(20):
        reg = registry(seed)
        # One of four slots busy stretches the estimate by 25%: beyond the 10% near tie.
        reg.add(make_entry("busy", in_flight=1, max_concurrency=4))
        reg.add(make_entry("idle"))
        assert chosen(reg) == "idle"


async def test_a_local_provider_with_a_free_slot_wins_over_remote_ones_however_loaded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for seed in range(20):
        reg = registry(seed)
        # Three of four slots taken (some by requests other instances routed here): a remote
        # provider looks idle from here only because this instance cannot see its load.
        local = make_entry("local", in_flight=3, max_concurrency=4)
        reg.add(local)
        reg.add_remote(make_entry("remote-a", owner="other"))
        reg.add_remote(make_entry("remote-b", owner="other", advertised_decode_tps=21.0))
        assert chosen(reg) == "local"
        lease = reg.reserve(BASE)  # its last slot
        assert lease is not None and lease.entry is local
        assert chosen(reg) in {"remote-a", "remote-b"}  # full: a remote one serves


async def test_a_local_provider_wins_over_a_remote_one_that_looks_faster_from_here(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    local = make_entry("local")
    reg.add(local)
    # Never measured here, it is judged by what it advertised: twice as fast.
    reg.add_remote(make_entry("remote", owner="other", advertised_decode_tps=40.0))
    reg.record_ttft(local, BASE, 0.3)  # measured here, under this daemon's own load
    assert [chosen(reg) for _ in range(20)] == ["local"] * 20
    reg.add(make_entry("quick-local", advertised_decode_tps=40.0))  # among local ones, speed
    assert chosen(reg) == "quick-local"  # decides as before


async def test_near_ties_are_broken_at_random_by_the_seed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def draws(seed: int) -> list[str | None]:
        reg = registry(seed)
        reg.add(make_entry("a", advertised_decode_tps=100.0))
        reg.add(make_entry("b", advertised_decode_tps=95.0))  # 5% slower: a near tie
        reg.add(make_entry("c", advertised_decode_tps=80.0))  # 25% slower: never chosen
        return [chosen(reg) for _ in range(200)]

    first = draws(seed=7)
    counts = Counter(first)
    assert set(counts) == {"a", "b"}
    assert min(counts.values()) > 50
    assert draws(seed=7) == first
    assert draws(seed=8) != first


async def test_avoid_version_prefers_another_version(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    reg.add(make_entry("new", version="0.7.1", advertised_decode_tps=100.0))
    reg.add(make_entry("old", version="0.7.0", advertised_decode_tps=20.0))
    assert chosen(reg) == "new"
    assert chosen(reg, avoid_version="0.7.1") == "old"


async def test_avoid_version_is_ignored_when_no_other_version_can_serve(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    reg.add(make_entry("new", version="0.7.1"))
    reg.add(make_entry("old-busy", version="0.7.0", in_flight=1, max_concurrency=1))
    reg.add(make_entry("old-elsewhere", ["other"], version="0.7.0"))
    assert chosen(reg, avoid_version="0.7.1") == "new"


async def test_excluded_providers_are_not_chosen(autojump_clock: trio.testing.MockClock) -> None:
    reg = registry()
    reg.add(make_entry("best", advertised_decode_tps=100.0))
    reg.add(make_entry("second", advertised_decode_tps=20.0))
    assert chosen(reg, exclude=frozenset({"best"})) == "second"
    assert chosen(reg, exclude=frozenset({"best", "second"})) is None


async def test_full_providers_are_skipped(autojump_clock: trio.testing.MockClock) -> None:
    reg = registry()
    reg.add(make_entry("fast-full", advertised_decode_tps=100.0, in_flight=2, max_concurrency=2))
    reg.add(make_entry("slow-free", advertised_decode_tps=20.0, max_concurrency=1))
    lease = reg.reserve(BASE)
    assert lease is not None and lease.entry.provider_id == "slow-free"
    assert reg.reserve(BASE) is None


async def test_reserving_takes_the_slot_and_release_gives_it_back_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    entry = make_entry("only", max_concurrency=2)
    reg.add(entry)
    first, second = reg.reserve(BASE), reg.reserve(BASE)
    assert first is not None and second is not None
    assert entry.in_flight == 2
    assert reg.reserve(BASE) is None
    reg.release(first)
    reg.release(first)
    assert entry.in_flight == 1
    reg.release(second)
    assert entry.in_flight == 0


async def test_ineligible_providers_are_never_chosen(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    reg.add(make_entry("old-but-fast", version="0.6.2", advertised_decode_tps=100.0))
    reg.add(make_entry("current", version="0.6.3", advertised_decode_tps=20.0))
    assert chosen(reg, TOOLS) == "current"
    assert chosen(reg, BASE) == "old-but-fast"


# Preflight --------------------------------------------------------------------------------


async def test_preflight_ready_with_a_free_capable_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    reg.add(make_entry("p1"))
    assert reg.preflight(BASE).verdict == "ready"


async def test_preflight_queues_when_every_capable_provider_is_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    reg.add(make_entry("busy", in_flight=1, max_concurrency=1))
    reg.add(make_entry("free-but-too-old", version="0.6.0"))
    preflight = reg.preflight(TOOLS)
    assert preflight.verdict == "queue"
    assert preflight.reason == 'every provider of model "m" is busy'


async def test_preflight_queues_for_a_model_seen_in_the_last_ten_minutes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    entry = make_entry("p1")
    reg.add(entry)
    await trio.sleep(5)
    reg.remove(entry)
    await trio.sleep(599)
    preflight = reg.preflight(BASE)
    assert preflight.verdict == "queue"
    assert preflight.reason == 'no provider of model "m" is connected right now'
    await trio.sleep(1)
    assert trio.current_time() == 605
    preflight = reg.preflight(BASE)
    assert preflight.verdict == "unknown_model"
    assert preflight.reason == 'the model "m" does not exist'


async def test_preflight_remembers_a_model_dropped_by_a_models_update(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    entry = make_entry("p1", ["m", "retired"])
    reg.add(entry)
    await trio.sleep(100)
    reg.update_models(entry, [entry.models["m"]])
    await trio.sleep(599)
    assert reg.preflight(RequestTraits(model="retired")).verdict == "queue"
    await trio.sleep(1)
    assert reg.preflight(RequestTraits(model="retired")).verdict == "unknown_model"


async def test_preflight_unknown_for_a_never_seen_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    reg.add(make_entry("p1"))
    preflight = reg.preflight(RequestTraits(model="nope"))
    assert preflight.verdict == "unknown_model"
    assert preflight.reason == 'the model "nope" does not exist'


async def test_preflight_unavailable_names_the_one_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    reg.add(make_entry("p1", version="0.6.2"))
    reg.add(make_entry("p2", version="0.5.0"))
    preflight = reg.preflight(TOOLS)
    assert preflight.verdict == "unavailable"
    assert preflight.reason == (
        'every provider of model "m" is too old for tools (needs version >= 0.6.3)'
    )


async def test_preflight_unavailable_counts_each_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    reg.add(make_entry("old", version="0.6.2"))
    cooling = make_entry("cooling")
    reg.add(cooling)
    assert reg.record_failure(cooling, "m", "tools", 502) is False
    assert reg.record_failure(cooling, "m", "tools", 502) is True
    preflight = reg.preflight(TOOLS)
    assert preflight.verdict == "unavailable"
    assert preflight.reason == (
        'no provider of model "m" can serve this request: '
        "1 provider is too old for tools (needs version >= 0.6.3); "
        "1 provider is cooling down after errors"
    )
    # The cooldown is per shape: plain chat still goes to the cooling provider.
    assert reg.preflight(BASE).verdict == "ready"


async def test_preflight_unavailable_when_every_provider_drains(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    reg.add(make_entry("draining", draining=True))
    preflight = reg.preflight(BASE)
    assert preflight.verdict == "unavailable"
    assert preflight.reason == 'every provider of model "m" is draining'


async def test_preflight_queues_while_the_first_challenge_is_outstanding(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A provider that registered a moment ago is routable within seconds: wait for it."""
    reg = registry()
    reg.add(make_entry("new", trusted=False, last_challenge_pass=None))
    preflight = reg.preflight(TOOLS)
    assert preflight.verdict == "queue"
    assert preflight.reason == 'the providers of model "m" are connecting'


async def test_preflight_does_not_wait_for_an_incapable_provider_to_attest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    reg.add(make_entry("new", trusted=False, last_challenge_pass=None, version="0.6.2"))
    preflight = reg.preflight(TOOLS)
    assert preflight.verdict == "unavailable"
    assert preflight.reason == (
        'every provider of model "m" is too old for tools (needs version >= 0.6.3)'
    )


async def test_preflight_does_not_wait_after_a_failed_first_challenge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    entry = make_entry("new", trusted=False, last_challenge_pass=None)
    reg.add(entry)
    reg.challenge_failed(entry)
    preflight = reg.preflight(BASE)
    assert preflight.verdict == "unavailable"
    assert preflight.reason == 'every provider of model "m" is untrusted'


# Membership -------------------------------------------------------------------------------


async def test_a_second_entry_for_a_live_identity_waits_unseen_until_promoted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    live, newcomer = make_entry("p1"), make_entry("p1", ["n"])
    assert reg.add(live) is True
    assert reg.add(newcomer) is False
    assert reg.get("p1") is live and reg.providers() == [live]
    assert reg.connected() == [live, newcomer]
    assert chosen(reg, RequestTraits(model="n")) is None
    assert reg.preflight(RequestTraits(model="n")).verdict == "unknown_model"

    assert reg.promote(newcomer) is live
    assert reg.get("p1") is newcomer and reg.connected() == [newcomer]
    assert chosen(reg, RequestTraits(model="n")) == "p1"
    reg.remove(live)  # the superseded session ending must not take its successor along
    assert reg.providers() == [newcomer]
    assert reg.promote(newcomer) is None  # live already: nothing changes


async def test_a_candidate_that_leaves_is_forgotten_and_never_promoted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = registry()
    live, candidate = make_entry("p1"), make_entry("p1")
    reg.add(live)
    reg.add(candidate)
    reg.remove(candidate)
    assert reg.connected() == [live]
    assert reg.promote(candidate) is None
    assert reg.get("p1") is live
