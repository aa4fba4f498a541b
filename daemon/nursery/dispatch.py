"""Per-request dispatch: attempts until one commits, then the committed stream.

`dispatch()` runs up to `max_attempts` races (see `race.py`). Only the first attempt may
wait in the admission queue; a provider that failed is excluded from later attempts, and the
next attempt softly avoids its version. Nothing reaches the consumer until a race commits:
the caller gets a `Committed` (held boilerplate, the first content, and the live stream) or a
`DispatchFailed` carrying the status to answer with. After the commit nothing is retried:
`Committed.next_event()` turns a failure or a stall into one in-band error.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Literal

import trio

from daemon.nursery.attempt import Chunk, Completed, Failure, error_message
from daemon.nursery.race import Race, Racer, Timing
from daemon.routing.admission import AdmissionError, AdmissionQueue
from daemon.routing.registry import Registry
from daemon.routing.types import Lease, RequestTraits
from protocol.messages import Usage
from protocol.sse import ChunkKind

log = logging.getLogger("dinfer.dispatch")


class DispatchFailed(Exception):
    """No provider produced content; answer the consumer with this status and message."""

    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


@dataclass
class Job:
    traits: RequestTraits
    plaintext: bytes  # the `{"endpoint", "body"}` envelope every provider gets, sealed anew
    timing: Timing
    max_attempts: int


@dataclass
class Phases:
    """Durations for the Server-Timing header, in seconds."""

    queue: float = 0.0
    route: float = 0.0
    ttft: float = 0.0


class Nothing(enum.Enum):
    SKIPPED = "an event with nothing to relay"
    BUFFERED = "no event is waiting right now"


@dataclass(frozen=True, slots=True)
class InBandError:
    kind: str  # "provider_error" or "timeout"
    message: str


@dataclass
class Committed:
    """The winning racer, handed to the request's own task; close it exactly once."""

    racer: Racer
    registry: Registry
    traits: RequestTraits
    inference_timeout: float
    phases: Phases
    attempts: int
    usage: Usage | None = None
    _pending: list[Chunk | Completed] = field(default_factory=list)

    def __post_init__(self) -> None:
        r = self.racer
        self._pending = [
            *r.held,
            *([r.first] if r.first else []),
            *([r.completed] if r.completed else []),
        ]
        self._pending.reverse()

    @property
    def provider_id(self) -> str:
        return self.racer.stream.provider_id

    async def next_event(self) -> Chunk | InBandError | None:
        """The next chunk to relay, one in-band error, or None at a clean end."""
        while not self.racer.stream.closed:  # closed by us: nothing more to relay or blame
            event = self._pending.pop() if self._pending else await self._receive()
            relayable = self._relayable(event)
            if relayable is not Nothing.SKIPPED:
                return relayable
        return None

    def poll(self) -> Chunk | InBandError | Literal[Nothing.BUFFERED] | None:
        """next_event without waiting: `Nothing.BUFFERED` when no frame is waiting now.

        The relay drains what is already buffered into one write to the consumer: under load
        that saves a send, an HTTP chunk and a task switch per chunk.
        """
        if self.racer.stream.closed:
            return None
        while True:
            event = self._pending.pop() if self._pending else self.racer.stream.poll_event()
            if event is None:
                return Nothing.BUFFERED
            relayable = self._relayable(event)
            if relayable is not Nothing.SKIPPED:
                return relayable

    def _relayable(self, event: object) -> Chunk | InBandError | Literal[Nothing.SKIPPED] | None:
        match event:
            case Chunk(kind=ChunkKind.DONE):
                return Nothing.SKIPPED
            case Chunk(kind=ChunkKind.ERROR):
                return self._fail(Failure(502, error_message(event.event)))
            case Chunk():
                return event
            case Completed():
                self._succeed(event.usage)
                return None
            case Failure():
                return self._fail(event)
        return Nothing.SKIPPED  # Accepted after the commit carries nothing

    async def _receive(self) -> object:
        with trio.move_on_after(self.inference_timeout):
            return await self.racer.stream.next_event()
        return Failure(
            504, f"no data from the provider for {self.inference_timeout:g} s", "timeout"
        )

    def _succeed(self, usage: Usage) -> None:
        self.usage = usage
        stream = self.racer.stream
        elapsed = trio.current_time() - (self.racer.first_token_at or self.racer.started_at)
        decode_tps = (
            usage.completion_tokens / elapsed if elapsed > 0 and usage.completion_tokens else None
        )
        self.registry.record_success(
            stream.entry,
            self.traits.model,
            self.traits.shape,
            ttft_s=self.phases.ttft,
            decode_tps=decode_tps,
        )

    def _fail(self, failure: Failure) -> InBandError:
        entry = self.racer.stream.entry
        log.info(
            "provider %s failed after commit: %s %s",
            entry.provider_id,
            failure.status,
            failure.message,
        )
        self.registry.record_failure(
            entry, self.traits.model, self.traits.shape, failure.status or 502
        )
        kind = "timeout" if failure.kind == "timeout" else "provider_error"
        return InBandError(kind, failure.message)

    def close(self) -> None:
        self.racer.stream.close()


async def dispatch(job: Job, registry: Registry, queue: AdmissionQueue) -> Committed:
    """Run attempts until one commits; raise DispatchFailed when none can."""
    started = trio.current_time()
    lease: Lease | None = await _admit(job, queue)
    phases = Phases(queue=trio.current_time() - started)
    excluded: set[str] = set()
    failures: list[Failure] = []
    avoid_version: str | None = None
    attempts = 0
    while lease is not None:
        attempts += 1
        phases.route = trio.current_time() - started - phases.queue
        race = Race(registry, job.traits, job.plaintext, job.timing, frozenset(excluded))
        winner = await race.run(lease)
        if winner is not None:
            phases.ttft = (winner.first_token_at or trio.current_time()) - started
            return Committed(winner, registry, job.traits, job.timing.inference, phases, attempts)
        if race.fatal is not None:
            raise DispatchFailed(race.fatal.status, race.fatal.message, "invalid_request")
        for racer, failure in race.failures:
            excluded.add(racer.stream.provider_id)
            failures.append(failure)
            avoid_version = racer.stream.entry.version
        if attempts >= job.max_attempts:
            break
        lease = registry.reserve(
            job.traits, exclude=frozenset(excluded), avoid_version=avoid_version
        )
    raise _exhausted(failures, attempts)


async def _admit(job: Job, queue: AdmissionQueue) -> Lease:
    try:
        return await queue.admit(job.traits)
    except AdmissionError as exc:
        raise DispatchFailed(exc.status, str(exc), exc.code, exc.retry_after) from None


def _exhausted(failures: list[Failure], attempts: int) -> DispatchFailed:
    last = failures[-1] if failures else Failure(503, "no provider could take the request")
    tried = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    message = f"{last.message} (gave up after {tried} on {len(failures)} provider(s))"
    code = {503: "provider_capacity", 504: "provider_timeout"}.get(last.status, "provider_error")
    retry_after = 5 if last.status == 503 else None
    # A provider's own 500 is a bad gateway from the consumer's side: a 500 would read as the
    # daemon crashing.
    status = last.status if last.status in {502, 503, 504} else 502
    return DispatchFailed(status, message, code, retry_after)
