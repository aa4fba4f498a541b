"""One dispatch attempt: a primary racer and, when its first token runs late, a backup.

Both racers are sibling tasks in the attempt's nursery, each in its own cancel scope with its
own deadline; the hedge timer is the nursery's body, in the attempt's own task. The first
racer to produce *content* (or `inference_accepted`, or a clean completion) claims the race
and cancels every other racer with a reason, on the wire too.
Boilerplate is held per racer (at most `MAX_HELD` chunks, the rest dropped) and never
commits. A racer that fails before content is done and its held chunks dropped; the other
keeps running with its deadline intact. A request-fault error (400/413/415/422) ends the
whole attempt at once. (Trio's `open_tcp_stream` races its connection attempts the same way:
one task each, the winner cancels the rest.)

`judge()` is the per-event rule, a pure function; `Race.run()` returns one closed outcome:
`Won`, `RequestInvalid` or `AllFailed`, each carrying the failures seen on the way, which
dispatch turns into breaker strikes once it knows whose fault they were.

When the backup starts, and whether it may, is the `Hedger`'s call (`hedging.py`). The race
feeds what it learns back: the claimer's first-token time, and for each racer cancelled by the
claim after running past the hedge point, the time it had run, a lower bound of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final, assert_never

import trio

from daemon.nursery.attempt import (
    Accepted,
    Chunk,
    Completed,
    Event,
    Failure,
    ProviderStream,
    error_message,
)
from daemon.nursery.hedging import (
    Backup,
    HedgePoint,
    Hedger,
    NoProvider,
    OverBudget,
    Overloaded,
)
from daemon.routing.registry import Registry
from daemon.routing.types import Lease, ProviderEntry, RequestTraits
from protocol.sse import ChunkKind

log = logging.getLogger("dinfer.dispatch")

# Boilerplate chunks held per racer for the relay; past it more are read and dropped. Never a
# commit: boilerplate commits nothing however much of it comes (PROTOCOL.md §6), or a provider
# flooding it would hold the request and its slot past the first-token deadline.
MAX_HELD: Final = 8
# A deadline noticed this much late means the daemon's own loop is overloaded: the provider's
# answer may be sitting unread, so the miss is ours, not the provider's (503: not a strike).
LOOP_LAG_S: Final = 0.25
DAEMON_BUSY: Final = Failure(503, "the daemon was too busy to read the provider in time")


@dataclass(frozen=True, slots=True)
class Timing:
    """The deadlines of one request, in seconds."""

    ttft: float
    speculative_ratio: float
    preamble: float
    inference: float


# What one event means for a racer that has not committed yet -------------------------------


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep reading; `chunk` is boilerplate to relay after the commit (None: nothing)."""

    chunk: Chunk | None


@dataclass(frozen=True, slots=True)
class Accept:
    """`inference_accepted`: claim the race, then wait up to the inference timeout."""


@dataclass(frozen=True, slots=True)
class Commit:
    """Content (or a clean completion before any): claim the race and hand it over."""

    first: Chunk | None
    completed: Completed | None


@dataclass(frozen=True, slots=True)
class Fail:
    failure: Failure


Verdict = Hold | Accept | Commit | Fail


def judge(event: Event, held: int) -> Verdict:
    """PROTOCOL.md §6 for one event, given how many boilerplate chunks are already held."""
    match event:
        case Failure():
            return Fail(event)
        case Accepted():
            return Accept()
        case Completed():
            return Commit(None, event)
        case Chunk(kind=ChunkKind.DONE):
            return Hold(None)
        case Chunk(kind=ChunkKind.ERROR):
            return Fail(Failure(502, error_message(event.event)))
        case Chunk(kind=ChunkKind.BOILERPLATE):
            return Hold(event if held < MAX_HELD else None)
        case Chunk():
            return Commit(event, None)
        case _:
            assert_never(event)


