"""The usage ledger: one row per consumer request, opened at admission, settled exactly once.

`run_ledger` is the one writer task: it owns its own SQLite connection to the store's file
(the `usage` table is the store's migration), closes the rows a crash left open as `aborted`,
then hands out the `Ledger`. Requests never touch the database: `Ledger.open` and
`Charge.settle` put a tuple on a bounded memory channel, and the writer commits what is waiting
in one transaction (up to `BATCH_ROWS`, gathered for `BATCH_WINDOW_S` unless a batch is
already waiting), each kind of write as one `executemany`; a row opened and settled within
one batch is one insert. A full channel makes the request wait (backpressure), never drops a
row. Closing the ledger (or cancelling the writer) commits everything sent before it.

A `Charge` is the finalize-once guard of one request: the first `settle` writes the row's end,
any later one is a no-op. What a row ends as is a `Settlement`, built by the caller; the
`dinfer.request` log line is written at the same moment, never with content or secrets.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import trio

log = logging.getLogger("dinfer.ledger")
request_log = logging.getLogger("dinfer.request")

# `orphaned`: a cluster owner's row for a request it relayed whose ingress daemon died
# (daemon/cluster/node.py); the ingress's own row is closed as `aborted` at its next start.
Outcome = Literal[
    "completed", "failed", "rejected", "in_band_error", "client_gone", "aborted", "orphaned"
]

# Rows waiting for the writer; past this a settling request waits for it to catch up.
CHANNEL_ROWS: Final = 4096
BATCH_ROWS: Final = 256
BATCH_WINDOW_S: Final = 0.005

_OPEN_SQL: Final = (
    "INSERT OR IGNORE INTO usage (request_id, key_id, route, started_at) VALUES (?, ?, ?, ?)"
)
_SETTLE_SQL: Final = (
    "UPDATE usage SET model = ?, shape = ?, status = ?, outcome = ?, provider_id = ?, "
    "attempts = ?, providers = ?, prompt_tokens = ?, completion_tokens = ?, "
    "reasoning_tokens = ?, tokens_estimated = ?, ttft_ms = ?, duration_ms = ?, ended_at = ? "
    "WHERE request_id = ? AND outcome IS NULL"
)
# A row opened and settled within one batch (most short requests, under load) is one insert.
_WHOLE_SQL: Final = (
    "INSERT OR IGNORE INTO usage (request_id, key_id, route, started_at, model, shape, status, "
    "outcome, provider_id, attempts, providers, prompt_tokens, completion_tokens, "
    "reasoning_tokens, tokens_estimated, ttft_ms, duration_ms, ended_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ABORT_SQL: Final = "UPDATE usage SET outcome = 'aborted', ended_at = ? WHERE outcome IS NULL"


@dataclass(frozen=True, slots=True)
class Tokens:
    prompt: int = 0
    completion: int = 0
    reasoning: int = 0
    estimated: bool = False


NO_TOKENS: Final = Tokens()


@dataclass(frozen=True, slots=True)
class Settlement:
    """How one request ended, as its row and its log line record it."""

    status: int
    outcome: Outcome
    model: str | None = None
    shape: str | None = None
    provider_id: str | None = None
    attempts: int = 0
    providers: tuple[str, ...] = ()
    tokens: Tokens = NO_TOKENS
    ttft_ms: float | None = None


@dataclass(frozen=True, slots=True)
class _Open:
    row: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class _Settle:
    row: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class _Barrier:
    """Set once everything sent before it is committed."""

    done: trio.Event


_Write = _Open | _Settle | _Barrier


class Charge:
    """One request's row: settled exactly once, by whichever end comes first."""

    __slots__ = ("_ledger", "key_id", "request_id", "route", "settled", "started")

    def __init__(self, ledger: Ledger, request_id: str, key_id: str, route: str) -> None:
        self._ledger = ledger
        self.request_id = request_id
        self.key_id = key_id
        self.route = route
        self.started = trio.current_time()
        self.settled = False

    async def settle(self, end: Settlement) -> bool:
        """Write the row's end; False (and nothing written) when it was already settled."""
        if self.settled:
            return False
        self.settled = True  # before the await: a racing second settle is a no-op too
        duration_ms = round((trio.current_time() - self.started) * 1000, 3)
        t = end.tokens
        row = (
            end.model,
            end.shape,
            end.status,
            end.outcome,
            end.provider_id,
            end.attempts,
            ",".join(end.providers),
            t.prompt,
            t.completion,
            t.reasoning,
            int(t.estimated),
            end.ttft_ms,
            duration_ms,
            time.time(),
            self.request_id,
        )
        _log_request(self, end, duration_ms)
        # Shielded: a request cancelled now (the daemon stopping) still hands its row over;
        # the writer outlives every request, so this waits only while it catches up.
        with trio.CancelScope(shield=True):
            await self._ledger.put(_Settle(row))
        return True


