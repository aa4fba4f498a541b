"""The data directory's serve lock: one `dinfer serve` per directory.

Two daemons on one directory would both serve, each with its own in-memory view of the same
keys and tokens. `hold_serve_lock` takes an exclusive `fcntl.flock` on
`<DINFER_DATA_DIR>/serve.lock` before the store opens and holds it for the daemon's life; the
file says who holds it (PID, then the bound addresses once listening), so a second daemon
refuses at once with a message naming the first.

The kernel releases an flock when its descriptor closes, however the process ends, so a file
left behind by a crash never blocks a restart; the file itself is never deleted (deleting a
lock file races with the next opener). `dinfer keys create` does not take the lock: it writes
through SQLite, whose own locking lets it share the database with a running daemon.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import trio

LOCK_FILENAME: Final = "serve.lock"


class DataDirInUse(Exception):
    """Another daemon holds the serve lock of this data directory."""


class ServeLock:
    """The held lock; `record` rewrites what the lock file says about its holder."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def record(self, where: str) -> None:
        text = f"pid {os.getpid()}, {where}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)

    def release(self) -> None:
        os.close(self._fd)


def _acquire(data_dir: Path, listen: str) -> ServeLock:
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
        os.close(fd)
        raise DataDirInUse(
            f"the data directory {data_dir} is in use by another dinfer serve ({holder}); "
            "stop it, or set DINFER_DATA_DIR to another directory"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    lock = ServeLock(fd)
    lock.record(f"starting on {listen}")
    return lock


@asynccontextmanager
async def hold_serve_lock(data_dir: Path, listen: str) -> AsyncIterator[ServeLock]:
    """Hold the serve lock of `data_dir` for the block; raise DataDirInUse if it is taken."""
    lock = await trio.to_thread.run_sync(_acquire, data_dir, listen)
    try:
        yield lock
    finally:
        lock.release()
