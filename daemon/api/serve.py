"""`dinfer serve`: the data directory's serve lock, the store, the supervisor nursery and one
Hypercorn server on one port."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from daemon.api.app import create_app
from daemon.config import Settings
from daemon.nursery.supervisor import Supervisor, open_supervisor
from daemon.serve_lock import hold_serve_lock
from daemon.store import open_store
from protocol.messages import MAX_FRAME_BYTES

log = logging.getLogger("dinfer")

ShutdownTrigger = Callable[[], Awaitable[None]]
# On shutdown, requests in flight get this long to finish before providers are closed.
SHUTDOWN_GRACE_S: Final = 10.0


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


async def until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            return


@dataclass(frozen=True)
class RunningDaemon:
    """What `serve` reports once listening: the bound addresses and the supervisor."""

    binds: list[str]
    supervisor: Supervisor

    @property
    def base_url(self) -> str:
        return self.binds[0]

    @property
    def provider_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/ws/provider"


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: ShutdownTrigger = until_signalled,
    config_path: Path | None = None,
    seed: int | None = None,
    task_status: trio.TaskStatus[RunningDaemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until `shutdown_trigger` returns; report where it listens.

    Raises DataDirInUse, before opening anything else, when another daemon serves the same
    data directory.
    """
    if settings.admin_key is None:
        log.warning("DINFER_ADMIN_KEY is not set: the admin API refuses every call")
    async with (
        hold_serve_lock(settings.data_dir, settings.listen) as lock,
        open_store(settings.data_dir) as store,
        open_supervisor(settings, store, seed=seed) as sup,
    ):
        stopped = trio.Event()

        async def shut_down() -> None:
            await shutdown_trigger()
            log.info("shutting down: finishing requests in flight, then closing providers")
            await sup.drain(SHUTDOWN_GRACE_S)

        server = partial(
            _serve_http, create_app(sup), hypercorn_config(settings), shut_down, stopped
        )
        binds: list[str] = await sup.nursery.start(server)
        await trio.to_thread.run_sync(lock.record, "listening on " + ", ".join(binds))
        sup.ready = True
        log.info(
            "dinfer listening on %s (provider auth: %s)", ", ".join(binds), settings.provider_auth
        )
        task_status.started(RunningDaemon(binds, sup))
        await stopped.wait()


async def _serve_http(
    app: Any,
    config: Config,
    shutdown_trigger: ShutdownTrigger,
    stopped: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    try:
        await hypercorn_serve(
            app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
        )
    finally:
        stopped.set()
