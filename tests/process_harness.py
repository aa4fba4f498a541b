"""`dinfer serve` and `dinfer provider` as systemd starts them: real child processes, with a
`NOTIFY_SOCKET` the test owns.

`open_notify_socket` binds an abstract-namespace datagram socket and reads what the child
tells systemd; `run_daemon_process` starts `dinfer serve` under it and reports the address
from its first `STATUS=` (it listens on port 0, so no port is guessed). Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from tests.conftest import ADMIN_KEY

BOUND_S = 30  # a child interpreter starts in well under this, even on a busy machine
REPO = Path(__file__).resolve().parent.parent


class NotifySocket:
    """What the child sends to systemd, one datagram of `KEY=value` lines at a time."""

    def __init__(self, sock: trio.socket.SocketType, name: str) -> None:
        self._sock = sock
        self.address = "@" + name  # as $NOTIFY_SOCKET spells it
        self.seen: list[dict[str, str]] = []

    async def next(self) -> dict[str, str]:
        with trio.fail_after(BOUND_S):
            data = await self._sock.recv(4096)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append(fields)
        return fields

    async def until(self, key: str) -> dict[str, str]:
        """The next datagram that carries `key` (WATCHDOG=1 pings come in between)."""
        while key not in (fields := await self.next()):
            pass
        return fields


@asynccontextmanager
async def open_notify_socket() -> AsyncIterator[NotifySocket]:
    name = f"dinfer-test-{secrets.token_hex(8)}"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        await sock.bind("\0" + name)
        yield NotifySocket(sock, name)


@dataclass
class DaemonProcess:
    process: trio.Process
    url: str
    log: Path

    @property
    def provider_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws/provider"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_text(self) -> str:
        return self.log.read_text()


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DINFER_", "NOTIFY_"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


async def run_daemon_process(
    tmp_path: Path,
    notify: NotifySocket,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    *,
    task_status: trio.TaskStatus[DaemonProcess] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`dinfer serve` as a unit with `Type=notify` and `WatchdogSec=` runs it; `started` on
    READY=1. Cancelling this kills the child (the test is over)."""
    log = tmp_path / "daemon.log"
    full_env = child_env(
        {
            "NOTIFY_SOCKET": notify.address,
            "WATCHDOG_USEC": "1000000",
            "DINFER_LISTEN": "127.0.0.1:0",
            "DINFER_METRICS_LISTEN": "127.0.0.1:0",
            "DINFER_DATA_DIR": str(tmp_path / "data"),
            "DINFER_ADMIN_KEY": ADMIN_KEY,
            "DINFER_PROVIDER_AUTH": "open",
            **(env or {}),
        }
    )
    command = [sys.executable, "-m", "dinfer", "serve", *args]
    with log.open("ab") as out:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(_run, command, out, full_env)
            ready = await notify.until("READY")
            match = re.search(r"on (http://\S+):", ready["STATUS"])
            assert match, ready
            task_status.started(DaemonProcess(process, match[1], log))


async def _run(
    command: list[str],
    out: object,
    env: Mapping[str, str],
    *,
    task_status: trio.TaskStatus[trio.Process],
) -> None:
    await trio.run_process(
        command, stdout=out, stderr=out, env=env, check=False, task_status=task_status
    )
