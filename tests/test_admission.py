"""The admission queue on a virtual clock: who waits, for how long, and who is served first."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from daemon.config import load_settings
from daemon.nursery.supervisor import _wake_on_cooldown_expiry, build_registry
from daemon.routing.admission import (
    AdmissionQueue,
    QueueFull,
    QueueTimeout,
    Refusal,
    Unavailable,
    UnknownModel,
)
from daemon.routing.registry import Registry
from daemon.routing.types import Lease, ProviderEntry, RequestTraits
from tests.fakes.entries import make_entry

BASE = RequestTraits(model="m")
TOOLS = RequestTraits(model="m", has_tools=True)


@dataclass
class Queueing:
    registry: Registry
    queue: AdmissionQueue
    nursery: trio.Nursery


@asynccontextmanager
async def queueing(**env: str) -> AsyncIterator[Queueing]:
    """A registry and its admission queue, with the supervisor's pump and cooldown timer."""
    settings = load_settings(env)
    registry = build_registry(settings, seed=1)
    queue = AdmissionQueue(
        registry, max_per_model=settings.queue_max, timeout=settings.queue_timeout_s
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        await nursery.start(_wake_on_cooldown_expiry, registry)
        yield Queueing(registry, queue, nursery)
        nursery.cancel_scope.cancel()
    assert queue.waiting("m") == 0


@dataclass
class Outcome:
    """How one queued request ended, and when."""

    name: str
    at: float
    lease: Lease | None = None
    error: Refusal | None = None
    cancelled: bool = False


class Requests:
    """Consumer requests, each admitted in a task of its own, recording how it ended."""

    def __init__(self, q: Queueing) -> None:
        self._q = q
        self.outcomes: list[Outcome] = []

    async def arrive(self, name: str, traits: RequestTraits = BASE) -> trio.CancelScope:
        """Start a request; return once it waits in the queue (or ended)."""
        scope = trio.CancelScope()
        self._q.nursery.start_soon(self._admit, name, traits, scope)
        await trio.testing.wait_all_tasks_blocked()
        return scope

    async def _admit(self, name: str, traits: RequestTraits, scope: trio.CancelScope) -> None:
        outcome = Outcome(name, at=-1.0, cancelled=True)
        with scope:
            admitted = await self._q.queue.admit(traits)
            if isinstance(admitted, Lease):
                outcome.lease = admitted
            else:
                outcome.error = admitted
            outcome.cancelled = False
        outcome.at = trio.current_time()
        self.outcomes.append(outcome)

    def ended(self) -> list[tuple[str, float]]:
        return [(o.name, o.at) for o in self.outcomes]

    def of(self, name: str) -> Outcome:
        (outcome,) = (o for o in self.outcomes if o.name == name)
        return outcome

    def lease(self, name: str) -> Lease:
        lease = self.of(name).lease
        assert lease is not None, f"{name} got no lease"
        return lease


def add_busy(registry: Registry, provider_id: str = "p1", **fields: Any) -> Lease:
    """Register a one-slot provider and take its slot; return the lease that holds it."""
    entry = make_entry(provider_id, max_concurrency=1, **fields)
    registry.add(entry)
    lease = registry.reserve(BASE, exclude=_others(registry, entry))
    assert lease is not None and lease.entry is entry
    return lease


def _others(registry: Registry, entry: ProviderEntry) -> frozenset[str]:
    return frozenset(e.provider_id for e in registry.providers() if e is not entry)


# Immediate answers ------------------------------------------------------------------------


async def test_a_free_provider_is_leased_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with queueing() as q:
        q.registry.add(make_entry("p1"))
        lease = await q.queue.admit(BASE)
        assert lease.entry.provider_id == "p1"
        assert lease.entry.in_flight == 1
        assert trio.current_time() == 0


async def test_an_unknown_model_is_404_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with queueing() as q:
        q.registry.add(make_entry("p1"))
        refused = await q.queue.admit(RequestTraits(model="nope"))
        assert isinstance(refused, UnknownModel)
        assert refused.message == 'the model "nope" does not exist'
        assert refused.status == 404
        assert trio.current_time() == 0


async def test_no_capable_provider_is_503_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with queueing() as q:
        q.registry.add(make_entry("p1", version="0.6.0"))
        refused = await q.queue.admit(TOOLS)
        assert isinstance(refused, Unavailable)
        assert "too old for tools" in refused.message
        assert refused.status == 503
        assert refused.retry_after == 30
        assert trio.current_time() == 0


# Waiting ----------------------------------------------------------------------------------


async def test_times_out_at_exactly_the_queue_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with queueing() as q:
        add_busy(q.registry)
        refused = await q.queue.admit(BASE)
        assert isinstance(refused, QueueTimeout)
        assert trio.current_time() == 120  # DINFER_QUEUE_TIMEOUT_S default
        assert refused.status == 429
        assert refused.retry_after == 30
        assert refused.message == 'no provider of model "m" became free within 120 s'
        assert q.queue.waiting("m") == 0


async def test_a_full_queue_refuses_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with queueing(DINFER_QUEUE_MAX="2", DINFER_QUEUE_TIMEOUT_S="40") as q:
        add_busy(q.registry)
        requests = Requests(q)
        await requests.arrive("first")
        await requests.arrive("second")
        refused = await q.queue.admit(BASE)
        assert isinstance(refused, QueueFull)
        assert trio.current_time() == 0
        assert refused.status == 429
        assert refused.retry_after == 10
        assert refused.message == 'the queue for model "m" is full (2 waiting)'
        assert q.queue.waiting("m") == 2
        await trio.sleep(40)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(requests.ended()) == [("first", 40), ("second", 40)]
        assert all(isinstance(o.error, QueueTimeout) for o in requests.outcomes)


async def test_freed_slots_are_granted_in_arrival_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with queueing() as q:
        held = add_busy(q.registry)
        requests = Requests(q)
        for name in ("first", "second", "third"):
            await requests.arrive(name)
        for t in (1, 2, 3):
            await trio.sleep_until(t)
            q.registry.release(held)
            await trio.testing.wait_all_tasks_blocked()
            held = requests.lease(requests.outcomes[-1].name)
        assert requests.ended() == [("first", 1), ("second", 2), ("third", 3)]
        assert held.entry.in_flight == 1


# Wake-ups ---------------------------------------------------------------------------------


async def test_wakes_when_a_slot_is_released(autojump_clock: trio.testing.MockClock) -> None:
    async with queueing() as q:
        held = add_busy(q.registry)
        requests = Requests(q)
        await requests.arrive("waiter")
        await trio.sleep(5)
        q.registry.release(held)
        await trio.testing.wait_all_tasks_blocked()
        assert requests.ended() == [("waiter", 5)]
        assert requests.lease("waiter").entry.provider_id == "p1"


async def test_wakes_when_a_provider_registers(autojump_clock: trio.testing.MockClock) -> None:
    async with queueing() as q:
        gone = make_entry("p1")
        q.registry.add(gone)
        q.registry.remove(gone)  # the model stays known: its providers may reconnect
        requests = Requests(q)
        await requests.arrive("waiter")
        await trio.sleep(7)
        q.registry.add(make_entry("p2"))
        await trio.testing.wait_all_tasks_blocked()
        assert requests.ended() == [("waiter", 7)]
        assert requests.lease("waiter").entry.provider_id == "p2"


async def test_wakes_when_a_new_provider_passes_its_first_challenge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with queueing() as q:
        newcomer = make_entry("p1", trusted=False, last_challenge_pass=None)
        q.registry.add(newcomer)
        requests = Requests(q)
        await requests.arrive("waiter")
        assert q.queue.waiting("m") == 1
        await trio.sleep(3)
        q.registry.challenge_passed(newcomer)
        await trio.testing.wait_all_tasks_blocked()
        assert requests.ended() == [("waiter", 3)]
        assert requests.lease("waiter").entry.provider_id == "p1"


async def test_a_waiter_fails_when_the_new_provider_fails_its_first_challenge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with queueing() as q:
        newcomer = make_entry("p1", trusted=False, last_challenge_pass=None)
        q.registry.add(newcomer)
        requests = Requests(q)
        await requests.arrive("waiter")
        await trio.sleep(30)  # DINFER_CHALLENGE_ANSWER_S: the answer never came
        q.registry.challenge_failed(newcomer)
        await trio.testing.wait_all_tasks_blocked()
        assert requests.ended() == [("waiter", 30)]
        assert isinstance(requests.of("waiter").error, Unavailable)


async def test_wakes_when_a_cooldown_expires(autojump_clock: trio.testing.MockClock) -> None:
    async with queueing(DINFER_BREAKER_COOLDOWN_S="50") as q:
        add_busy(q.registry, "busy")
        sick = make_entry("sick")
        q.registry.add(sick)
        await trio.sleep(4)
        for _ in range(2):  # DINFER_BREAKER_THRESHOLD default
            q.registry.record_failure(sick, "m", "base", 500)
        requests = Requests(q)
        await requests.arrive("waiter")
        assert q.queue.waiting("m") == 1
        await trio.sleep(60)
        assert requests.ended() == [("waiter", 54)]
        assert requests.lease("waiter").entry is sick


async def test_a_waiter_that_cannot_use_the_freed_provider_does_not_block_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with queueing() as q:
        old = add_busy(q.registry, "old", version="0.6.0")
        new = add_busy(q.registry, "new", version="0.7.0")
        requests = Requests(q)
        await requests.arrive("tools", TOOLS)
        await requests.arrive("plain", BASE)
        await trio.sleep(2)
        q.registry.release(old)
        await trio.testing.wait_all_tasks_blocked()
        assert requests.ended() == [("plain", 2)]
        await trio.sleep(2)
        q.registry.release(new)
        await trio.testing.wait_all_tasks_blocked()
        assert requests.ended() == [("plain", 2), ("tools", 4)]
        assert requests.lease("tools").entry.provider_id == "new"


async def test_a_newcomer_takes_a_free_provider_the_waiters_cannot_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with queueing() as q:
        q.registry.add(make_entry("old", version="0.6.0"))
        add_busy(q.registry, "new", version="0.7.0")
        requests = Requests(q)
        await requests.arrive("tools", TOOLS)
        await trio.sleep(1)
        await requests.arrive("plain", BASE)
        assert requests.ended() == [("plain", 1)]
        assert requests.lease("plain").entry.provider_id == "old"
        assert q.queue.waiting("m") == 1


# Clients that go away ---------------------------------------------------------------------


async def test_a_cancelled_waiter_leaves_the_queue_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with queueing() as q:
        held = add_busy(q.registry)
        requests = Requests(q)
        gone = await requests.arrive("gone")
        await requests.arrive("stays")
        assert q.queue.waiting("m") == 2
        await trio.sleep(3)
        gone.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert q.queue.waiting("m") == 1
        assert requests.of("gone").cancelled and requests.of("gone").at == 3
        q.registry.release(held)
        await trio.testing.wait_all_tasks_blocked()
        assert requests.ended() == [("gone", 3), ("stays", 3)]


async def test_a_lease_granted_as_the_client_leaves_goes_to_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with queueing() as q:
        held = add_busy(q.registry)
        requests = Requests(q)
        gone = await requests.arrive("gone")
        await trio.sleep(3)
        # In one step: the client goes away as its slot frees, and a newcomer's admit() hands
        # the slot to the leaving waiter before that waiter's task can run.
        gone.cancel()
        q.registry.release(held)
        lease = await q.queue.admit(BASE)
        assert trio.current_time() == 3
        assert requests.of("gone").cancelled
        assert lease.entry.in_flight == 1
        assert q.queue.waiting("m") == 0


# Losing every capable provider ------------------------------------------------------------


def _drain(registry: Registry, entry: ProviderEntry) -> None:
    registry.set_draining(entry, True)


def _untrust(registry: Registry, entry: ProviderEntry) -> None:
    for _ in range(3):
        registry.challenge_failed(entry)


def _ban(registry: Registry, entry: ProviderEntry) -> None:
    registry.ban(entry, "provider returned invalid encrypted chunk")


def _cool_down(registry: Registry, entry: ProviderEntry) -> None:
    for _ in range(2):
        registry.record_failure(entry, "m", "base", 502)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_drain, 'every provider of model "m" is draining'),
        (_untrust, 'every provider of model "m" is untrusted'),
        (_ban, 'every provider of model "m" is untrusted'),
        (_cool_down, 'every provider of model "m" is cooling down after errors'),
    ],
    ids=["draining", "untrusted", "banned", "cooling-down"],
)
async def test_a_waiter_fails_when_its_model_loses_every_capable_provider(
    autojump_clock: trio.testing.MockClock,
    change: Callable[[Registry, ProviderEntry], None],
    reason: str,
) -> None:
    async with queueing() as q:
        held = add_busy(q.registry)
        requests = Requests(q)
        await requests.arrive("waiter")
        await trio.sleep(6)
        change(q.registry, held.entry)
        await trio.testing.wait_all_tasks_blocked()
        assert requests.ended() == [("waiter", 6)]
        error = requests.of("waiter").error
        assert isinstance(error, Unavailable)
        assert str(error) == reason
        assert error.status == 503
        assert q.queue.waiting("m") == 0


async def test_a_waiter_keeps_waiting_when_its_providers_disconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Providers restart and reconnect: their model's requests wait for them, not fail."""
    async with queueing() as q:
        held = add_busy(q.registry)
        requests = Requests(q)
        await requests.arrive("waiter")
        await trio.sleep(6)
        q.registry.remove(held.entry)
        await trio.testing.wait_all_tasks_blocked()
        assert q.queue.waiting("m") == 1
        await trio.sleep(4)
        q.registry.add(make_entry("p1"))
        await trio.testing.wait_all_tasks_blocked()
        assert requests.ended() == [("waiter", 10)]
