"""Consumer API keys and provider tokens, the same on every instance: replicated through Redis.

Each instance keeps authenticating from its own store (`daemon/store.py`: memory, SQLite), so
the request path never asks Redis. `CredentialSync.run`, started by `Cluster.run` with
`nursery.start()`, is the only code that moves credential rows between the store and Redis.

Layout: a hash per table, `dinfer:creds:api_keys` and `dinfer:creds:provider_tokens`, field =
the row's id, value = the row as JSON (`WireRow`: id, name, the secret's SHA-256 digest, never
the secret, times, a key's limits); and a stream, `dinfer:creds:changes` (MAXLEN ~10000), one
entry per push (`t` the table, `i` the ids as a JSON list, `f` the instance) that tells the
others to read those fields.

- **Push**: every `LOCAL_CHECK_S` the task reads the store's change counters (one WAL read on
  the Trio thread, microseconds); after a change (the admin API, `dinfer keys`/`tokens` on
  this machine's store, a sibling `--workers` process) it reads the changed table whole in a
  worker thread and pushes every row that supersedes what it last agreed with Redis on (one
  pipeline: HSET and XADD).
- **Pull**: one blocking XREAD (its own connection) follows the stream; the ids it names are
  read with HMGET and merged into the store, which updates its in-memory sets in the same
  step: a key created elsewhere authenticates here as soon as it is merged. A provider token
  revoked elsewhere disconnects the providers that registered with it here.
- **Merge rule** (`supersedes`): last writer wins by `updated_at` (wall clock, set by every
  write; a write is stamped past the row's previous stamp, so a change made here beats what
  it changed even when another machine's clock runs ahead); a revoked row beats every live
  one, whatever the times (`revoked_at` is a tombstone; rows are never deleted); equal times,
  the greater encoded row wins (deterministic on every instance). A row Redis holds that loses
  to ours (two instances pushed at once) is pushed again, so Redis converges to the winner.
- **Full sync**: at start (before the daemon serves, at most `JOIN_S`), when Redis answers
  again after an outage or is found without its `seeded_key` (checked every second: restarted
  empty without us seeing an error), and every `FULL_SYNC_S` as a backstop: HGETALL of both hashes
  against the whole store, both directions. A fresh instance learns every credential; an
  instance cut off pushes what it changed meanwhile.

Bound: a change on one instance authenticates (or is refused) on the others within
`LOCAL_CHECK_S` (0.05 s) plus a few round trips, well under a second. Concurrent changes to
one key on two instances within that window: one wins everywhere (two rotations: the loser's
new secret dies). Redis down: each instance authenticates from its own store; changes made
meanwhile replicate when it returns. Whoever can write Redis can add credentials: Redis is
the cluster's trust boundary already (instance keys).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any, Final

import coredis
import msgspec
import trio
from coredis.tokens import PureToken

from daemon.cluster.redis_io import REDIS_ERRORS, text
from daemon.cluster.wire import PREFIX
from daemon.key_policy import NO_LIMITS, KeyLimits
from daemon.routing.registry import Registry
from daemon.store import CREDENTIAL_TABLES, CredentialRow, Store
from protocol.messages import CloseCode

log = logging.getLogger("dinfer.cluster")

LOCAL_CHECK_S: Final = 0.05
READ_BLOCK_MS: Final = 1000
RECONNECT_S: Final = 0.5
FULL_SYNC_S: Final = 60.0
JOIN_S: Final = 3.0
BATCH: Final = 1000
CHANGES_STREAM: Final = PREFIX + "creds:changes"
CHANGES_MAXLEN: Final = 10_000
SEEDED_KEY: Final = PREFIX + "creds:seeded"  # + ":{instance}", set by its full syncs


def seeded_key(instance: str) -> str:
    """Set by `instance`'s full sync; gone: Redis lost its data (each instance checks its own,
    so another's sync after a restart cannot hide that this one's rows are missing)."""
    return f"{SEEDED_KEY}:{instance}"


SEEDED_CHECK_S: Final = 1.0
KEYS_TABLE, TOKENS_TABLE = CREDENTIAL_TABLES


def table_key(table: str) -> str:
    """The hash of `table`'s rows (see the module docstring)."""
    return f"{PREFIX}creds:{table}"


# The rows as Redis holds them -------------------------------------------------------------


class WireLimits(msgspec.Struct, frozen=True, omit_defaults=True):
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    max_concurrency: int | None = None
    allowed_models: list[str] | None = None  # sorted
    expires_at: float | None = None


class WireRow(msgspec.Struct, frozen=True):
    id: str
    name: str
    secret_hash: str  # SHA-256 hex of the secret
    created_at: float
    revoked_at: float | None
    updated_at: float
    limits: WireLimits | None = None  # api_keys only


_rows = msgspec.json.Decoder(WireRow)


