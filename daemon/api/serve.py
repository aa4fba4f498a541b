"""`dinfer serve`: the data directory's serve lock, the store, the supervisor nursery and one
Hypercorn server on one port; the `/metrics` listener on its own (DINFER_METRICS_LISTEN); the
process's signals and its reports to systemd.

Signals: SIGTERM or SIGINT drains (`/readyz` 503 at once, new requests 503, requests in flight
get `drain_grace_s`, then end in band; providers close with 1001); a second one stops at once.
A worker of `dinfer serve --workers` takes every SIGTERM or SIGINT as that one drain and stops
at once on SIGQUIT, which its parent sends for a second SIGTERM or SIGINT (dinfer/workers.py):
a worker hears the same stop from several senders (its parent, systemd signalling every process
of the unit, a terminal's Ctrl-C reaching the whole process group).
SIGHUP reloads the config file and the environment (`Supervisor.retune`). systemd hears
`READY=1` once the listener is bound and the supervisor is up, `STATUS=` as providers and
requests come and go, `WATCHDOG=1` from the event loop, and `STOPPING=1` when the drain starts.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from trio_util import wait_any

from daemon.api import h11_writes
from daemon.api.app import create_app
from daemon.api.metrics_server import serve_metrics
from daemon.config import ConfigError, Settings, load_settings, reload
from daemon.nursery.supervisor import Supervisor, open_supervisor
from daemon.serve_lock import hold_serve_lock
from daemon.store import open_store
from hosting.sd_notify import Notifier, open_notifier
from protocol.messages import MAX_FRAME_BYTES

log = logging.getLogger("dinfer")

ShutdownTrigger = Callable[[], Awaitable[None]]
# The least time between two STATUS= updates: under load, requests change the count far more
# often than anyone reads `systemctl status`, and each update is a syscall.
STATUS_EVERY_S: Final = 1.0


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [settings.listen]
    # Slack above the protocol's 10 MiB so the session can refuse an oversized frame with a
    # reason; beyond it Hypercorn closes with 1009.
    config.websocket_max_message_size = MAX_FRAME_BYTES + 2 * 1024 * 1024
    config.graceful_timeout = 5
    # Hypercorn's idle timer runs from the connection's start until a request head is complete,
    # and again after each answer: it bounds both a slow head and an idle keep-alive.
    config.keep_alive_timeout = settings.keepalive_timeout_s
    config.h11_max_incomplete_size = 16 * 1024  # a longer request head is refused
    # No read_timeout: Hypercorn applies it to every read of the connection's life, including
    # while a streamed answer runs for minutes and the consumer rightly sends nothing, and on
    # provider WebSockets. The body deadline is HttpEdge's (daemon/api/edge.py).
    config.read_timeout = None
    config.accesslog = None  # request lines would be noise; errors still go to our logging
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


class Signals:
    """The process's signals: the first SIGTERM or SIGINT asks for a drain (`stop`), a second
    one cancels `abort` (stop now); SIGHUP calls `reload`. A `worker` drains on every SIGTERM
    or SIGINT and stops now on SIGQUIT (see the module's note)."""

    def __init__(
        self, abort: trio.CancelScope, reload: Callable[[], None], *, worker: bool = False
    ) -> None:
        self.stop = trio.Event()
        self._abort = abort
        self._reload = reload
        self._worker = worker

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        wanted = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        if self._worker:
            wanted.append(signal.SIGQUIT)
        with trio.open_signal_receiver(*wanted) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    self._reload()
                elif signum == signal.SIGQUIT:  # only a worker listens: its parent's "now"
                    log.warning("SIGQUIT: stopping now")
                    self._abort.cancel(reason="SIGQUIT")
                elif not self.stop.is_set():
                    log.info("received %s: shutting down", name)
                    self.stop.set()
                elif not self._worker:
                    log.warning("second %s: stopping now", name)
                    self._abort.cancel(reason=f"second {name}")


def reload_settings(sup: Supervisor, config_path: Path | None) -> None:
    """SIGHUP: read the file and the environment again; keep running as before on an error."""
    try:
        fresh = load_settings(os.environ, config_path)
    except ConfigError as exc:
        log.error("reload failed, keeping the running settings: %s", exc)
        return
    outcome = reload(sup.settings, fresh)
    if outcome.needs_restart:
        log.warning("changed but only a restart applies them: %s", ", ".join(outcome.needs_restart))
    sup.retune(outcome.settings)
    log.info("reloaded settings; changed: %s", ", ".join(outcome.changed) or "nothing")


def status_line(sup: Supervisor, binds: list[str]) -> str:
    state = "draining" if sup.draining else "serving"
    return (
        f"{state} on {', '.join(binds)}: {sup.sessions.value} provider(s), "
        f"{sup.requests.value} request(s) in flight"
    )


async def report_status(
    sup: Supervisor,
    notifier: Notifier,
    binds: list[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """READY=1 now (the caller starts this once it is), then STATUS= on each change."""
    sent = status_line(sup, binds)
    await notifier.ready(sent)
    task_status.started()
    while True:
        await wait_any(sup.sessions.wait_transition, sup.requests.wait_transition)
        await trio.sleep(STATUS_EVERY_S)  # a rate limit, not a poll: see STATUS_EVERY_S
        if (line := status_line(sup, binds)) != sent:
            await notifier.status(line)
            sent = line


@dataclass(frozen=True)
class RunningDaemon:
    """What `serve` reports once listening: the bound addresses and the supervisor."""

    binds: list[str]
    supervisor: Supervisor
    metrics_url: str | None = None  # the /metrics listener's base URL; None when off

    @property
    def base_url(self) -> str:
        return self.binds[0]

    @property
    def provider_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/ws/provider"


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: ShutdownTrigger | None = None,
    config_path: Path | None = None,
    seed: int | None = None,
    worker: bool = False,
    task_status: trio.TaskStatus[RunningDaemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until drained; report where it listens.

    Without `shutdown_trigger` the process's signals drive it (`Signals`); a test passes its
    own trigger instead, and the drain follows it the same way. Raises DataDirInUse, before
    opening anything else, when another daemon serves the same data directory.

    `worker`: one of `dinfer serve --workers N` (dinfer/workers.py): its parent holds the
    data directory's lock, and it listens on a socket of its own with SO_REUSEPORT, so the
    kernel spreads the port's connections over the workers.
    """
    if settings.admin_key is None:
        log.warning("no admin key is set: the admin API refuses every call")
    async with (
        _worker_lock() if worker else hold_serve_lock(settings.data_dir, settings.listen) as lock,
        open_store(settings.data_dir) as store,
        open_notifier(os.environ) as notifier,
    ):
        # Inside the store and the lock: even a stop "at once" closes those properly.
        with trio.CancelScope() as abort:
            async with open_supervisor(settings, store, seed=seed, worker=worker) as sup:
                # Hypercorn takes the descriptor over (and closes it).
                listener = _reuse_port_socket(settings).detach() if worker else None
                await _run(
                    sup, lock, notifier, abort, shutdown_trigger, config_path, task_status, listener
                )


class _WorkerLock:
    """A worker's stand-in for the serve lock, which its parent holds."""

    def record(self, where: str) -> None:
        pass


@asynccontextmanager
async def _worker_lock() -> AsyncIterator[_WorkerLock]:
    yield _WorkerLock()


def _reuse_port_socket(settings: Settings) -> socket.socket:
    """The worker's own listening socket on the shared port (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in settings.listen_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.listen_host, settings.listen_port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


async def _run(
    sup: Supervisor,
    lock: Any,
    notifier: Notifier,
    abort: trio.CancelScope,
    shutdown_trigger: ShutdownTrigger | None,
    config_path: Path | None,
    task_status: trio.TaskStatus[RunningDaemon],
    listener: int | None = None,
) -> None:
    settings = sup.settings
    stopped = trio.Event()
    binds: list[str] = []  # filled once bound; shut_down may run (and read it) before that
    trigger = shutdown_trigger
    if trigger is None:
        signals = Signals(abort, partial(reload_settings, sup, config_path), worker=sup.worker)
        await sup.nursery.start(signals.run)
        trigger = signals.stop.wait

    async def shut_down() -> None:
        await trigger()
        grace = sup.settings.drain_grace_s
        log.info("draining: requests in flight get up to %g s, then providers close", grace)
        sup.draining = True
        await notifier.stopping(status_line(sup, binds))
        await sup.drain(grace)

    config = hypercorn_config(settings)
    if listener is not None:
        config.bind = [f"fd://{listener}"]
    server = partial(_serve_http, create_app(sup), config, shut_down, stopped)
    binds[:] = await sup.nursery.start(server)
    metrics_url = None
    if settings.metrics_listen is not None:
        host, port = settings.metrics_listen
        metrics_url = await sup.nursery.start(serve_metrics, sup.metrics, host, port)
        log.info("metrics on %s/metrics", metrics_url)
    await trio.to_thread.run_sync(lock.record, "listening on " + ", ".join(binds))
    sup.ready = True
    await sup.nursery.start(report_status, sup, notifier, binds)
    await sup.nursery.start(notifier.keep_alive)
    log.info(
        "dinfer listening on %s (provider auth: %s)",
        ", ".join(binds),
        settings.provider_auth,
    )
    task_status.started(RunningDaemon(binds, sup, metrics_url))
    await stopped.wait()


async def _serve_http(
    app: Any,
    config: Config,
    shutdown_trigger: ShutdownTrigger,
    stopped: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    h11_writes.install()  # one socket write per answer piece, not per head/body/end
    try:
        await hypercorn_serve(
            app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
        )
    finally:
        stopped.set()
