"""The supervisor: the daemon's one long-lived nursery and everything it owns.

`open_supervisor` opens the service nursery and starts, each with `nursery.start()`, the
admission queue's pump and the cooldown timer; provider sessions are adopted into the same
nursery by `host_session`. It is the only owner of background tasks: when it closes, every
session closes with 1001 and nothing keeps running. It also holds the one `Hedger`, whose
budget and counters every request's races share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

import trio
from trio_util import AsyncValue

from daemon.config import Settings
from daemon.nursery.hedging import HedgePolicy, Hedger
from daemon.routing.admission import AdmissionQueue
from daemon.routing.breaker import CircuitBreaker
from daemon.routing.eligibility import Gates
from daemon.routing.registry import Registry
from daemon.routing.session import ProviderSession, Transport
from daemon.store import Store
from protocol.messages import CloseCode

log = logging.getLogger("dinfer.supervisor")

# Time for provider sessions to send their close frames during shutdown.
CLOSE_GRACE_S: Final = 2.0


@dataclass
class Supervisor:
    """Handles to the long-lived state; the HTTP app reaches everything through it."""

    settings: Settings
    store: Store
    registry: Registry
    queue: AdmissionQueue
    hedger: Hedger
    nursery: trio.Nursery
    ready: bool = False
    draining: bool = False
    sessions: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))

    async def host_session(self, transport: Transport) -> None:
        """Run a provider session in the service nursery until it ends or the caller is cancelled.

        The WebSocket handler calls this: the connection's task only waits, so the session's
        lifetime is owned by the supervisor, and cancelling the handler (the provider hung up)
        ends the session.
        """
        session = ProviderSession(
            transport, self.registry, self.settings, self.store.lookup_provider_token
        )
        finished = trio.Event()
        scope: trio.CancelScope = await self.nursery.start(_run_session, session, finished)
        self.sessions.value += 1
        try:
            await finished.wait()
        finally:
            self.sessions.value -= 1
            session.connection_lost()
            scope.cancel(reason="the provider connection ended")

    async def drain(self, grace: float) -> None:
        """Shutting down: refuse new requests, let those in flight finish for up to `grace`
        seconds, then close every provider session with 1001 while the sockets still work."""
        self.draining = True
        with trio.move_on_after(grace):
            await self.registry.generation.wait_value(lambda _: not self.registry.busy())
        for entry in self.registry.providers():
            entry.session.kick(CloseCode.GOING_AWAY, "daemon shutting down")
        with trio.move_on_after(CLOSE_GRACE_S):
            await self.sessions.wait_value(0)

    def kick_token(self, token_id: str) -> int:
        """Disconnect every provider that registered with a revoked token."""
        kicked = [e for e in self.registry.providers() if e.token_id == token_id]
        for entry in kicked:
            entry.session.kick(CloseCode.POLICY, "provider token revoked")
        return len(kicked)


async def _run_session(
    session: ProviderSession,
    finished: trio.Event,
    *,
    task_status: trio.TaskStatus[trio.CancelScope],
) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        try:
            await session.run()
        except Exception:
            # One provider's session must never take the daemon down with it.
            log.exception("provider session crashed")
        finally:
            finished.set()


async def _wake_on_cooldown_expiry(
    registry: Registry, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Bump the registry when a breaker cooldown ends, so queued requests route again."""
    task_status.started()
    while True:
        expiry = registry.breaker.next_expiry(trio.current_time())
        with trio.move_on_at(math.inf if expiry is None else expiry):
            await registry.generation.wait_transition()  # a sooner cooldown may have begun
            continue
        registry.cooldown_expired()


def build_registry(settings: Settings, *, seed: int | None = None) -> Registry:
    breaker = CircuitBreaker(
        settings.breaker_threshold, settings.breaker_window_s, settings.breaker_cooldown_s
    )
    gates = Gates(settings.tools_min_version, settings.challenge_max_age_s, breaker)
    return Registry(gates, seed=seed)


@asynccontextmanager
async def open_supervisor(
    settings: Settings, store: Store, *, seed: int | None = None
) -> AsyncIterator[Supervisor]:
    registry = build_registry(settings, seed=seed)
    queue = AdmissionQueue(
        registry, max_per_model=settings.queue_max, timeout=settings.queue_timeout_s
    )
    hedger = Hedger(HedgePolicy.from_settings(settings), registry, queue)
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        await nursery.start(_wake_on_cooldown_expiry, registry)
        yield Supervisor(settings, store, registry, queue, hedger, nursery)
        nursery.cancel_scope.cancel(reason="daemon shutting down")
