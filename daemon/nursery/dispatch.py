"""Per-request dispatch: attempts until one commits, then the committed stream.

`dispatch()` runs up to `max_attempts` races (see `race.py`). Only the first attempt may
wait in the admission queue; a provider that failed is excluded from later attempts, and the
next attempt softly avoids its version. Nothing reaches the consumer until a race commits:
the caller gets a `Committed` (held boilerplate, the first content, and the live stream) or a
`DispatchFailed` with the status to answer with. After the commit nothing is retried:
`Committed.next_event()` turns a failure or a stall into one in-band error.

Breaker strikes wait until the request's fate says whose fault a failure was. A provider that
failed what another then served is struck. A request that failed *the same way* on two
providers of different versions is itself at fault (an over-long prompt the backends could
not say they refused, a poison input): nobody is struck and no third provider is tried. Two
providers of one version failing alike still count: that is how a binary's crash on a shape
(the seed's incident: old builds crashing on tools) cools those providers down.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, assert_never

import trio

from daemon.nursery.attempt import Chunk, Completed, Failure, error_message
from daemon.nursery.hedging import Hedger
from daemon.nursery.race import (
    AllFailed,
    Content,
    Race,
    RacerFailure,
    RequestInvalid,
    Timing,
    Won,
)
from daemon.routing.admission import AdmissionQueue
from daemon.routing.breaker import STRIKE_STATUSES
from daemon.routing.registry import Registry
from daemon.routing.types import Lease, RequestTraits
from protocol.messages import Usage
from protocol.sse import ChunkKind

log = logging.getLogger("dinfer.dispatch")


@dataclass(frozen=True, slots=True)
class DispatchFailed:
    """No provider produced content: answer the consumer with this status and message."""

    status: int
    message: str
    code: str
    retry_after: int | None = None
    providers_tried: tuple[str, ...] = ()  # in the order they were tried
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Job:
    traits: RequestTraits
    plaintext: bytes  # the `{"endpoint", "body"}` envelope every provider gets, sealed anew
    timing: Timing
    max_attempts: int


@dataclass(frozen=True, slots=True)
class Phases:
    """Durations for the Server-Timing header, in seconds."""

    queue: float
    route: float
    ttft: float


@dataclass(frozen=True, slots=True)
class InBandError:
    """The committed stream failed: the route reports it in its own in-band form."""

    kind: str  # "provider_error", "timeout" or "server_shutting_down"
    message: str


# The end of a stream this request let go of itself (the consumer stopped reading and the
# watchdog released the provider): nobody is reading, and the provider is not to blame.
RELEASED: Final = InBandError("timeout", "the consumer stopped reading; the provider was released")
# The end of a stream still open when the daemon's drain grace ran out.
SHUTTING_DOWN: Final = InBandError(
    "server_shutting_down", "the daemon is shutting down: the answer was cut short; retry"
)


@dataclass(frozen=True, slots=True)
class Finished:
    """The committed stream ended cleanly; `usage` as the provider reported it."""

    usage: Usage


RelayEvent = Chunk | InBandError | Finished
# How a relayed stream ended, as a codec's `respond` reports it.
RelayEnd = Finished | InBandError


@dataclass(eq=False)
class Committed:
    """The winning racer, handed to the request's own task; close it exactly once."""

    content: Content
    registry: Registry
    traits: RequestTraits
    inference_timeout: float
    phases: Phases
    attempts: int
    # Chunks handed to the relay, for the metrics (added once, at the request's end).
    chunks: int = 0
    providers_tried: tuple[str, ...] = ()  # the failed ones in order, then the winner
    # Content chunks handed out so far: the completion estimate when no usage comes.
    content_chunks: int = 0
    _pending: list[Chunk | Completed] = field(default_factory=list)
    _ending: InBandError = RELEASED  # what the relay reports once this side closed the stream
    # The stream's end, once handed out: asked again (a relay cancelled just after taking it,
    # then the hang-up path reading on for the usage), it is the same end, not a read past it.
    _end_event: Finished | InBandError | None = None

    def __post_init__(self) -> None:
        # The silence limit counts from the last content: boilerplate (role chunks, empty
        # deltas) is relayed but never re-arms it, so a provider cannot hold a stream open
        # with it.
        self._content_at = trio.current_time()
        c = self.content
        self._pending = [*c.held, *([c.first] if c.first else [])]
        self._pending += [c.completed] if c.completed else []
        self._pending.reverse()

    @property
    def provider_id(self) -> str:
        return self.content.stream.provider_id

    @property
    def request_id(self) -> str:
        return self.content.stream.request_id

    async def next_event(self) -> RelayEvent:
        """The next chunk to relay; then exactly one `Finished` or `InBandError` (the same
        one again if asked after it)."""
        if self._end_event is not None:
            return self._end_event
        while not self.content.stream.closed:
            event = self._pending.pop() if self._pending else await self._receive()
            if self.content.stream.closed:
                break  # closed here while waiting: the end of frames is ours, not a failure
            relayable = self._relayable(event)
            if relayable is not None:
                return relayable
        return self._end(self._ending)

    def poll(self) -> RelayEvent | None:
        """next_event without waiting: None when no frame is waiting right now.

        The relay drains what is already buffered into one write to the consumer: under load
        that saves a send, an HTTP chunk and a task switch per chunk.
        """
        if self._end_event is not None:
            return self._end_event
        while not self.content.stream.closed:
            event = self._pending.pop() if self._pending else self.content.stream.poll_event()
            if event is None:
                return None
            relayable = self._relayable(event)
            if relayable is not None:
                return relayable
        return self._end(self._ending)

    def _relayable(self, event: object) -> RelayEvent | None:
        match event:
            case Chunk(kind=ChunkKind.DONE):
                return None
            case Chunk(kind=ChunkKind.ERROR):
                return self._end(self._fail(Failure(502, error_message(event.event))))
            case Chunk(kind=ChunkKind.CONTENT):
                self.chunks += 1
                self.content_chunks += 1
                self._content_at = trio.current_time()
                return event
            case Chunk():
                self.chunks += 1
                return event
            case Completed(usage=usage):
                self._succeed(usage)
                return self._end(Finished(usage))
            case Failure():
                return self._end(self._fail(event))
        return None  # Accepted after the commit carries nothing

    async def _receive(self) -> object:
        with trio.move_on_at(self._content_at + self.inference_timeout):
            return await self.content.stream.next_event()
        return Failure(
            504, f"no content from the provider for {self.inference_timeout:g} s", "timeout"
        )

    def _end(self, event: Finished | InBandError) -> Finished | InBandError:
        if self._end_event is None:
            self._end_event = event
            if isinstance(event, InBandError):
                self.registry.metrics.in_band_error(event.kind)
        return self._end_event

    def _succeed(self, usage: Usage) -> None:
        elapsed = trio.current_time() - self.content.first_token_at
        decode_tps = (
            usage.completion_tokens / elapsed if elapsed > 0 and usage.completion_tokens else None
        )
        self.registry.record_success(
            self.content.stream.entry, self.traits.model, self.traits.shape, decode_tps=decode_tps
        )

    def _fail(self, failure: Failure) -> InBandError:
        entry = self.content.stream.entry
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

    def close(self, ending: InBandError = RELEASED) -> None:
        """Let the provider go; a relay still reading then ends with `ending`."""
        if not self.content.stream.closed:
            self._ending = ending
        self.content.stream.close()


