"""The supervisor: the daemon's one long-lived nursery and everything it owns.

`open_supervisor` opens the service nursery and starts, each with `nursery.start()`, the
usage ledger's writer, the admission queue's pump and the cooldown timer; provider sessions
are adopted into the same nursery by `host_session`. It is the only owner of background
tasks: when it closes, the ledger writes every row it was sent, every session closes with
1001 and nothing keeps running.

It also holds the live `Settings`: a reload (`retune`) swaps them and pushes the new knobs into
the breaker, the eligibility gates and the queue; each request and each new provider session
reads `supervisor.settings` when it starts, so none of them holds a stale copy for long. And
it holds the one `Hedger`, whose budget and counters every request's races share. With
DINFER_REDIS_URL it starts this instance's `Cluster` (daemon/cluster/node.py) in the same
nursery, before the first request: remote providers then join the registry; beside it the
`Rebalancer` (daemon/cluster/rebalance.py), and its drain moves the providers to the other
instances first (daemon/cluster/drain.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol

import trio
from trio_util import AsyncValue

from daemon.accounts.ledger import Ledger, run_ledger
from daemon.accounts.limits import DAY_S, WINDOW_S, Limiter
from daemon.accounts.usage import recent_charges
from daemon.config import Settings
from daemon.metrics import Metrics, ProviderSample, Sampled
from daemon.nursery.hedging import HedgePolicy, Hedger
from daemon.routing.admission import AdmissionQueue
from daemon.routing.breaker import CircuitBreaker
from daemon.routing.eligibility import Gates
from daemon.routing.registry import Registry
from daemon.routing.session import ProviderSession
from daemon.routing.transport import Transport
from daemon.store import Store
from protocol.messages import CloseCode

if TYPE_CHECKING:
    from daemon.cluster.node import Cluster
    from daemon.cluster.rebalance import Rebalancer

log = logging.getLogger("dinfer.supervisor")


class InFlight(Protocol):
    """A consumer request in flight, as the drain sees it."""

    def end(self) -> None:
        """End it now: the drain's grace is over."""


# Time for provider sessions to send their close frames during shutdown.
CLOSE_GRACE_S: Final = 2.0
# Time for the usage ledger's writer to commit what it holds at shutdown.
LEDGER_FLUSH_S: Final = 10.0


@dataclass
class Supervisor:
    """Handles to the long-lived state; the HTTP app reaches everything through it."""

    settings: Settings
    store: Store
    registry: Registry
    queue: AdmissionQueue
    hedger: Hedger
    nursery: trio.Nursery
    ledger: Ledger
    ready: bool = False
    draining: bool = False
    sessions: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))
    # Consumer requests admitted and not yet answered (queued, dispatching or streaming).
    requests: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))
    # Set when the drain grace is over: every open request ends with `server_shutting_down`.
    grace_over: trio.Event = field(default_factory=trio.Event)
    # The requests in flight, each ended by `end()` once the drain's grace is over.
    in_flight: set[InFlight] = field(default_factory=set)
    # Every consumer key's rate, token and concurrency counters.
    limiter: Limiter = field(default_factory=Limiter)
    # This instance's part of a cluster (DINFER_REDIS_URL), None when it runs alone.
    cluster: Cluster | None = None
    # One of `dinfer serve --workers`: its siblings drain with it (daemon/cluster/drain.py).
    worker: bool = False
    # The cluster's rebalancing rounds (daemon/cluster/rebalance.py), None when off or alone.
    rebalancer: Rebalancer | None = None

    @property
    def metrics(self) -> Metrics:
        return self.registry.metrics

    async def host_session(self, transport: Transport) -> None:
        """Run a provider session in the service nursery until it ends or the caller is cancelled.

        The WebSocket handler calls this: the connection's task only waits, so the session's
        lifetime is owned by the supervisor, and cancelling the handler (the provider hung up)
        ends the session.
        """
        # Tokens written by another process (`dinfer tokens`, a sibling worker) count at once.
        await self.store.refresh_provider_tokens()
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
            scope.cancel(reason="the provider's WebSocket task ended")

    async def drain(self, grace: float) -> None:
        """Shutting down: refuse new requests, let those in flight finish for up to `grace`
        seconds, end the rest in band, then close every provider session with 1001 while the
        sockets still work.

        In a cluster the providers move first, one instance at a time
        (daemon/cluster/drain.py): the grace also waits for them to leave, each as soon as
        it is idle, so a request relayed for another instance finishes too."""
        self.draining = True
        deadline = trio.current_time() + grace
        async with self._moving_providers(deadline) as moved:
            with trio.move_on_at(deadline):
                await self.requests.wait_value(0)
                await moved.wait()
            if self.requests.value:
                log.warning("drain grace over: ending %d request(s) in flight", self.requests.value)
            self.grace_over.set()
            for request in list(self.in_flight):
                request.end()
            with trio.move_on_after(CLOSE_GRACE_S):  # for them to write their error and end
                await self.requests.wait_value(0)
            for entry in self.registry.connected():
                entry.session.kick(CloseCode.GOING_AWAY, "daemon shutting down")
            with trio.move_on_after(CLOSE_GRACE_S):
                await self.sessions.wait_value(0)

    @asynccontextmanager
    async def _moving_providers(self, deadline: float) -> AsyncIterator[trio.Event]:
        """Alone: nothing to wait for (an event already set). In a cluster: the deploy drain."""
        if self.cluster is None:
            done = trio.Event()
            done.set()
            yield done
            return
        from daemon.cluster.drain import drain_group, moving_providers

        group = drain_group(self.cluster.instance, worker=self.worker)
        async with moving_providers(self.cluster, self.registry, group, deadline) as moved:
            yield moved

    def retune(self, settings: Settings) -> None:
        """Run with reloaded settings (restart-only ones already kept as they were)."""
        self.settings = settings
        self.registry.breaker.retune(
            settings.breaker_threshold, settings.breaker_window_s, settings.breaker_cooldown_s
        )
        self.registry.gates = _gates(settings, self.registry.breaker)
        self.queue.retune(max_per_model=settings.queue_max, timeout=settings.queue_timeout_s)
        self.hedger.retune(HedgePolicy.from_settings(settings))
        self.registry.cooldown_expired()  # wake whoever waits on a knob that just changed
        logging.getLogger().setLevel(settings.log_level.upper())

    def kick_token(self, token_id: str) -> int:
        """Disconnect every provider that registered with a revoked token (live or still
        proving itself: a candidate must not be promoted on a dead token)."""
        kicked = [e for e in self.registry.connected() if e.token_id == token_id]
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


