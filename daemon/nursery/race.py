"""One dispatch attempt: a primary racer and, when its first token runs late, a backup.

Both racers are sibling tasks in the attempt's nursery, each in its own cancel scope with its
own deadline. The first racer to produce *content* (or `inference_accepted`, or a clean
completion) claims the race: every other racer is cancelled, on the wire too. Boilerplate is
held per racer and never commits. A racer that fails before content is excluded and its
held chunks dropped; the other keeps running with its deadline intact. A request-fault error
(400/413/415/422) ends the whole attempt at once.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Final

import trio

from daemon.nursery.attempt import (
    Accepted,
    Chunk,
    Completed,
    Failure,
    ProviderStream,
    error_message,
)
from daemon.routing.registry import Registry
from daemon.routing.types import Lease, RequestTraits
from protocol.sse import ChunkKind

log = logging.getLogger("dinfer.dispatch")

# Boilerplate chunks held per racer before the next chunk commits regardless.
MAX_HELD: Final = 8


@dataclass(frozen=True)
class Timing:
    """The deadlines of one request, in seconds."""

    ttft: float
    speculative_ratio: float
    preamble: float
    inference: float


@dataclass(eq=False)
class Racer:
    stream: ProviderStream
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    held: list[Chunk] = field(default_factory=list)
    first: Chunk | None = None
    completed: Completed | None = None
    failure: Failure | None = None
    started_at: float = 0.0
    first_token_at: float | None = None


class Race:
    def __init__(
        self,
        registry: Registry,
        traits: RequestTraits,
        plaintext: bytes,
        timing: Timing,
        exclude: frozenset[str],
    ) -> None:
        self._registry = registry
        self._traits = traits
        self._plaintext = plaintext
        self._timing = timing
        self._exclude = exclude
        self.racers: list[Racer] = []
        self.winner: Racer | None = None
        self.fatal: Failure | None = None
        self._running = 0
        self._hedge_scope = trio.CancelScope()

    @property
    def failures(self) -> list[tuple[Racer, Failure]]:
        return [(r, r.failure) for r in self.racers if r.failure is not None]

    async def run(self, primary: Lease) -> Racer | None:
        """Race until a winner commits (returned) or every racer failed (None)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._launch(primary)
                nursery.start_soon(self._hedge)
        except BaseException:
            if self.winner is not None:  # cancelled after the claim: nobody will relay it
                self.winner.stream.close()
            raise
        return self.winner if self.winner is not None and self.winner.failure is None else None

    def _launch(self, lease: Lease) -> None:
        racer = Racer(ProviderStream(lease, self._registry), started_at=trio.current_time())
        self.racers.append(racer)
        self._running += 1
        self._nursery.start_soon(self._race, racer)

    async def _hedge(self) -> None:
        """At the speculative point, with no winner yet, send the request to a second provider."""
        with self._hedge_scope:
            await trio.sleep_until(
                self.racers[0].started_at + self._timing.ttft * self._timing.speculative_ratio
            )
            if self.winner is not None:
                return
            busy = frozenset(r.stream.provider_id for r in self.racers)
            lease = self._registry.reserve(self._traits, exclude=self._exclude | busy)
            if lease is not None:
                log.debug("first token late: hedging on %s", lease.entry.provider_id)
                self._launch(lease)

    async def _race(self, racer: Racer) -> None:
        try:
            with racer.scope:
                outcome = racer.stream.start(self._plaintext) or await self._until_commit(racer)
                racer.failure = None if outcome is _LOST else outcome
        finally:
            self._running -= 1
            await self._settle(racer)

    async def _settle(self, racer: Racer) -> None:
        if racer.failure is not None:
            self._count_failure(racer, racer.failure)
        if racer is not self.winner or racer.failure is not None:
            racer.stream.close()
        if self._running == 0 and (self.winner is None or racer.failure is not None):
            self._hedge_scope.cancel()  # nobody left to hedge for: the attempt is over

    def _count_failure(self, racer: Racer, failure: Failure) -> None:
        log.info(
            "attempt on %s failed before content: %s %s",
            racer.stream.provider_id,
            failure.status,
            failure.message,
        )
        entry = racer.stream.entry
        if self._registry.record_failure(
            entry, self._traits.model, self._traits.shape, failure.status
        ):
            log.warning(
                "provider %s entered cooldown for %s/%s",
                entry.provider_id,
                self._traits.model,
                self._traits.shape,
            )
        if failure.is_request_fault and self.fatal is None:
            self.fatal = failure
            self._nursery.cancel_scope.cancel(reason="the request itself is invalid")

    def _claim(self, racer: Racer) -> bool:
        """Make `racer` the winner and cancel everyone else; False if another got there first."""
        if self.winner is not None:
            return self.winner is racer
        self.winner = racer
        self._hedge_scope.cancel(reason="a racer won")
        for other in self.racers:
            if other is not racer:
                other.scope.cancel(reason="another provider won the race")
        return True

    async def _until_commit(self, racer: Racer) -> Failure | None:
        """Read until content (None: committed) or a failure; deadlines as cancel scopes."""
        deadline = racer.started_at + self._timing.ttft
        preamble_extended = False
        accepted = False
        while True:
            with trio.move_on_at(deadline):
                event = await racer.stream.next_event()
                verdict = self._judge(racer, event)
                if verdict is _Verdict.CONTINUE:
                    continue
                if verdict is _Verdict.ACCEPTED:
                    # Only the first: a provider repeating it must not postpone content forever.
                    if not accepted:
                        deadline = trio.current_time() + self._timing.inference
                    accepted = preamble_extended = True
                    continue
                assert not isinstance(verdict, _Verdict)
                return verdict
            if racer.held and not preamble_extended:
                preamble_extended = True
                deadline += self._timing.preamble
                continue
            return _timeout(racer)

    def _judge(self, racer: Racer, event: object) -> Failure | _Verdict | None:
        match event:
            case Failure():
                return event
            case Accepted():
                return _Verdict.ACCEPTED if self._claim(racer) else _LOST
            case Completed():
                racer.completed = event
                return self._commit(racer)
            case Chunk(kind=ChunkKind.DONE):
                return _Verdict.CONTINUE
            case Chunk(kind=ChunkKind.ERROR):
                return Failure(502, error_message(event.event))
            case Chunk(kind=ChunkKind.BOILERPLATE) if len(racer.held) < MAX_HELD:
                racer.held.append(event)
                return _Verdict.CONTINUE
            case Chunk():
                racer.first = event
                return self._commit(racer)
        raise AssertionError(f"unexpected event {event!r}")

    def _commit(self, racer: Racer) -> Failure | None:
        if not self._claim(racer):
            return _LOST
        racer.first_token_at = trio.current_time()
        return None


class _Verdict(enum.Enum):
    CONTINUE = "keep reading"
    ACCEPTED = "won by inference_accepted: wait longer for content"


# A racer that produced content a moment after another claimed the race: it is being
# cancelled; it is neither a winner nor a failure.
_LOST: Final = Failure(0, "lost the race")


def _timeout(racer: Racer) -> Failure:
    if racer.first is None and any(True for _ in racer.held):
        return Failure(504, "provider sent no content after its preamble", "timeout")
    return Failure(504, "provider sent no first token in time", "timeout")