async def dispatch(
    job: Job, registry: Registry, queue: AdmissionQueue, hedger: Hedger
) -> Committed | DispatchFailed:
    """Run attempts until one commits, or say why none could."""
    started = trio.current_time()
    admitted = await queue.admit(job.traits)
    metrics = registry.metrics
    metrics.queue_wait.observe(trio.current_time() - started)
    if not isinstance(admitted, Lease):
        return DispatchFailed(
            admitted.status, admitted.message, admitted.code, admitted.retry_after
        )  # refused before any provider was tried
    lease: Lease | None = admitted
    queued = trio.current_time() - started
    failures: list[RacerFailure] = []
    attempts = 0
    while lease is not None:
        attempts += 1
        routed = trio.current_time() - started - queued
        race = Race(registry, hedger, job.traits, job.plaintext, job.timing, _tried(failures))
        match await race.run(lease):
            case Won(content, lost):
                metrics.attempt("success")
                _strike(registry, job.traits, [*failures, *lost])
                phases = Phases(queued, routed, content.first_token_at - started)
                tried = (*_ids([*failures, *lost]), content.stream.provider_id)
                return Committed(
                    content,
                    registry,
                    job.traits,
                    job.timing.inference,
                    phases,
                    attempts,
                    providers_tried=tried,
                )
            case RequestInvalid(failure, lost):
                metrics.attempt("failure")
                # A provider said the request is bad: the others' failures on it are no
                # proof against them (nobody is struck), as when two versions fail alike.
                return DispatchFailed(
                    failure.status,
                    failure.message,
                    failure.reason or "invalid_request",
                    providers_tried=_ids([*failures, *lost]),
                    attempts=attempts,
                )
            case AllFailed(lost):
                failures += lost
            case outcome:
                assert_never(outcome)
        if _request_at_fault(failures):
            metrics.attempt(_last_result(lost))
            return _failed_alike(failures, attempts)
        lease = None
        if attempts < job.max_attempts:
            lease = registry.reserve(
                job.traits, exclude=_tried(failures), avoid_version=failures[-1].entry.version
            )
        metrics.attempt("retry" if lease is not None else _last_result(lost))
    _strike(registry, job.traits, failures)
    return _exhausted(failures, attempts)