def encode(row: CredentialRow, table: str) -> bytes:
    limits = None
    if table == KEYS_TABLE:
        lim = row.limits
        models = None if lim.allowed_models is None else sorted(lim.allowed_models)
        limits = WireLimits(
            lim.rpm, lim.tpm, lim.daily_tokens, lim.max_concurrency, models, lim.expires_at
        )
    wire = WireRow(
        row.id, row.name, row.secret_hash, row.created_at, row.revoked_at, row.updated_at, limits
    )
    return msgspec.json.encode(wire)


def decode(data: bytes) -> CredentialRow:
    """A row from Redis; ValueError (or msgspec's errors) when it is not one."""
    wire = _rows.decode(data)
    if len(wire.secret_hash) != 64 or not wire.name or not math.isfinite(wire.updated_at):
        raise ValueError("not a credential row")
    limits = NO_LIMITS
    if wire.limits is not None:
        w = wire.limits
        models = None if w.allowed_models is None else frozenset(w.allowed_models)
        limits = KeyLimits(w.rpm, w.tpm, w.daily_tokens, w.max_concurrency, models, w.expires_at)
    return CredentialRow(
        wire.id,
        wire.name,
        wire.secret_hash,
        wire.created_at,
        wire.revoked_at,
        wire.updated_at,
        limits,
    )


# The merge rule -------------------------------------------------------------------------


def _rank(row: CredentialRow) -> tuple[bool, float, bytes]:
    # The encoding as the tie-break: both tables' rows encode alike on every instance.
    return (row.revoked_at is not None, row.updated_at, encode(row, KEYS_TABLE))


def supersedes(incoming: CredentialRow, current: CredentialRow | None) -> bool:
    """Whether `incoming` replaces `current` (see the module docstring); never an equal row."""
    return current is None or _rank(incoming) > _rank(current)


# The task -------------------------------------------------------------------------------