# How a racer ended, and how the race did ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Content:
    """A racer that claimed the race with content; its stream stays open for the relay."""

    stream: ProviderStream
    held: tuple[Chunk, ...]
    first: Chunk | None
    completed: Completed | None
    started_at: float
    first_token_at: float


@dataclass(frozen=True, slots=True)
class Failed:
    failure: Failure


@dataclass(frozen=True, slots=True)
class Lost:
    """Cancelled: another racer won, or the whole request was cancelled."""


RacerResult = Content | Failed | Lost


@dataclass(frozen=True, slots=True)
class RacerFailure:
    """A provider that failed this request before content, for the breaker and the answer."""

    entry: ProviderEntry
    failure: Failure


@dataclass(frozen=True, slots=True)
class Won:
    content: Content
    failures: tuple[RacerFailure, ...]


@dataclass(frozen=True, slots=True)
class RequestInvalid:
    """A provider said the request itself is bad (4xx): no other provider may be tried."""

    failure: Failure
    failures: tuple[RacerFailure, ...]


@dataclass(frozen=True, slots=True)
class AllFailed:
    failures: tuple[RacerFailure, ...]


RaceOutcome = Won | RequestInvalid | AllFailed


@dataclass(eq=False)
class _Racer:
    stream: ProviderStream
    started_at: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: bool = False