def sample(registry: Registry, queue: AdmissionQueue, hedger: Hedger) -> Sampled:
    """The state the metrics read at scrape time."""
    return Sampled(
        providers=[
            ProviderSample(e.provider_id, e.version, e.trusted, e.in_flight)
            for e in registry.providers()
        ],
        queued=queue.depths(),
        backups_started=hedger.counters.started,
        backups_won=hedger.counters.won,
    )


def build_registry(settings: Settings, *, seed: int | None = None) -> Registry:
    breaker = CircuitBreaker(
        settings.breaker_threshold, settings.breaker_window_s, settings.breaker_cooldown_s
    )
    return Registry(_gates(settings, breaker), seed=seed)


def _gates(settings: Settings, breaker: CircuitBreaker) -> Gates:
    return Gates(settings.tools_min_version, settings.challenge_max_age_s, breaker)


@asynccontextmanager
async def open_supervisor(
    settings: Settings, store: Store, *, seed: int | None = None, worker: bool = False
) -> AsyncIterator[Supervisor]:
    """`worker`: one of `dinfer serve --workers`, whose parent closed the store's stale rows."""
    registry = build_registry(settings, seed=seed)
    queue = AdmissionQueue(
        registry, max_per_model=settings.queue_max, timeout=settings.queue_timeout_s
    )
    hedger = Hedger(HedgePolicy.from_settings(settings), registry, queue)
    registry.metrics.watch(partial(sample, registry, queue, hedger))
    async with trio.open_nursery() as nursery:
        start_ledger = partial(run_ledger, store.path, abort_open=not worker)
        ledger: Ledger = await nursery.start(start_ledger)
        limiter = Limiter()
        charged = partial(recent_charges, store.path, time.time(), WINDOW_S, DAY_S)
        limiter.seed(await trio.to_thread.run_sync(charged))
        await nursery.start(queue.run)
        await nursery.start(_wake_on_cooldown_expiry, registry)
        cluster = rebalancer = None
        if settings.redis_url is not None:
            from daemon.cluster.node import Cluster  # only a cluster pays for importing Redis

            cluster = await nursery.start(
                Cluster(
                    settings.redis_url,
                    registry,
                    ledger,
                    budget=hedger,
                    queue=queue,
                    limits=limiter,
                    listen=settings.cluster_listen,
                    advertise=settings.cluster_advertise,
                    store=store,
                ).run
            )
            if settings.rebalance_every_s > 0:
                from daemon.cluster.rebalance import Rebalancer

                rebalancer = Rebalancer(registry, cluster.instance, settings.rebalance_every_s)
                await nursery.start(rebalancer.run, cluster)
        try:
            yield Supervisor(
                settings,
                store,
                registry,
                queue,
                hedger,
                nursery,
                ledger,
                limiter=limiter,
                cluster=cluster,
                worker=worker,
                rebalancer=rebalancer,
            )
        finally:
            # Every request has settled by now (the server ran in this nursery): write them.
            with trio.move_on_after(LEDGER_FLUSH_S) as flushing:
                flushing.shield = True
                await ledger.aclose()
            nursery.cancel_scope.cancel(reason="daemon shutting down")
