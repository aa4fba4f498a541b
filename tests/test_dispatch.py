"""The dispatch rules on a virtual clock: hedging, deadlines, failover, commit, cancellation.

Every test runs `dispatch()` against in-memory providers (`tests.fakes.memory_session`)
registered in a real `Registry`, on pytest-trio's autojump MockClock (which starts at 0), and
asserts exact virtual times: when each provider got the request, when it got `cancel`, when
the consumer got its first chunk or its error. The TTFT deadline is 10 s, so the backup goes
out at 5 s, the preamble extension ends at 100 s and `inference_accepted` allows until 600 s
after it.

Providers are ranked by advertised decode speed, each added one twice as slow as the one
before, so the first provider added is always the primary and the next free one the backup.
Every test ends by checking that no slot leaked and no provider is left generating.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from daemon.nursery.dispatch import Finished, InBandError
from daemon.nursery.race import Timing
from protocol.messages import Usage
from tests.dispatch_harness import (
    BACKUP_AT,
    ENVELOPE,
    ERROR_EVENT,
    MODEL,
    TIMING,
    TRAITS,
    World,
    answer_at,
    drain,
    stalls_after,
)
from tests.fakes.provider import (
    Accept,
    Chunk,
    Complete,
    Drop,
    Fail,
    Plaintext,
    Script,
    Stall,
    Step,
    Wait,
    answer,
    content_chunk,
    role_chunk,
)

# Hedging ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("ttft", "ratio"), [(10.0, 0.5), (8.0, 0.25), (30.0, 0.5)])
async def test_backup_is_sent_at_exactly_the_speculative_fraction_of_the_deadline(
    autojump_clock: MockClock, world: World, ttft: float, ratio: float
) -> None:
    primary = world.provider(stalls_after())
    backup = world.provider(answer("from the backup", model="b"))
    timing = Timing(ttft=ttft, speculative_ratio=ratio, preamble=90.0, inference=600.0)

    committed = await world.dispatch(timing=timing)

    assert primary.dispatched == [0.0]
    assert backup.dispatched == [ttft * ratio]
    assert committed.provider_id == backup.id
    assert committed.phases.ttft == ttft * ratio
    assert primary.cancelled == [ttft * ratio]
    assert (await drain(committed)).text == "from the backup"
    await world.assert_nothing_leaked()


async def test_each_racer_gets_the_same_request_sealed_under_its_own_key(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider(stalls_after())
    backup = world.provider(answer("hi"))

    await drain(await world.dispatch())

    (first,), (second,) = primary.session.requests, backup.session.requests
    assert first.envelope == second.envelope == ENVELOPE
    assert first.ephemeral_key != second.ephemeral_key
    await world.assert_nothing_leaked()


async def test_no_backup_is_started_when_no_other_provider_is_free(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider(answer_at(8, "late but alone", model="a"))
    busy = world.provider(answer("never asked", model="b"), max_concurrency=1)
    lease = world.registry.reserve(TRAITS, exclude=frozenset({primary.id}))
    assert lease is not None and lease.entry is busy.entry

    committed = await world.dispatch()
    drained = await drain(committed)

    assert committed.provider_id == primary.id
    assert committed.phases.ttft == 8.0
    assert drained.text == "late but alone"
    assert busy.dispatched == []
    world.registry.release(lease)
    await world.assert_nothing_leaked()


async def test_the_first_attempt_waits_in_the_queue_for_a_slot(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery)
    await nursery.start(world.queue.run)
    busy = world.provider(answer("queued"), max_concurrency=1)
    lease = world.registry.reserve(TRAITS)
    assert lease is not None

    async def free_the_slot_at_3() -> None:
        await trio.sleep_until(3.0)
        world.registry.release(lease)

    nursery.start_soon(free_the_slot_at_3)
    committed = await world.dispatch()

    assert busy.dispatched == [3.0]
    assert (committed.phases.queue, committed.phases.ttft) == (3.0, 3.0)
    assert (await drain(committed)).text == "queued"
    await world.assert_nothing_leaked()


async def test_a_retry_never_waits_in_the_queue(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery)
    await nursery.start(world.queue.run)
    failing = world.provider([Fail(500, "backend crashed")])
    busy = world.provider(answer("never"), max_concurrency=1)
    lease = world.registry.reserve(TRAITS, exclude=frozenset({failing.id}))
    assert lease is not None and lease.entry is busy.entry

    failed = await world.fails()

    assert trio.current_time() == 0.0
    assert (failed.status, busy.dispatched) == (
        502,
        [],
    )  # a provider 500 reaches the consumer as 502
    assert "gave up after 1 attempt " in failed.message
    world.registry.release(lease)
    await world.assert_nothing_leaked()


# Race outcomes ----------------------------------------------------------------------------


async def test_primary_wins_before_the_backup_point_and_no_backup_is_sent(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider(answer_at(2, "primary", model="a"))
    backup = world.provider(answer("backup", model="b"))

    committed = await world.dispatch()
    drained = await drain(committed)
    await trio.sleep(TIMING.ttft)  # well past the point where a backup would have gone out

    assert committed.provider_id == primary.id
    assert committed.phases.ttft == 2.0
    assert drained.text == "primary"
    assert drained.ended_at == 2.0
    assert "data: [DONE]" not in drained.lines  # the API writes the one [DONE] itself
    assert backup.dispatched == []
    assert primary.cancelled == []  # it ended with inference_complete: nothing to cancel
    assert primary.session.requests[0].finished_at == 2.0
    await world.assert_nothing_leaked()


async def test_primary_wins_after_the_backup_started_and_the_backup_is_cancelled(
    autojump_clock: MockClock,
    world: World,
) -> None:
    primary = world.provider(answer_at(7, "primary", model="a"))
    backup = world.provider(answer_at(3, "backup", model="b"))

    committed = await world.dispatch()
    drained = await drain(committed)

    assert backup.dispatched == [BACKUP_AT]
    assert committed.provider_id == primary.id
    assert committed.phases.ttft == 7.0
    assert backup.cancelled == [7.0]
    assert drained.models == {"a"}
    await world.assert_nothing_leaked()


async def test_backup_wins_and_the_primary_is_cancelled_with_its_slot_freed(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider(stalls_after(Wait(1), role_chunk("a")))
    backup = world.provider(answer_at(1, "backup", model="b"))

    committed = await world.dispatch()

    assert committed.provider_id == backup.id
    assert committed.phases.ttft == 6.0
    assert primary.cancelled == [6.0]
    assert primary.entry.in_flight == 0  # freed at once, not when the consumer is done
    drained = await drain(committed)
    assert drained.models == {"b"}  # the primary's held role chunk never reaches the consumer
    assert drained.text == "backup"
    await world.assert_nothing_leaked()


async def test_primary_errors_and_the_backup_wins(autojump_clock: MockClock, world: World) -> None:
    primary = world.provider([Wait(6), Fail(500)])
    backup = world.provider(answer_at(2, "backup", model="b"))

    committed = await world.dispatch()
    drained = await drain(committed)

    assert committed.provider_id == backup.id
    assert committed.phases.ttft == 7.0
    assert committed.attempts == 1
    assert primary.cancelled == []  # its own error ended it
    assert primary.session.requests[0].finished_at == 6.0
    assert drained.text == "backup"
    await world.assert_nothing_leaked()


async def test_a_failing_backup_does_not_cancel_the_primary(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider(answer_at(8, "primary", model="a"))
    backup = world.provider([Wait(1), Fail(500)])

    committed = await world.dispatch()
    drained = await drain(committed)

    assert backup.session.requests[0].finished_at == 6.0
    assert committed.provider_id == primary.id
    assert committed.phases.ttft == 8.0  # after the backup's error, by the primary's deadline
    assert committed.attempts == 1
    assert primary.cancelled == []
    assert drained.text == "primary"
    await world.assert_nothing_leaked()


async def test_when_both_racers_fail_the_next_attempt_starts_on_a_third_provider(
    autojump_clock: MockClock,
    world: World,
) -> None:
    primary = world.provider([Wait(6), Fail(500)])
    backup = world.provider([Wait(2), Fail(502)])
    third = world.provider(answer("third", model="c"))

    committed = await world.dispatch()
    drained = await drain(committed)

    assert primary.dispatched == [0.0]
    assert backup.dispatched == [BACKUP_AT]
    assert third.dispatched == [7.0]
    assert committed.provider_id == third.id
    assert committed.attempts == 2
    assert committed.phases.route == 7.0
    assert committed.phases.ttft == 7.0
    assert drained.models == {"c"}
    await world.assert_nothing_leaked()


async def test_a_retry_hedges_at_half_the_deadline_from_its_own_start(
    autojump_clock: MockClock, world: World
) -> None:
    first = world.provider([Wait(3), Fail(500)])
    second = world.provider(stalls_after())
    third = world.provider(answer("third", model="c"))

    committed = await world.dispatch()

    assert first.dispatched == [0.0]
    assert second.dispatched == [3.0]  # at once: nobody is left in the first attempt
    assert third.dispatched == [3.0 + BACKUP_AT]
    assert second.cancelled == [8.0]
    assert committed.provider_id == third.id
    assert (await drain(committed)).models == {"c"}
    await world.assert_nothing_leaked()


async def test_inference_accepted_wins_and_no_backup_is_sent(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider([Wait(1), Accept(), *answer_at(299, "loaded", model="a")])
    backup = world.provider(answer("backup", model="b"))

    committed = await world.dispatch()
    drained = await drain(committed)

    assert committed.provider_id == primary.id
    assert committed.phases.ttft == 300.0
    assert backup.dispatched == []
    assert drained.text == "loaded"
    await world.assert_nothing_leaked()


async def test_a_backup_that_accepts_wins_and_cancels_the_primary(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider(stalls_after())
    backup = world.provider([Wait(1), Accept(), *answer_at(100, "loaded", model="b")])

    committed = await world.dispatch()

    assert primary.cancelled == [6.0]
    assert committed.provider_id == backup.id
    assert committed.phases.ttft == 106.0
    assert (await drain(committed)).text == "loaded"
    await world.assert_nothing_leaked()


async def test_inference_accepted_allows_600_s_for_first_content_then_fails_over(
    autojump_clock: MockClock,
    world: World,
) -> None:
    loading = world.provider(stalls_after(Wait(1), Accept()))
    other = world.provider(answer("other", model="b"))

    committed = await world.dispatch()

    assert loading.cancelled == [601.0]
    assert other.dispatched == [601.0]  # no backup at 5 s: the accepted racer had won
    assert committed.provider_id == other.id
    assert committed.attempts == 2
    assert (await drain(committed)).text == "other"
    await world.assert_nothing_leaked()


# Deadlines --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "fails_at", "message"),
    [
        (stalls_after(), 10.0, "no first token in time"),
        (stalls_after(Wait(1), role_chunk()), 100.0, "no content after its preamble"),
        (stalls_after(Wait(9), role_chunk()), 100.0, "no content after its preamble"),
    ],
    ids=["silent", "preamble-early", "preamble-late"],
)
async def test_the_deadline_is_extended_once_for_a_racer_holding_a_preamble(
    autojump_clock: MockClock, nursery: trio.Nursery, script: Script, fails_at: float, message: str
) -> None:
    world = World(nursery, DINFER_BREAKER_THRESHOLD="1")
    alone = world.provider(script)

    failed = await world.fails(max_attempts=1)

    assert trio.current_time() == fails_at
    assert alone.cancelled == [fails_at]
    assert failed.status == 504
    assert message in failed.message
    assert world.cooling(alone)  # a timeout is a 504 for the breaker
    await world.assert_nothing_leaked()


async def test_content_after_a_preamble_within_the_extension_commits(
    autojump_clock: MockClock, world: World
) -> None:
    alone = world.provider([Wait(1), role_chunk(), Wait(98), content_chunk("late"), Complete()])

    committed = await world.dispatch()
    drained = await drain(committed)

    assert committed.provider_id == alone.id
    assert committed.phases.ttft == 99.0
    assert drained.text == "late"
    await world.assert_nothing_leaked()


async def test_both_racers_holding_a_preamble_fail_at_their_own_extended_deadlines(
    autojump_clock: MockClock,
    world: World,
) -> None:
    primary = world.provider(stalls_after(Wait(1), role_chunk()))
    backup = world.provider(stalls_after(Wait(1), role_chunk()))

    failed = await world.fails()

    assert primary.cancelled == [TIMING.ttft + TIMING.preamble]
    assert backup.cancelled == [BACKUP_AT + TIMING.ttft + TIMING.preamble]
    assert trio.current_time() == 105.0
    assert failed.status == 504
    assert failed.code == "provider_timeout"
    assert "1 attempt " in failed.message
    await world.assert_nothing_leaked()


# Commit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("roles", [1, 8, 9, 40])
async def test_at_most_eight_boilerplate_chunks_are_held_and_the_rest_dropped(
    autojump_clock: MockClock, world: World, roles: int
) -> None:
    preamble = [step for _ in range(roles) for step in (Wait(0.125), role_chunk())]
    alone = world.provider([*preamble, Wait(1), content_chunk("text"), Complete()])

    committed = await world.dispatch()
    drained = await drain(committed)

    assert committed.phases.ttft == roles * 0.125 + 1  # only content commits
    assert drained.lines == [role_chunk().line] * min(roles, 8) + [content_chunk("text").line]
    assert alone.cancelled == []
    await world.assert_nothing_leaked()


async def test_a_provider_sending_only_boilerplate_ends_at_the_deadline_plus_preamble(
    autojump_clock: MockClock, world: World
) -> None:
    # A role chunk every 0.25 s for 200 s: however many come, none re-arms a deadline or
    # commits the request, and the provider's slot is free when the consumer gets the 504.
    flood = [step for _ in range(800) for step in (role_chunk(), Wait(0.25))]
    alone = world.provider(stalls_after(*flood))

    failed = await world.fails(max_attempts=3)

    assert trio.current_time() == TIMING.ttft + TIMING.preamble
    assert alone.cancelled == [TIMING.ttft + TIMING.preamble]
    assert alone.dispatched == [0.0]  # not tried again: a failed provider is excluded
    assert alone.entry.in_flight == 0
    assert failed.status == 504
    assert failed.code == "provider_timeout"
    assert "1 attempt " in failed.message
    await world.assert_nothing_leaked()


@pytest.mark.parametrize(
    "failure",
    [Fail(500), Drop(), ERROR_EVENT, Plaintext()],
    ids=["inference_error", "disconnect", "error-event", "invalid-chunk"],
)
async def test_a_failed_racers_held_chunks_never_reach_the_consumer(
    autojump_clock: MockClock, world: World, failure: Step
) -> None:
    primary = world.provider([Wait(1), role_chunk("a"), role_chunk("a"), Wait(5), failure])
    backup = world.provider([Wait(1), role_chunk("b"), *answer_at(1, "backup", model="b")])

    committed = await world.dispatch()
    drained = await drain(committed)

    assert committed.provider_id == backup.id
    assert committed.phases.ttft == 7.0
    assert drained.models == {"b"}
    assert drained.lines.count(role_chunk("b").line) == 2  # its own held chunk and answer's
    # A provider that said nothing final is told to stop; one that ended is not.
    assert primary.cancelled == ([6.0] if isinstance(failure, Chunk | Plaintext) else [])
    assert primary.entry.trusted is not isinstance(failure, Plaintext)
    await world.assert_nothing_leaked()


async def test_a_provider_whose_session_is_gone_fails_over_at_once(
    autojump_clock: MockClock, world: World
) -> None:
    gone = world.provider(answer("never"))
    gone.session.kick(1001, "going away")
    other = world.provider(answer("other", model="b"))

    committed = await world.dispatch()

    assert committed.provider_id == other.id
    assert other.dispatched == [0.0]
    assert (await drain(committed)).text == "other"
    await world.assert_nothing_leaked()


# Errors that are not retried, retries, the breaker ----------------------------------------


@pytest.mark.parametrize("status", [400, 413, 415, 422])
async def test_a_request_fault_is_returned_without_a_retry(
    autojump_clock: MockClock, world: World, status: int
) -> None:
    faulty = world.provider([Wait(1), Fail(status, "the prompt is too long")])
    other = world.provider(answer("never"))

    failed = await world.fails()

    assert (failed.status, failed.message) == (status, "the prompt is too long")
    assert trio.current_time() == 1.0
    assert faulty.dispatched == [0.0]
    assert other.dispatched == []
    assert not world.cooling(faulty)
    await world.assert_nothing_leaked()


async def test_a_request_fault_from_the_backup_cancels_the_primary(
    autojump_clock: MockClock, world: World
) -> None:
    primary = world.provider(stalls_after())
    backup = world.provider([Wait(1), Fail(422, "bad schema")])
    third = world.provider(answer("never"))

    failed = await world.fails()

    assert failed.status == 422
    assert backup.dispatched == [BACKUP_AT]
    assert primary.cancelled == [6.0]
    assert third.dispatched == []
    await world.assert_nothing_leaked()


@pytest.mark.parametrize(("status", "strikes"), [(503, False), (500, True), (502, True)])
async def test_503_is_retried_elsewhere_and_is_no_breaker_strike(
    autojump_clock: MockClock, world: World, status: int, strikes: bool
) -> None:
    flaky = world.provider([Fail(status)])
    healthy = world.provider(answer("fine", model="b"))

    for _ in range(3):  # the breaker threshold is 2
        committed = await world.dispatch()
        assert committed.provider_id == healthy.id
        assert (await drain(committed)).text == "fine"

    assert world.cooling(flaky) is strikes
    assert len(flaky.dispatched) == (2 if strikes else 3)
    assert len(healthy.dispatched) == 3
    await world.assert_nothing_leaked()


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
async def test_max_attempts_are_respected(
    autojump_clock: MockClock, world: World, max_attempts: int
) -> None:
    fakes = [world.provider([Fail(500)]) for _ in range(4)]

    failed = await world.fails(max_attempts=max_attempts)

    assert [len(f.dispatched) for f in fakes] == [1] * max_attempts + [0] * (4 - max_attempts)
    plural = "attempt" if max_attempts == 1 else "attempts"
    assert f"gave up after {max_attempts} {plural}" in failed.message
    await world.assert_nothing_leaked()


@pytest.mark.parametrize(
    ("last", "status", "code", "retry_after"),
    [
        ([Fail(502, "backend unreachable")], 502, "provider_error", None),
        ([Fail(503, "busy")], 503, "provider_capacity", 5),
        ([Drop()], 502, "provider_error", None),
        (stalls_after(), 504, "provider_timeout", None),
    ],
    ids=["502", "503", "disconnect", "timeout"],
)
async def test_the_exhausted_error_carries_the_last_providers_status(
    autojump_clock: MockClock,
    world: World,
    last: Script,
    status: int,
    code: str,
    retry_after: int | None,
) -> None:
    world.provider([Fail(500, "first")])
    world.provider([Fail(500, "second")])
    world.provider(last)

    failed = await world.fails(max_attempts=3)

    assert (failed.status, failed.code, failed.retry_after) == (status, code, retry_after)
    assert "gave up after 3 attempts" in failed.message
    await world.assert_nothing_leaked()


async def test_a_failed_provider_is_excluded_and_its_version_avoided(
    autojump_clock: MockClock, world: World
) -> None:
    first = world.provider([Fail(500)], version="0.7.0")
    same_version = world.provider(answer("same version", model="b"), version="0.7.0")
    other_version = world.provider([Fail(502)], version="0.8.0")

    committed = await world.dispatch()
    drained = await drain(committed)

    assert first.dispatched == [0.0]  # the fastest, yet never asked again
    assert other_version.dispatched == [0.0]  # attempt 2 steered off version 0.7.0
    # Attempt 3 avoids 0.8.0; only a 0.7.0 provider is left, so the avoidance yields.
    assert committed.provider_id == same_version.id
    assert committed.attempts == 3
    assert drained.text == "same version"
    await world.assert_nothing_leaked()


# After the commit -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (Fail(500, "backend crashed"), "backend crashed"),
        (Drop(), "provider disconnected"),
        (ERROR_EVENT, "out of memory"),
    ],
    ids=["inference_error", "disconnect", "error-event"],
)
async def test_an_error_after_the_commit_is_one_in_band_error_and_a_strike(
    autojump_clock: MockClock, nursery: trio.Nursery, failure: Step, message: str
) -> None:
    world = World(nursery, DINFER_BREAKER_THRESHOLD="1")
    alone = world.provider([Wait(1), content_chunk("partial"), Wait(2), failure, Stall()])

    committed = await world.dispatch()
    drained = await drain(committed)

    assert drained.text == "partial"
    assert drained.error == InBandError("provider_error", message)
    assert drained.ended_at == 3.0
    assert alone.dispatched == [0.0]  # never retried after the commit
    assert world.cooling(alone)
    await world.assert_nothing_leaked()


async def test_inference_complete_records_a_success(
    autojump_clock: MockClock, world: World
) -> None:
    alone = world.provider(answer_at(2, "done"))
    world.registry.record_failure(alone.entry, MODEL, TRAITS.shape, 500)

    committed = await world.dispatch()
    drained = await drain(committed)

    assert drained.error is None
    assert drained.usage == Usage(prompt_tokens=3, completion_tokens=2)
    assert alone.entry.ttft[TRAITS.latency_key].quantile(0.5, trio.current_time()) == 2.0
    # The success cleared the earlier strike: one more failure is not two in a row.
    world.registry.record_failure(alone.entry, MODEL, TRAITS.shape, 500)
    assert not world.cooling(alone)
    await world.assert_nothing_leaked()


async def test_no_chunk_for_the_inference_timeout_after_the_commit_is_an_in_band_timeout(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
) -> None:
    world = World(nursery, DINFER_BREAKER_THRESHOLD="1")
    alone = world.provider(stalls_after(Wait(1), content_chunk("a"), Wait(500), content_chunk("b")))

    committed = await world.dispatch()
    drained = await drain(committed)

    assert drained.text == "ab"
    assert drained.error is not None and drained.error.kind == "timeout"
    assert drained.ended_at == 1101.0  # 600 s after the last chunk, not after the first
    assert alone.cancelled == [1101.0]
    assert world.cooling(alone)
    await world.assert_nothing_leaked()


async def test_boilerplate_after_the_commit_does_not_re_arm_the_silence_limit(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
) -> None:
    # A provider that sends one empty delta every 500 s after its content would otherwise hold
    # the stream (and its slot) open for ever: the limit counts from the last content.
    world = World(nursery)
    keepalive = [step for _ in range(5) for step in (Wait(500), role_chunk())]
    alone = world.provider(stalls_after(Wait(1), content_chunk("a"), *keepalive))

    committed = await world.dispatch()
    drained = await drain(committed)

    assert drained.text == "a"
    assert drained.error is not None and drained.error.kind == "timeout"
    assert drained.ended_at == 601.0  # 600 s after the content, boilerplate or not
    assert alone.cancelled == [601.0]
    await world.assert_nothing_leaked()


# The consumer hangs up --------------------------------------------------------------------


async def test_hanging_up_during_the_race_cancels_every_provider_and_frees_every_slot(
    autojump_clock: MockClock,
    world: World,
) -> None:
    primary = world.provider(stalls_after(Wait(1), role_chunk()))
    backup = world.provider(stalls_after())

    with trio.move_on_at(7.0) as hung_up:
        await world.dispatch()

    assert hung_up.cancelled_caught
    assert primary.cancelled == [7.0]
    assert backup.cancelled == [7.0]
    await world.assert_nothing_leaked()


async def test_hanging_up_after_inference_accepted_cancels_the_claimed_racer(
    autojump_clock: MockClock,
    world: World,
) -> None:
    loading = world.provider(stalls_after(Wait(1), Accept()))

    with trio.move_on_at(3.0) as hung_up:
        await world.dispatch()

    assert hung_up.cancelled_caught
    assert loading.cancelled == [3.0]
    await world.assert_nothing_leaked()


async def test_hanging_up_after_the_commit_cancels_the_winner(
    autojump_clock: MockClock, world: World
) -> None:
    alone = world.provider(stalls_after(Wait(1), content_chunk("a")))

    with trio.move_on_at(4.0) as hung_up:
        committed = await world.dispatch()
        await drain(committed)

    assert hung_up.cancelled_caught
    assert alone.cancelled == [4.0]
    await world.assert_nothing_leaked()


# Whose fault a failure was ------------------------------------------------------------------


async def test_providers_of_one_version_failing_alike_are_struck_and_a_third_is_tried(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery, DINFER_BREAKER_THRESHOLD="1")
    a = world.provider([Fail(500, "segfault")], version="0.6.3")
    b = world.provider([Fail(500, "segfault")], version="0.6.3")
    c = world.provider(answer("third"), version="0.6.3")

    committed = await world.dispatch()
    await drain(committed)

    assert committed.provider_id == c.id and committed.attempts == 3
    assert world.cooling(a) and world.cooling(b) and not world.cooling(c)
    await world.assert_nothing_leaked()


async def test_different_versions_failing_alike_strike_nobody_and_stop_at_two(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery, DINFER_BREAKER_THRESHOLD="1")
    a = world.provider([Fail(502, "reset")], version="0.6.3")
    b = world.provider([Fail(502, "reset")], version="0.7.0")
    c = world.provider(answer("never asked"), version="0.8.0")

    failed = await world.fails()

    assert failed.status == 502 and "the request itself" in failed.message
    assert (a.dispatched, b.dispatched, c.dispatched) == ([0.0], [0.0], [])
    assert not any(world.cooling(fake) for fake in (a, b, c))
    await world.assert_nothing_leaked()


async def test_different_failures_on_two_versions_still_reach_a_third_provider(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery, DINFER_BREAKER_THRESHOLD="1")
    a = world.provider([Fail(500, "crash")], version="0.6.3")
    b = world.provider([Fail(502, "reset")], version="0.7.0")
    c = world.provider(answer("third"), version="0.8.0")

    committed = await world.dispatch()
    await drain(committed)

    assert committed.provider_id == c.id
    assert world.cooling(a) and world.cooling(b)
    await world.assert_nothing_leaked()


async def test_timeouts_on_two_versions_are_not_proof_against_the_request(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery, DINFER_BREAKER_THRESHOLD="1")
    a = world.provider(stalls_after(), version="0.6.3")
    b = world.provider(stalls_after(), version="0.7.0")
    c = world.provider(answer("third"), version="0.8.0")

    committed = await world.dispatch(max_attempts=3)
    await drain(committed)

    assert committed.provider_id == c.id
    assert world.cooling(a) and world.cooling(b)
    await world.assert_nothing_leaked()


async def test_a_deadline_missed_because_the_daemon_was_busy_is_no_strike(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    """A loop too busy to wake the racer on time cannot blame the provider: an overloaded
    daemon (a flood of bad keys, say) must not cool down every provider."""
    world = World(nursery, DINFER_BREAKER_THRESHOLD="1")
    slow = world.provider(stalls_after())

    async def block_the_loop() -> None:
        await trio.sleep(TIMING.ttft - 0.1)
        autojump_clock.jump(2.0)  # the loop was stuck: time passed with nobody scheduled

    nursery.start_soon(block_the_loop)
    failed = await world.fails(max_attempts=1)

    assert failed.status == 503 and "too busy" in failed.message
    assert not world.cooling(slow)
    await world.assert_nothing_leaked()


async def test_the_end_of_a_stream_is_handed_out_again_once_reached(
    autojump_clock: MockClock, world: World
) -> None:
    """A relay cancelled just after it took the terminal (the consumer hung up during the last
    write) asks again for the end, to charge the late usage: it gets the same `Finished` at
    once, not a wait for frames that never come (then an estimate, or a 504 against a
    provider that finished)."""
    world.provider([*answer("hi")[:-1], Complete(11, 7)])
    committed = await world.dispatch()
    while not isinstance(end := await committed.next_event(), Finished):
        assert not isinstance(end, InBandError)
    usage = end.usage
    assert usage.completion_tokens == 7
    started = trio.current_time()
    again = await committed.next_event()
    assert again == Finished(usage) and trio.current_time() == started
    committed.close()
    await world.assert_nothing_leaked()
