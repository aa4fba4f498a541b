"""The dispatch test harness: in-memory providers in a real registry, on a virtual clock.

`World` registers `MemorySession` providers and runs `dispatch()`; `drain` reads a committed
answer to its end. The `world` fixture is re-exported by conftest.

A World lifts the hedge budget (`DINFER_HEDGE_BUDGET=1`) unless told otherwise: most tests
dispatch one request, and at the default 5% a lone request may never have a backup.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from daemon.config import load_settings
from daemon.nursery.attempt import Chunk as RelayedChunk
from daemon.nursery.dispatch import Committed, DispatchFailed, Finished, InBandError, Job, dispatch
from daemon.nursery.hedging import HedgePolicy, Hedger
from daemon.nursery.race import Timing
from daemon.nursery.supervisor import build_registry
from daemon.routing.admission import AdmissionQueue
from daemon.routing.types import ProviderEntry, RequestTraits
from protocol.messages import Usage
from tests.fakes.memory_session import MemorySession, in_turn
from tests.fakes.provider import (
    Chunk,
    Script,
    Stall,
    Step,
    Wait,
    answer,
)

MODEL = "m"
TRAITS = RequestTraits(model=MODEL)
TIMING = Timing(ttft=10.0, speculative_ratio=0.5, preamble=90.0, inference=600.0)
BACKUP_AT = 5.0
ENVELOPE = {
    "endpoint": "/v1/chat/completions",
    "body": {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    },
}
ERROR_EVENT = Chunk('data: {"error": {"message": "out of memory"}}')


class Fake:
    """One registered in-memory provider."""

    def __init__(self, session: MemorySession, entry: ProviderEntry) -> None:
        self.session = session
        self.entry = entry

    @property
    def id(self) -> str:
        return self.entry.provider_id

    @property
    def dispatched(self) -> list[float]:
        return self.session.dispatch_times

    @property
    def cancelled(self) -> list[float]:
        return self.session.cancel_times


class World:
    """A registry, an admission queue and the providers of one test."""

    def __init__(self, nursery: trio.Nursery, **env: str) -> None:
        defaults = {"DINFER_CHALLENGE_MAX_AGE_S": "100000", "DINFER_HEDGE_BUDGET": "1"}
        settings = load_settings({**defaults, **env})
        self.registry = build_registry(settings, seed=7)
        self.queue = AdmissionQueue(self.registry, max_per_model=10, timeout=120)
        self.hedger = Hedger(HedgePolicy.from_settings(settings), self.registry, self.queue)
        self.nursery = nursery
        self.fakes: list[Fake] = []

    def provider(self, *scripts: Script, version: str = "0.7.0", max_concurrency: int = 4) -> Fake:
        """A provider playing `scripts` in turn, slower than every provider added before."""
        session = MemorySession(self.nursery, in_turn(*scripts))
        decode_tps = 1000.0 / 2 ** len(self.fakes)
        entry = session.entry(
            version=version, decode_tps=decode_tps, max_concurrency=max_concurrency
        )
        self.registry.add(entry)
        fake = Fake(session, entry)
        self.fakes.append(fake)
        return fake

    async def outcome(
        self, *, max_attempts: int = 3, timing: Timing = TIMING, traits: RequestTraits = TRAITS
    ) -> Committed | DispatchFailed:
        plaintext = json.dumps(ENVELOPE).encode()
        job = Job(traits, plaintext, timing, max_attempts)
        return await dispatch(job, self.registry, self.queue, self.hedger)

    async def dispatch(
        self, *, max_attempts: int = 3, timing: Timing = TIMING, traits: RequestTraits = TRAITS
    ) -> Committed:
        outcome = await self.outcome(max_attempts=max_attempts, timing=timing, traits=traits)
        assert isinstance(outcome, Committed), outcome
        return outcome

    async def fails(self, *, max_attempts: int = 3) -> DispatchFailed:
        outcome = await self.outcome(max_attempts=max_attempts)
        assert isinstance(outcome, DispatchFailed), outcome
        return outcome

    async def assert_nothing_leaked(self) -> None:
        await trio.testing.wait_all_tasks_blocked()
        for fake in self.fakes:
            assert fake.entry.in_flight == 0, f"{fake.id} kept a slot"
            assert fake.session.running == set(), f"{fake.id} was left generating"
            assert fake.session.open_streams == set(), f"{fake.id} has a stream open"

    def cooling(self, fake: Fake) -> bool:
        key = (fake.id, MODEL, TRAITS.shape)
        return self.registry.breaker.in_cooldown(key, trio.current_time())


@pytest.fixture
def world(nursery: trio.Nursery) -> World:
    return World(nursery)


class Drained:
    """What the consumer received after the commit, and when it ended."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.error: InBandError | None = None
        self.usage: Usage | None = None
        self.ended_at = 0.0

    @property
    def models(self) -> set[str]:
        return {event["model"] for event in self._json()}

    @property
    def text(self) -> str:
        deltas = (e["choices"][0]["delta"].get("content") or "" for e in self._json())
        return "".join(deltas)

    @property
    def events(self) -> list[str]:
        return [line for line in self.lines if line != "data: [DONE]"]

    def _json(self) -> list[dict[str, Any]]:
        return [json.loads(line.removeprefix("data: ")) for line in self.events]


async def drain(committed: Committed) -> Drained:
    """Relay the committed stream to its end (or its in-band error), then close it."""
    drained = Drained()
    try:
        while True:
            match await committed.next_event():
                case RelayedChunk(line=line):
                    drained.lines.append(line)
                case Finished(usage=usage):
                    drained.usage = usage
                    break
                case InBandError() as error:
                    drained.error = error
                    break
    finally:
        drained.ended_at = trio.current_time()
        committed.close()
    return drained


def stalls_after(*steps: Step) -> Script:
    return [*steps, Stall()]


def answer_at(seconds: float, text: str, model: str = MODEL) -> Script:
    return [Wait(seconds), *answer(text, model=model)]
