"""The hedging rules on a virtual clock: where the backup starts, and what stops it.

Like `test_dispatch.py`, every test runs `dispatch()` against in-memory providers on the
autojump MockClock and asserts exact virtual times. The deadline is 10 s, so the ratio point
is 5 s (`BACKUP_AT`); the floor is 50 ms. Sample times are binary fractions (0.25, 0.375), so
the sums the clock makes are exact.

First-token times are taught directly (`registry.record_ttft`): to one provider's own window,
or to the fleet's alone through an entry that is not registered. The race's own recording,
of winners and of losers, has tests of its own at the end.
"""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from daemon.nursery.budget import HedgeBudget
from daemon.nursery.hedging import HedgeCounters, learned
from daemon.routing.latency import MAX_AGE_S, TtftWindow, band_of
from daemon.routing.types import ProviderEntry, RequestTraits
from tests.dispatch_harness import (
    BACKUP_AT,
    MODEL,
    TIMING,
    TRAITS,
    World,
    answer_at,
    drain,
    stalls_after,
)
from tests.fakes.entries import make_entry
from tests.fakes.provider import Accept, Wait, answer

TOOLS = RequestTraits(model=MODEL, has_tools=True)
# Eighteen fast answers, then two slower: p95 (the 19th of 20) is 0.375, p90 (the 18th) 0.25.
BODY = [0.25] * 18 + [0.375, 0.5]


def teach(world: World, seconds: list[float], entry: ProviderEntry | None = None) -> None:
    """Record first-token times: on `entry` and the fleet, or on the fleet alone."""
    target = entry if entry is not None else make_entry("gone", [MODEL])
    for value in seconds:
        world.registry.record_ttft(target, TRAITS, value)


def counters(world: World) -> HedgeCounters:
    return world.hedger.counters


# The window, the percentile, the budget ----------------------------------------------------


def test_the_window_keeps_the_newest_samples_and_reads_nearest_rank_quantiles() -> None:
    window = TtftWindow(capacity=4)
    for at, seconds in enumerate([9.0, 1.0, 2.0, 3.0, 4.0]):
        window.add(seconds, now=float(at))
    assert window.count(4.0) == 4  # the 9 s sample, the oldest, made room
    assert [window.quantile(q, 4.0) for q in (0.0, 0.25, 0.5, 0.95, 1.0)] == [1, 1, 2, 4, 4]
    assert window.count(MAX_AGE_S + 1.0) == 3  # the sample recorded at 1 s has expired
    assert window.count(MAX_AGE_S + 4.0) == 0
    assert window.quantile(0.5, MAX_AGE_S + 4.0) is None


def test_prompt_bands_split_at_1k_4k_and_16k_tokens() -> None:
    assert [band_of(n) for n in (0, 1023, 1024, 4095, 4096, 16383, 16384, 10**6)] == [
        0, 0, 1, 1, 2, 2, 3, 3
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("samples", "point"),
    [
        (BODY[:-1], None),  # 19 samples: too few for a 95th percentile
        (BODY, 0.375),
        ([0.25] * 18 + [4.0, 4.0], 0.375),  # a cliff: at most 1.5 times p90
        ([0.25 * k for k in range(1, 21)], 4.75),  # smooth: p95 = 4.75 < 1.5 * p90 = 6.75
    ],
    ids=["too-few", "body", "cliff", "smooth"],
)
def test_the_learned_point_is_the_percentile_bounded_at_a_cliff(
    samples: list[float], point: float | None
) -> None:
    window = TtftWindow(capacity=64)
    for seconds in samples:
        window.add(seconds, now=0.0)
    assert learned(window, 95, now=0.0) == point


def test_the_budget_allows_one_backup_per_twenty_dispatches_in_its_window() -> None:
    budget = HedgeBudget(share=0.05, window_s=60.0)
    for _ in range(19):
        budget.deposit(0.0)
    assert not budget.allows(0.0)
    budget.deposit(0.0)
    assert budget.allows(0.0)
    budget.spend(0.0)
    assert not budget.allows(30.0)
    for _ in range(20):
        budget.deposit(30.0)
    assert budget.allows(30.0)  # 40 dispatches, 1 backup: room for the second
    budget.spend(30.0)
    assert not budget.allows(59.0)
    # At 60 s the counts made at 0 s leave the window: 20 dispatches and 1 backup remain.
    assert (budget.allows(60.0), budget.dispatches, budget.backups) == (False, 20, 1)
    assert (budget.allows(90.0), budget.dispatches, budget.backups) == (False, 0, 0)