def _last_result(lost: Sequence[RacerFailure]) -> str:
    """The metrics' result of a request's last attempt, which failed before content."""
    timed_out = lost and all(f.failure.kind == "timeout" for f in lost)
    return "timeout" if timed_out else "failure"


def _ids(failures: Sequence[RacerFailure]) -> tuple[str, ...]:
    return tuple(f.entry.provider_id for f in failures)


def _tried(failures: Sequence[RacerFailure]) -> frozenset[str]:
    return frozenset(f.entry.provider_id for f in failures)


def _strike(registry: Registry, traits: RequestTraits, failures: Sequence[RacerFailure]) -> None:
    for f in failures:
        if registry.record_failure(f.entry, traits.model, traits.shape, f.failure.status):
            log.warning(
                "provider %s entered cooldown for %s/%s",
                f.entry.provider_id,
                traits.model,
                traits.shape,
            )


def _request_at_fault(failures: Sequence[RacerFailure]) -> bool:
    """Did two providers of different versions fail this request the same way?

    Only what providers said counts: a missed deadline is the daemon's judgement, and a slow
    fleet is no proof against the request. Only a failure that would be a strike counts: a
    503 is capacity (busy, draining, loading), which says nothing about the request.
    """
    seen: dict[tuple[int, str | None], str] = {}
    for f in failures:
        if f.failure.kind == "timeout" or f.failure.status not in STRIKE_STATUSES:
            continue
        how = (f.failure.status, f.failure.reason)
        version = seen.setdefault(how, f.entry.version)
        if version != f.entry.version:
            return True
    return False


def _failed_alike(failures: Sequence[RacerFailure], attempts: int) -> DispatchFailed:
    last = failures[-1].failure
    log.info("request failed alike on %d providers: not striking them", len(failures))
    message = (
        f"{last.message} (the same failure on {len(failures)} providers of different versions:"
        " the request itself is the likely cause)"
    )
    return _answer(last, message, failures, attempts)


def _exhausted(failures: Sequence[RacerFailure], attempts: int) -> DispatchFailed:
    last = failures[-1].failure if failures else Failure(503, "no provider could take the request")
    tried = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    message = f"{last.message} (gave up after {tried} on {len(failures)} provider(s))"
    return _answer(last, message, failures, attempts)


def _answer(
    last: Failure, message: str, failures: Sequence[RacerFailure], attempts: int
) -> DispatchFailed:
    code = {503: "provider_capacity", 504: "provider_timeout"}.get(last.status, "provider_error")
    retry_after = 5 if last.status == 503 else None
    # A provider's own 500 is a bad gateway from the consumer's side: a 500 would read as the
    # daemon crashing.
    status = last.status if last.status in {502, 503, 504} else 502
    return DispatchFailed(status, message, code, retry_after, _ids(failures), attempts)
