"""systemd's notify protocol: `READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1` as datagrams.

A unit with `Type=notify` passes `$NOTIFY_SOCKET`, an `AF_UNIX` datagram socket (a path, or
`@name` in the abstract namespace, sent with a leading NUL); `WatchdogSec=` adds
`$WATCHDOG_USEC` (and `$WATCHDOG_PID`, the process meant). Outside systemd the variables are
unset and every send is a no-op, so callers never ask whether they run under it. Sends never
raise: a lost notification must not take the process down, and systemd acts on silence.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager

import trio
from trio_util import periodic

log = logging.getLogger("dinfer.sd_notify")


class Notifier:
    """One connected datagram socket to systemd, or nothing (not under a notify unit)."""

    def __init__(self, sock: trio.socket.SocketType | None, watchdog_s: float | None) -> None:
        self._sock = sock
        # systemd's advice: ping at half the interval, so one late tick is not a restart.
        self.watchdog_interval = watchdog_s / 2 if watchdog_s else None

    async def send(self, *fields: str) -> None:
        """One datagram of `KEY=value` lines."""
        if self._sock is None:
            return
        try:
            await self._sock.send("\n".join(fields).encode())
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)

    async def ready(self, status: str) -> None:
        await self.send("READY=1", f"STATUS={status}")

    async def status(self, status: str) -> None:
        await self.send(f"STATUS={status}")

    async def stopping(self, status: str) -> None:
        await self.send("STOPPING=1", f"STATUS={status}")

    async def keep_alive(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """`WATCHDOG=1` every half interval, from inside the event loop: a loop blocked by a
        wedged task cannot run this one, misses its pings, and systemd restarts the unit."""
        task_status.started()
        if self.watchdog_interval is None:
            return
        async with aclosing(periodic(self.watchdog_interval)) as ticks:
            async for _ in ticks:
                await self.send("WATCHDOG=1")


def address(raw: str) -> str | bytes:
    """`$NOTIFY_SOCKET` as a socket address: `@name` is `\\0name` in the abstract namespace."""
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


def watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """The watchdog interval systemd expects pings within, if it is meant for this process."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


@asynccontextmanager
async def open_notifier(environ: Mapping[str, str]) -> AsyncIterator[Notifier]:
    """The process's notifier, from `environ` (normally `os.environ`)."""
    raw = environ.get("NOTIFY_SOCKET", "")
    if not raw.startswith(("/", "@")):
        yield Notifier(None, None)
        return
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        try:
            await sock.connect(address(raw))
        except OSError as exc:
            log.warning("cannot reach systemd's notify socket %s: %s", raw, exc)
            yield Notifier(None, None)
            return
        yield Notifier(sock, watchdog_seconds(environ))