# Where the backup starts ---------------------------------------------------------------------


async def test_the_backup_starts_at_the_primarys_own_learned_percentile(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider(stalls_after())
    backup = world.provider(answer_at(0.125, "backup", model="b"))
    teach(world, BODY, primary.entry)
    teach(world, [1.0] * 20, backup.entry)  # the fleet's p95 is 1 s: the primary's own rules

    committed = await world.dispatch()

    assert primary.dispatched == [0.0]
    assert backup.dispatched == [0.375]
    assert primary.cancelled == [0.5]
    assert (committed.provider_id, committed.phases.ttft) == (backup.id, 0.5)
    assert (counters(world).started, counters(world).won) == (1, 1)
    await drain(committed)
    await world.assert_nothing_leaked()


@pytest.mark.parametrize(
    ("samples", "backup_at"),
    [(BODY[:-1], BACKUP_AT), (BODY, 0.375)],
    ids=["19-samples-ratio", "20-samples-learned"],
)
async def test_a_primary_without_samples_uses_the_fleets_point_once_it_has_twenty(
    autojump_clock: MockClock, world: World, samples: list[float], backup_at: float
) -> None:
    primary = world.provider(stalls_after())
    backup = world.provider(answer("backup", model="b"))
    teach(world, samples)

    committed = await world.dispatch()

    assert primary.dispatched == [0.0]
    assert backup.dispatched == [backup_at]
    assert committed.phases.ttft == backup_at
    await drain(committed)
    await world.assert_nothing_leaked()


@pytest.mark.parametrize(
    ("sample", "backup_at"),
    [(0.01, 0.05), (8.0, BACKUP_AT)],
    ids=["floor", "ratio-point"],
)
async def test_the_learned_point_is_clamped_between_the_floor_and_the_ratio_point(
    autojump_clock: MockClock, world: World, sample: float, backup_at: float
) -> None:
    world.provider(stalls_after())
    backup = world.provider(answer("backup", model="b"))
    teach(world, [sample] * 20)

    committed = await world.dispatch()

    assert backup.dispatched == [backup_at]
    await drain(committed)
    await world.assert_nothing_leaked()


async def test_samples_of_a_long_prompt_do_not_move_the_point_of_a_short_one(
    autojump_clock: MockClock, world: World
) -> None:
    world.provider(stalls_after())
    backup = world.provider(answer("backup", model="b"))
    long_prompt = RequestTraits(model=MODEL, prompt_tokens=8000)
    for _ in range(20):
        world.registry.record_ttft(make_entry("gone", [MODEL]), long_prompt, 0.25)

    committed = await world.dispatch()

    assert backup.dispatched == [BACKUP_AT]
    await drain(committed)
    await world.assert_nothing_leaked()


async def test_with_hedging_off_there_is_no_backup_and_the_deadline_fails_over(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery, DINFER_HEDGE_MODE="off")
    primary = world.provider(stalls_after())
    other = world.provider(answer("after the deadline", model="b"))
    teach(world, BODY)

    committed = await world.dispatch()

    assert primary.cancelled == [TIMING.ttft]
    assert other.dispatched == [TIMING.ttft]
    assert (committed.attempts, counters(world).started) == (2, 0)
    await drain(committed)
    await world.assert_nothing_leaked()


async def test_in_fixed_mode_the_backup_starts_at_the_ratio_point_whatever_was_learned(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery, DINFER_HEDGE_MODE="fixed")
    world.provider(stalls_after())
    backup = world.provider(answer("backup", model="b"))
    teach(world, BODY)

    committed = await world.dispatch()

    assert backup.dispatched == [BACKUP_AT]
    await drain(committed)
    await world.assert_nothing_leaked()


# What stops a backup -------------------------------------------------------------------------


async def test_the_budget_stops_backups_until_dispatches_refill_it(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery, DINFER_HEDGE_MODE="fixed", DINFER_HEDGE_BUDGET="0.05")
    instant = answer("fast", model="a")
    late = answer_at(8, "late", model="a")
    primary = world.provider(*[instant] * 19, late, stalls_after(), *[instant] * 17, late)
    backup = world.provider(answer_at(1, "backup", model="b"), answer("failover", model="b"))

    for _ in range(19):  # 19 dispatches: 0.95 of a backup
        await drain(await world.dispatch())
    with_backup = await world.dispatch()  # the 20th: one backup's worth
    assert (with_backup.provider_id, with_backup.phases.ttft) == (backup.id, 6.0)
    await drain(with_backup)

    spent = await world.dispatch()  # 21 dispatches, 1 backup: none now, the deadline fails over
    assert backup.dispatched == [5.0, 16.0]
    assert primary.cancelled == [6.0, 16.0]
    assert (spent.attempts, spent.phases.ttft) == (2, 10.0)
    await drain(spent)
    assert counters(world).skipped_budget == 1

    for _ in range(17):  # 39 races so far (the failover was one more)
        await drain(await world.dispatch())
    refilled = await world.dispatch()  # the 40th: room for a second backup
    assert backup.dispatched == [5.0, 16.0, 21.0]
    assert refilled.provider_id == backup.id
    await drain(refilled)
    assert (counters(world).started, counters(world).won) == (2, 2)
    await world.assert_nothing_leaked()


@pytest.mark.parametrize(("held", "backups"), [(2, [BACKUP_AT]), (3, [])])
async def test_no_backup_starts_with_under_a_quarter_of_the_capable_slots_free(
    autojump_clock: MockClock, world: World, held: int, backups: list[float]
) -> None:
    first = world.provider(answer_at(8, "late", model="a"))
    second = world.provider(answer_at(1, "backup", model="b"))
    leases = [
        world.registry.reserve(TRAITS, exclude=frozenset({fake.id}))
        for fake in (first, second)
        for _ in range(held)
    ]

    committed = await world.dispatch()  # takes one more of the 8 slots: 3 or 1 stay free

    assert sorted(first.dispatched + second.dispatched) == [0.0, *backups]
    assert committed.phases.ttft == (6.0 if backups else 8.0)
    assert counters(world).skipped_overload == (0 if backups else 1)
    await drain(committed)
    for lease in leases:
        assert lease is not None
        world.registry.release(lease)
    await world.assert_nothing_leaked()


async def test_no_backup_starts_while_a_request_waits_in_the_models_queue(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery)
    await nursery.start(world.queue.run)
    primary = world.provider(answer_at(8, "base"), answer("tools"), max_concurrency=1)
    too_old_for_tools = world.provider(answer("never a backup"), version="0.6.0")

    async def queue_a_tools_request_at_1() -> None:
        await trio.sleep(1)
        await drain(await world.dispatch(traits=TOOLS))

    async with trio.open_nursery() as requests:
        requests.start_soon(queue_a_tools_request_at_1)
        committed = await world.dispatch()
        assert world.queue.waiting(MODEL) == 1
        await drain(committed)

    assert committed.phases.ttft == 8.0
    assert primary.dispatched == [0.0, 8.0]
    assert too_old_for_tools.dispatched == []
    assert counters(world).skipped_overload == 1
    await world.assert_nothing_leaked()


# What the race records -----------------------------------------------------------------------


def recorded(entry: ProviderEntry) -> list[float]:
    """The first-token times `entry` holds for requests like TRAITS, fastest first."""
    return _samples(entry.ttft.get(TRAITS.latency_key))


def _samples(window: TtftWindow | None) -> list[float]:
    return [] if window is None else window.samples(trio.current_time())


async def test_the_winner_and_a_loser_past_the_hedge_point_are_recorded(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider(stalls_after())
    backup = world.provider(answer_at(1, "backup", model="b"))

    await drain(await world.dispatch())

    assert recorded(backup.entry) == [1.0]  # from its own start at 5 s
    assert recorded(primary.entry) == [6.0]  # at least 6 s: it had run that long when it lost
    assert _samples(world.registry.ttft.get(TRAITS.latency_key)) == [1.0, 6.0]
    await world.assert_nothing_leaked()


async def test_a_backup_that_lost_before_running_the_hedge_delay_is_not_recorded(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider(answer_at(7, "primary", model="a"))
    backup = world.provider(stalls_after())

    await drain(await world.dispatch())

    assert recorded(primary.entry) == [7.0]
    assert recorded(backup.entry) == []  # 2 s says nothing about a 5 s point
    await world.assert_nothing_leaked()


async def test_a_model_load_is_not_a_first_token_time(
    autojump_clock: MockClock, world: World
) -> None:
    loading = world.provider([Wait(1), Accept(), *answer_at(30, "loaded")])

    await drain(await world.dispatch())

    assert recorded(loading.entry) == []
    await world.assert_nothing_leaked()
