"""`dinfer serve --workers N`: N daemon processes on one port, one cluster through Redis.

The parent holds the data directory's serve lock and starts N children (`dinfer serve
--worker`), each a full daemon with its own cluster instance id that listens on its own
socket bound with SO_REUSEPORT: the kernel spreads new connections over them, and a provider
connected to one serves consumers of all (daemon/cluster). They share the store (SQLite
with its own locking). A port of 0 is resolved here first, so every worker binds the same
one; a metrics listener gets port + i on worker i, and so does a cluster link
(DINFER_CLUSTER_LISTEN, DINFER_CLUSTER_ADVERTISE) with a fixed port.

The parent forwards SIGTERM, SIGINT and SIGHUP to every worker, and exits when they do: when
one exits on its own, the others are asked to stop (SIGTERM) and the parent returns the first
one's status. A worker takes every SIGTERM or SIGINT as the same drain (daemon/api/serve.py):
it may hear one stop from its parent, from systemd (which signals every process of the unit)
and from a terminal (Ctrl-C reaches the whole process group), and the first worker done
draining must not cut its siblings' streams. A second SIGTERM or SIGINT to the parent is the
operator's "stop now": the parent sends the workers SIGQUIT.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import trio
from trio_util import AsyncValue

from daemon.accounts.ledger import abort_open_rows
from daemon.config import Settings
from daemon.serve_lock import hold_serve_lock
from daemon.store import open_store

log = logging.getLogger("dinfer")


def reserve_port(settings: Settings) -> tuple[socket.socket, int]:
    """A socket in the port's SO_REUSEPORT group, bound, never listening: it keeps a port of
    0 resolved (and the port ours) for as long as the parent runs."""
    family = socket.AF_INET6 if ":" in settings.listen_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.listen_host, settings.listen_port))
    port: int = sock.getsockname()[1]
    return sock, port


def worker_env(settings: Settings, index: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    host = f"[{settings.listen_host}]" if ":" in settings.listen_host else settings.listen_host
    env["DINFER_LISTEN"] = f"{host}:{port}"
    env["DINFER_DATA_DIR"] = str(settings.data_dir)
    if settings.metrics_listen is not None:
        m_host, m_port = settings.metrics_listen
        m_host = f"[{m_host}]" if ":" in m_host else m_host
        env["DINFER_METRICS_LISTEN"] = f"{m_host}:{m_port + index if m_port else 0}"
    # Each worker's cluster link has its own port too (port + i, or a free one for port 0).
    c_host, c_port = settings.cluster_listen
    env["DINFER_CLUSTER_LISTEN"] = f"{_bracketed(c_host)}:{c_port + index if c_port else 0}"
    if settings.cluster_advertise is not None:
        a_host, a_port = settings.cluster_advertise
        env["DINFER_CLUSTER_ADVERTISE"] = f"{_bracketed(a_host)}:{a_port + index}"
    return env


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def run_workers(settings: Settings, count: int, config: Path | None) -> int:
    async with hold_serve_lock(settings.data_dir, settings.listen) as lock:
        # Rows a crash left open are closed here, once: each worker's open rows are live.
        async with open_store(settings.data_dir) as store:
            await trio.to_thread.run_sync(abort_open_rows, store.path)
        reserved, port = reserve_port(settings)
        try:
            command = [sys.executable, "-m", "dinfer", "serve", "--worker"]
            if config is not None:
                command += ["--config", str(config)]
            lock.record(f"{count} workers on port {port}")
            log.info("starting %d workers on port %d", count, port)
            return await _supervise(command, settings, count, port)
        finally:
            reserved.close()


async def _supervise(command: list[str], settings: Settings, count: int, port: int) -> int:
    statuses: list[int] = []
    exits = AsyncValue(0)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            processes: list[trio.Process] = []
            for index in range(count):
                env = worker_env(settings, index, port)
                run = partial(_run_worker, command, env, statuses, exits)
                processes.append(await nursery.start(run))
            nursery.start_soon(_forward, signals, processes)
            await exits.wait_value(lambda n: n >= 1)
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            await exits.wait_value(count)
            nursery.cancel_scope.cancel(reason="every worker has exited")
    return statuses[0]


async def _run_worker(
    command: list[str],
    env: dict[str, str],
    statuses: list[int],
    exits: AsyncValue[int],
    *,
    task_status: trio.TaskStatus[trio.Process],
) -> None:
    async with trio.open_nursery() as nursery:
        process = await nursery.start(partial(trio.run_process, command, env=env, check=False))
        task_status.started(process)
    statuses.append(process.returncode)
    exits.value += 1


async def _forward(signals: AsyncIterator[int], processes: list[trio.Process]) -> None:
    stopping = False
    async for signum in signals:
        if signum != signal.SIGHUP:
            signum, stopping = (signal.SIGQUIT if stopping else signum), True
        log.info("forwarding %s to %d workers", signal.Signals(signum).name, len(processes))
        for process in processes:
            if process.returncode is None:
                process.send_signal(signum)