class Ledger:
    """The request side of the writer: open rows, wait for what was sent to be on disk."""

    def __init__(self, send: trio.MemorySendChannel[_Write], written: trio.Event) -> None:
        self._send = send
        self._written = written

    async def open(self, request_id: str, key_id: str, route: str) -> Charge:
        charge = Charge(self, request_id, key_id, route)
        await self.put(_Open((request_id, key_id, route, time.time())))
        return charge

    async def put(self, write: _Write) -> bool:
        try:
            try:
                self._send.send_nowait(write)  # the usual case: no task switch for it
            except trio.WouldBlock:
                await self._send.send(write)  # the writer is behind: wait for it
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # Only after shutdown flushed the writer: the row stays open, and the next
            # start closes it as `aborted`.
            log.warning("the usage ledger is closed: a row was not written")
            return False
        return True

    async def flush(self) -> None:
        """Wait until every row sent so far is committed (read-your-writes for queries)."""
        done = trio.Event()
        if await self.put(_Barrier(done)):
            await done.wait()

    async def aclose(self) -> None:
        """No more rows: the writer commits what it holds and ends."""
        await self._send.aclose()
        await self._written.wait()


async def run_ledger(
    database: Path,
    *,
    abort_open: bool = True,
    task_status: trio.TaskStatus[Ledger] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The writer task: own the connection, abort rows a crash left open (unless a parent
    did, `abort_open_rows`), commit batches."""
    conn = await trio.to_thread.run_sync(_connect_and_abort, database, abort_open)
    send, receive = trio.open_memory_channel[_Write](CHANNEL_ROWS)
    written = trio.Event()
    pending: list[_Write] = []
    try:
        task_status.started(Ledger(send, written))
        while True:
            try:
                pending.append(await receive.receive())
            except trio.EndOfChannel:
                break
            await _gather(receive, pending)
            batch, pending = pending, []
            await _commit(conn, batch)
    finally:
        with trio.CancelScope(shield=True):  # a cancelled writer still commits what it holds
            pending += _drain(receive)
            receive.close()
            await _commit(conn, pending)
            await trio.to_thread.run_sync(conn.close)
            written.set()


async def _gather(receive: trio.MemoryReceiveChannel[_Write], pending: list[_Write]) -> None:
    """What else arrives within the batch window, up to a batch."""
    # A coalescing delay, not a poll: one wake-up per batch instead of one per row.
    if receive.statistics().current_buffer_used < BATCH_ROWS:
        await trio.sleep(BATCH_WINDOW_S)
    while len(pending) < BATCH_ROWS:
        try:
            pending.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return


def _drain(receive: trio.MemoryReceiveChannel[_Write]) -> list[_Write]:
    found: list[_Write] = []
    while True:
        try:
            found.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return found


async def _commit(conn: sqlite3.Connection, batch: Sequence[_Write]) -> None:
    if batch:
        await trio.to_thread.run_sync(_write_batch, conn, batch)
    for write in batch:
        if isinstance(write, _Barrier):
            write.done.set()


def _write_batch(conn: sqlite3.Connection, batch: Sequence[_Write]) -> None:
    # A row's open is always sent before its settle: either it is in an earlier batch (the
    # settle updates it) or in this one (the two are written as one insert).
    opens = {w.row[0]: w.row for w in batch if isinstance(w, _Open)}
    whole, settles = [], []
    for w in batch:
        if isinstance(w, _Settle):
            opened = opens.pop(w.row[-1], None)
            if opened is None:
                settles.append(w.row)
            else:
                whole.append(opened + w.row[:-1])
    with conn:
        if opens:
            conn.executemany(_OPEN_SQL, opens.values())
        if whole:
            conn.executemany(_WHOLE_SQL, whole)
        if settles:
            conn.executemany(_SETTLE_SQL, settles)


def _connect_and_abort(database: Path, abort_open: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(database, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if abort_open:
            _abort_open_rows(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def abort_open_rows(database: Path) -> None:
    """Close as `aborted` the rows a previous run left open. Only the one process that owns
    the store may: `dinfer serve --workers` runs it in the parent, before its workers start,
    since a worker's open rows are live ones to its siblings."""
    conn = sqlite3.connect(database)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        _abort_open_rows(conn)
    finally:
        conn.close()


def _abort_open_rows(conn: sqlite3.Connection) -> None:
    with conn:
        aborted = conn.execute(_ABORT_SQL, (time.time(),)).rowcount
    if aborted:
        log.warning("closed %d usage row(s) a previous run left open as aborted", aborted)


def _log_request(charge: Charge, end: Settlement, duration_ms: float) -> None:
    if not request_log.isEnabledFor(logging.INFO):
        return
    t = end.tokens
    request_log.info(
        "request %s key=%s route=%s model=%s status=%d outcome=%s attempts=%d %.0f ms",
        charge.request_id,
        charge.key_id,
        charge.route,
        end.model,
        end.status,
        end.outcome,
        end.attempts,
        duration_ms,
        extra={
            "request": {
                "request_id": charge.request_id,
                "key_id": charge.key_id,
                "route": charge.route,
                "model": end.model,
                "status": end.status,
                "outcome": end.outcome,
                "attempts": end.attempts,
                "providers": list(end.providers),
                "ttft_ms": end.ttft_ms,
                "duration_ms": duration_ms,
                "tokens": {
                    "prompt": t.prompt,
                    "completion": t.completion,
                    "reasoning": t.reasoning,
                    "estimated": t.estimated,
                },
            }
        },
    )