class CredentialSync:
    """What this instance last agreed with Redis on, per table, and the two loops."""

    def __init__(
        self, redis: Any, url: str, store: Store, instance: str, registry: Registry
    ) -> None:
        self._redis = redis  # the cluster's command client
        self._url = url  # for a blocking client of our own (XREAD holds its connection)
        self._store = store
        self._instance = instance
        self._registry = registry
        self._known: dict[str, dict[str, CredentialRow]] = {t: {} for t in CREDENTIAL_TABLES}
        self._epochs: tuple[int, int] | None = None  # the store's counters when last read
        self._stream_id = "0-0"
        self._lock = trio.Lock()  # one sync step at a time: _known changes under it
        self._synced_at = -math.inf
        self.up = False
        self.pushed = self.merged = 0  # rows, for tests and logs

    async def run(self, *, task_status: trio.TaskStatus[CredentialSync]) -> None:
        blocking = coredis.Redis.from_url(
            self._url, connect_timeout=0.5, stream_timeout=READ_BLOCK_MS / 1000 + 2
        )
        async with blocking, trio.open_nursery() as nursery:
            with trio.move_on_after(JOIN_S):  # a fresh instance knows the keys before it serves
                await self._join()
            nursery.start_soon(self._watch_local)
            nursery.start_soon(self._follow, blocking)
            task_status.started(self)

    async def _join(self) -> bool:
        """The full two-way sync; False (and logged once) when Redis is down."""
        try:
            async with self._lock:
                await self._full_sync()
        except REDIS_ERRORS as exc:
            self._lost(exc)
            return False
        if not self.up:
            self.up = True
            log.info("cluster: keys and provider tokens replicate through Redis")
        return True

    async def _full_sync(self) -> None:
        last = await self._redis.xrevrange(CHANGES_STREAM, count=1)
        stream_id = text(last[0].identifier) if last else "0-0"
        epochs = self._store.credential_epochs()  # before the rows: a later commit shows
        for table in CREDENTIAL_TABLES:
            remote = _decoded((await self._redis.hgetall(table_key(table))).values())
            self._known[table] = dict(remote)
            await self._apply(table, list(remote.values()))
            local = await self._store.credential_rows(table)
            await self._push(table, [row for row in local if supersedes(row, remote.get(row.id))])
        # Outlives the next full syncs, which renew it; a stopped instance's marker expires.
        await self._redis.set(seeded_key(self._instance), "1", px=int(3 * FULL_SYNC_S * 1000))
        self._epochs = epochs
        self._stream_id = stream_id
        self._synced_at = trio.current_time()

    def _lost(self, exc: BaseException) -> None:
        if self.up:
            log.warning(
                "cluster: keys and provider tokens are not replicated (Redis: %s); each "
                "instance authenticates from its own store",
                str(exc),
            )
        self.up = False

    # Push: this store's changes -------------------------------------------------------------

    async def _watch_local(self) -> None:
        while True:
            await trio.sleep(LOCAL_CHECK_S)
            epochs = self._store.credential_epochs()
            if epochs is None or epochs == self._epochs:
                continue
            try:
                async with self._lock:
                    await self._local_changed(epochs)
            except REDIS_ERRORS as exc:
                self._lost(exc)  # the full sync when it returns pushes what is still ours

    async def _local_changed(self, epochs: tuple[int, int]) -> None:
        before, self._epochs = self._epochs, epochs
        for index, table in enumerate(CREDENTIAL_TABLES):
            if before is not None and before[index] == epochs[index]:
                continue
            if table == TOKENS_TABLE:  # its set in memory follows only this store's own writes
                self._kick(await self._store.reload_provider_tokens())
            rows = await self._store.credential_rows(table)
            known = self._known[table]
            ours = [row for row in rows if supersedes(row, known.get(row.id))]
            if ours and self.up:
                await self._push(table, ours)

    async def _push(self, table: str, rows: list[CredentialRow]) -> None:
        if not rows:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(table_key(table), {row.id: encode(row, table) for row in rows})
            for start in range(0, len(rows), BATCH):
                ids = msgspec.json.encode([row.id for row in rows[start : start + BATCH]])
                pipe.xadd(
                    CHANGES_STREAM,
                    {"t": table, "i": ids, "f": self._instance},
                    trim_strategy=PureToken.MAXLEN,
                    threshold=CHANGES_MAXLEN,
                    trim_operator=PureToken.APPROXIMATELY,
                )
        self._known[table].update((row.id, row) for row in rows)
        self.pushed += len(rows)

    # Pull: the others' changes --------------------------------------------------------------

    async def _follow(self, blocking: Any) -> None:
        checked = -math.inf
        while True:
            if not self.up:
                await trio.sleep(RECONNECT_S)
                await self._join()
                continue
            if trio.current_time() >= self._synced_at + FULL_SYNC_S:
                await self._join()
                continue
            try:
                if trio.current_time() >= checked + SEEDED_CHECK_S:
                    checked = trio.current_time()
                    # Restarted empty, unseen (its marker went with everything else).
                    if not await self._redis.exists([seeded_key(self._instance)]):
                        await self._join()
                        continue
                answer = await blocking.xread(
                    {CHANGES_STREAM: self._stream_id}, count=BATCH, block=READ_BLOCK_MS
                )
                wanted: dict[str, set[str]] = {}
                for entries in (answer or {}).values():
                    for entry in entries:
                        self._stream_id = text(entry.identifier)
                        _wanted(entry.field_values, self._instance, wanted)
                async with self._lock:
                    for table, ids in wanted.items():
                        values = await self._redis.hmget(table_key(table), sorted(ids))
                        await self._merge(table, list(_decoded(values).values()))
            except REDIS_ERRORS as exc:
                self._lost(exc)

    async def _apply(self, table: str, rows: list[CredentialRow]) -> set[str]:
        """Write the rows that beat the store's; the ids written."""
        applied = await self._store.merge_credential_rows(table, rows, supersedes)
        known = self._known[table]
        for new, _ in applied:
            known[new.id] = new
        self.merged += len(applied)
        if table == TOKENS_TABLE:
            revoked = {
                new.id
                for new, old in applied
                if new.revoked_at is not None and (old is None or old.revoked_at is None)
            }
            self._kick(revoked)
        return {new.id for new, _ in applied}

    async def _merge(self, table: str, rows: list[CredentialRow]) -> None:
        """Take the rows that beat ours; push ours again where Redis holds a loser."""
        written = await self._apply(table, rows)
        # A row that did not beat ours: Redis may hold a loser (two pushes crossed).
        ours = await self._store.credential_rows(table) if len(written) < len(rows) else []
        by_id = {row.id: row for row in ours}
        behind = [
            by_id[row.id]
            for row in rows
            if row.id not in written and row.id in by_id and supersedes(by_id[row.id], row)
        ]
        await self._push(table, behind)

    def _kick(self, token_ids: set[str]) -> None:
        """Disconnect the providers here that registered with a token now revoked."""
        if not token_ids:
            return
        for entry in self._registry.connected():
            if entry.token_id in token_ids:
                entry.session.kick(CloseCode.POLICY, "provider token revoked")


def _wanted(fields: Any, instance: str, into: dict[str, set[str]]) -> None:
    """The (table, ids) one stream entry names, unless we wrote it ourselves."""
    try:
        if text(fields[b"f"]) == instance:
            return
        table = text(fields[b"t"])
        ids = msgspec.json.decode(fields[b"i"], type=list[str])
    except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
        log.warning("cluster: dropped a malformed credentials event")
        return
    if table in CREDENTIAL_TABLES:
        into.setdefault(table, set()).update(ids)


def _decoded(values: Iterable[Any]) -> dict[str, CredentialRow]:
    rows: dict[str, CredentialRow] = {}
    for value in values:
        if value is None:
            continue
        try:
            row = decode(value)
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
            log.warning("cluster: dropped a malformed credential row")
            continue
        rows[row.id] = row
    return rows