class Race:
    """The racers of one attempt. Run it once."""

    def __init__(
        self,
        registry: Registry,
        hedger: Hedger,
        traits: RequestTraits,
        plaintext: bytes,
        timing: Timing,
        exclude: frozenset[str],
    ) -> None:
        self._registry = registry
        self._hedger = hedger
        self._traits = traits
        self._plaintext = plaintext
        self._timing = timing
        self._exclude = exclude
        self._racers: list[_Racer] = []
        self._results: list[tuple[_Racer, RacerResult]] = []
        self._winner: _Racer | None = None
        self._fatal: Failure | None = None
        self._hedge_scope = trio.CancelScope()
        self._point: HedgePoint | None = None

    async def run(self, primary: Lease) -> RaceOutcome:
        """Race until a racer commits or every racer failed."""
        self._hedger.dispatched()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._launch(primary)
                # The hedge timer runs in this task, which would otherwise only wait for the
                # racers: a task of its own was spawned and cancelled on every request.
                await self._hedge()
        except BaseException:
            for _, result in self._results:  # cancelled after the claim: nobody will relay it
                if isinstance(result, Content):
                    result.stream.close()
            raise
        return self._outcome()

    def _outcome(self) -> RaceOutcome:
        failures = tuple(
            RacerFailure(racer.stream.entry, result.failure)
            for racer, result in self._results
            if isinstance(result, Failed)
        )
        for _, result in self._results:
            if isinstance(result, Content):
                return Won(result, failures)
        if self._fatal is not None:
            return RequestInvalid(self._fatal, failures)
        return AllFailed(failures)

    def _launch(self, lease: Lease) -> None:
        racer = _Racer(ProviderStream(lease, self._registry), trio.current_time())
        self._racers.append(racer)
        self._nursery.start_soon(self._race, racer)

    async def _hedge(self) -> None:
        """At the hedge point, with no winner yet, send the request to a second provider."""
        with self._hedge_scope:
            primary = self._racers[0]
            ratio = self._timing.ttft * self._timing.speculative_ratio
            key = self._traits.latency_key
            self._point = self._hedger.point(key, ratio, primary.stream.entry)
            if self._point is None:
                return
            await trio.sleep_until(primary.started_at + self._point.delay)
            busy = frozenset(r.stream.provider_id for r in self._racers)
            match self._hedger.decide(self._traits, self._exclude | busy):
                case Backup(lease):
                    log.debug("first token late: hedging on %s", lease.entry.provider_id)
                    self._launch(lease)
                case Overloaded(reason):
                    log.debug("first token late, no backup: %s", reason)
                case OverBudget() | NoProvider():
                    pass
                case decision:
                    assert_never(decision)

    async def _race(self, racer: _Racer) -> None:
        result: RacerResult = Lost()
        try:
            with racer.scope:
                result = await self._until_commit(racer)
        finally:
            self._settle(racer, result)

    def _settle(self, racer: _Racer, result: RacerResult) -> None:
        racer.finished = True
        self._results.append((racer, result))
        match result:
            case Content():
                if racer is not self._racers[0]:
                    self._hedger.backup_won()
            case Failed(failure):
                racer.stream.close()
                self._failed(racer, failure)
            case Lost():
                racer.stream.close()
            case _:
                assert_never(result)
        if len(self._results) == len(self._racers) and self._winner is None:
            self._hedge_scope.cancel(reason="every racer has finished")

    def _failed(self, racer: _Racer, failure: Failure) -> None:
        log.info(
            "attempt on %s failed before content: %s %s",
            racer.stream.provider_id,
            failure.status,
            failure.message,
        )
        if self._winner is racer:
            self._winner = None  # claimed by inference_accepted, then failed: nobody won
        if failure.is_request_fault and self._fatal is None:
            self._fatal = failure
            self._nursery.cancel_scope.cancel(reason="the request itself is invalid")

    def _claim(self, racer: _Racer) -> bool:
        """Make `racer` the winner and cancel everyone else; False if another got there first."""
        if self._winner is not None:
            return self._winner is racer
        self._winner = racer
        self._hedge_scope.cancel(reason="a racer claimed the race")
        now = trio.current_time()
        for other in self._racers:
            if other is not racer and not other.finished:
                other.scope.cancel(reason="another provider won the race")
                self._record_loser(other, now - other.started_at)
        return True

    def _record_loser(self, racer: _Racer, ran: float) -> None:
        """A lower bound of the loser's first-token time, if it ran past the hedge point.

        Without it the window would hold only winners and the hedge point would creep down.
        A racer that ran less than the point says nothing about that point: it is left out.
        """
        if self._point is not None and ran >= self._point.delay:
            self._registry.record_ttft(racer.stream.entry, self._traits, ran)

    async def _until_commit(self, racer: _Racer) -> RacerResult:
        """Read until content or a failure; the deadlines are cancel scopes."""
        failure = racer.stream.start(self._plaintext)
        if failure is not None:
            return Failed(failure)
        deadline = racer.started_at + self._timing.ttft
        held: list[Chunk] = []
        preamble_extended = accepted = False
        while True:
            with trio.move_on_at(deadline):
                match judge(await racer.stream.next_event(), len(held)):
                    case Hold(chunk):
                        held.extend([chunk] if chunk is not None else [])
                        continue
                    case Accept():
                        if not self._claim(racer):
                            return Lost()
                        # Only the first: a provider repeating it must not postpone content.
                        if not accepted:
                            deadline = trio.current_time() + self._timing.inference
                        accepted = preamble_extended = True
                        continue
                    case Commit(first, completed):
                        if not self._claim(racer):
                            return Lost()
                        now = trio.current_time()
                        if not accepted:  # a model load is no first-token time to learn
                            self._registry.record_ttft(
                                racer.stream.entry, self._traits, now - racer.started_at
                            )
                        return Content(
                            racer.stream, tuple(held), first, completed, racer.started_at, now
                        )
                    case Fail(failure):
                        return Failed(failure)
                    case verdict:
                        assert_never(verdict)
            if trio.current_time() - deadline > LOOP_LAG_S:
                return Failed(DAEMON_BUSY)  # our lateness: the provider may have answered
            if held and not preamble_extended:
                preamble_extended = True
                deadline += self._timing.preamble
                continue
            return Failed(_timeout(bool(held)))


def _timeout(sent_preamble: bool) -> Failure:
    if sent_preamble:
        return Failure(504, "provider sent no content after its preamble", "timeout")
    return Failure(504, "provider sent no first token in time", "timeout")
