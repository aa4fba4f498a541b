"""The daemon's SQLite store: schema migrations, provider tokens and consumer API keys.

The `usage` table is the usage ledger's (daemon/accounts/), which writes it on a connection of
its own; the store only creates it.

One connection, owned by the `Store` that `open_store` yields, lives in
`<DINFER_DATA_DIR>/dinfer.sqlite3` in WAL mode. Every statement runs in a Trio worker thread
(`trio.to_thread.run_sync`); a `trio.Lock` lets one thread use the connection at a time. The
one exception is a second, read-only-in-practice connection that only answers
`PRAGMA data_version` and reads `api_keys_epoch` (below).

Secrets (provider tokens `dpt_...`, API keys `dk_...`) are shown once, when issued; the database
keeps only their SHA-256 hex digests. The digests of live secrets are also cached in memory
(loaded at open, updated on create and revoke), so the `lookup_*` methods on the request hot path
are plain synchronous methods with no thread hop. Provider tokens are reread, when
`data_version` (below) moved, once per new provider connection (`refresh_provider_tokens`):
registrations are rare, and a token another process issued or revoked must count at once.

Unknown API keys are as cheap as known ones. `dinfer keys create` writes keys from another
process while the daemon runs, so a key missing from memory may still be in the database;
but if nothing was committed since the in-memory set was loaded, the set is the database's
whole truth and a miss is final, with no thread hop and no lock. What tells us is SQLite's
`PRAGMA data_version`, asked of a second connection (`_watch`) that does nothing else: its
value changes exactly when another connection (the CLI's, or our own writer) commits. A call
reads the WAL index in shared memory, a few microseconds with no disk I/O, so it runs on the
Trio thread; the watch connection never waits (busy timeout 0) and a failed call counts as a
change. After a change, the first miss reloads the live key set in a worker thread (misses
meanwhile wait for that one reload) and the set is authoritative again. Files' stat would be
cheaper still but is not exact: a WAL rewritten in place within one timestamp tick keeps its
size and mtime. A separate negative cache of unknown digests would add nothing: its entries
would need the same freshness check, and the live set bounds memory by the real keys however
many distinct bad ones arrive.

API keys may carry limits (`KeyLimits`: rate, tokens, concurrency, models, expiry). The live
keys' limits are cached beside their digests (id -> limits, only for keys that have any), loaded
and reloaded with them, so the request path reads a key's limits with one dict probe. Because
a hit must see a change too (`dinfer keys set` or `rotate` from another process), a hit asks
`data_version` as well, at most every `HIT_RECHECK_S` (10 ms): the question costs tens of
microseconds, too much for every request of a busy daemon, and within 10 ms is at once for an
operator. Changes made through this `Store` (the admin API) are in memory at once. Commits to
other tables (the usage ledger's) move `data_version` too: a trigger-kept counter,
`api_keys_epoch`, tells the reload whether `api_keys` itself changed; the watch connection reads
that one row first, on the Trio thread (a WAL read, microseconds), and only a changed epoch
sends the reload to a worker thread.

In a cluster both tables replicate (daemon/cluster/credentials.py): every write stamps the
row's `updated_at`; `credential_epochs` (a trigger-kept counter per table, read like
`api_keys_epoch`) tells the sync that something changed, `credential_rows` reads a table whole,
and `merge_credential_rows` writes the rows that win and swaps the live sets in memory in the
same step, so a merged key authenticates (or a revoked one is refused) at once.

The schema is `MIGRATIONS`, applied in order; the `schema_version` table records which have
run, so reopening applies only the new ones. Adding a migration is appending a script.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

from daemon.key_policy import COUNT_FIELDS, LIMIT_FIELDS, NO_LIMITS, KeyLimits, format_time

DB_FILENAME: Final = "dinfer.sqlite3"
MAX_NAME_CHARS: Final = 200
# A hit asks data_version at most this often (a miss, every time): a change by another
# process reaches known keys within it, and a busy daemon pays the question ~100 times a second.
HIT_RECHECK_S: Final = 0.01

# Append only: an applied migration is never edited, its number is its position (1-based).
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE provider_tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        secret_hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        secret_hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    """,
    """
    ALTER TABLE api_keys ADD COLUMN rpm INTEGER;
    ALTER TABLE api_keys ADD COLUMN tpm INTEGER;
    ALTER TABLE api_keys ADD COLUMN daily_tokens INTEGER;
    ALTER TABLE api_keys ADD COLUMN max_concurrency INTEGER;
    ALTER TABLE api_keys ADD COLUMN allowed_models TEXT;
    ALTER TABLE api_keys ADD COLUMN expires_at REAL;
    CREATE TABLE api_keys_epoch (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
    INSERT INTO api_keys_epoch VALUES (1, 0);
    CREATE TRIGGER api_keys_inserted AFTER INSERT ON api_keys
        BEGIN UPDATE api_keys_epoch SET n = n + 1; END;
    CREATE TRIGGER api_keys_updated AFTER UPDATE ON api_keys
        BEGIN UPDATE api_keys_epoch SET n = n + 1; END;
    CREATE TRIGGER api_keys_deleted AFTER DELETE ON api_keys
        BEGIN UPDATE api_keys_epoch SET n = n + 1; END;
    """,
    # The usage ledger (daemon/accounts/ledger.py): a row is open while `outcome` is NULL.
    """
    CREATE TABLE usage (
        request_id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        route TEXT NOT NULL,
        model TEXT,
        shape TEXT,
        status INTEGER,
        outcome TEXT,
        provider_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        providers TEXT NOT NULL DEFAULT '',
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens INTEGER NOT NULL DEFAULT 0,
        tokens_estimated INTEGER NOT NULL DEFAULT 0,
        ttft_ms REAL,
        duration_ms REAL,
        started_at REAL NOT NULL,
        ended_at REAL
    );
    CREATE INDEX usage_started_at ON usage (started_at);
    CREATE INDEX usage_key_id ON usage (key_id, started_at);
    CREATE INDEX usage_open ON usage (request_id) WHERE outcome IS NULL;
    """,
    # Replication across a cluster (daemon/cluster/credentials.py): when a row last changed
    # (wall clock, set by every write), and a change counter for provider_tokens as for keys.
    """
    ALTER TABLE api_keys ADD COLUMN updated_at REAL NOT NULL DEFAULT 0;
    ALTER TABLE provider_tokens ADD COLUMN updated_at REAL NOT NULL DEFAULT 0;
    UPDATE api_keys SET updated_at = coalesce(revoked_at, created_at);
    UPDATE provider_tokens SET updated_at = coalesce(revoked_at, created_at);
    CREATE TABLE provider_tokens_epoch (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
    INSERT INTO provider_tokens_epoch VALUES (1, 0);
    CREATE TRIGGER provider_tokens_inserted AFTER INSERT ON provider_tokens
        BEGIN UPDATE provider_tokens_epoch SET n = n + 1; END;
    CREATE TRIGGER provider_tokens_updated AFTER UPDATE ON provider_tokens
        BEGIN UPDATE provider_tokens_epoch SET n = n + 1; END;
    CREATE TRIGGER provider_tokens_deleted AFTER DELETE ON provider_tokens
        BEGIN UPDATE provider_tokens_epoch SET n = n + 1; END;
    """,
)

_SCHEMA_VERSION_TABLE: Final = """
    CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER PRIMARY KEY,
        applied_at REAL NOT NULL
    )
"""

T = TypeVar("T")


class StoreError(Exception):
    """The database cannot be used by this version of dinfer."""


@dataclass(frozen=True, slots=True)
class IssuedSecret:
    """A freshly issued token or key; `secret` exists only here, never in the database."""

    id: str
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SecretRecord:
    """A token or key as listed: never its secret nor its digest."""

    id: str
    name: str
    created_at: float
    revoked_at: float | None

    def to_json(self) -> dict[str, Any]:
        """As the admin API and `--json` show it (times in RFC 3339)."""
        return {
            "id": self.id,
            "name": self.name,
            "created_at": format_time(self.created_at),
            "revoked_at": format_time(self.revoked_at),
        }


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A consumer API key as listed, with its limits."""

    id: str
    name: str
    created_at: float
    revoked_at: float | None
    limits: KeyLimits

    def to_json(self) -> dict[str, Any]:
        """As the admin API and `--json` show it: the limits flat beside the times."""
        record = SecretRecord(self.id, self.name, self.created_at, self.revoked_at)
        return {**record.to_json(), **self.limits.to_json()}


@dataclass(frozen=True, slots=True)
class LiveKeys:
    """The live API keys, as the request path reads them."""

    ids: dict[str, str]  # SHA-256 hex digest of the secret -> key id
    limits: dict[str, KeyLimits]  # key id -> limits, only for keys that have any
    epoch: int  # api_keys_epoch when read: bumped by a trigger on every change to api_keys


@dataclass(frozen=True, slots=True)
class _Kind:
    """One table of hashed secrets and the shape of its ids and secrets."""

    table: str
    id_prefix: str
    secret_prefix: str


_PROVIDER_TOKENS: Final = _Kind(table="provider_tokens", id_prefix="pt_", secret_prefix="dpt_")
_API_KEYS: Final = _Kind(table="api_keys", id_prefix="key_", secret_prefix="dk_")


def database_path(data_dir: Path) -> Path:
    return data_dir / DB_FILENAME


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_name(name: str) -> None:
    if not name.strip():
        raise ValueError("name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"name must be at most {MAX_NAME_CHARS} characters, got {len(name)}")


# Synchronous database work, run in a worker thread ------------------------------------------


def _data_version(conn: sqlite3.Connection) -> int | None:
    """SQLite's change counter for commits by other connections; None when it cannot tell."""
    try:
        return int(conn.execute("PRAGMA data_version").fetchone()[0])
    except sqlite3.Error:
        return None


def _watched_keys_epoch(conn: sqlite3.Connection) -> int | None:
    """api_keys_epoch as the watch connection reads it; None when it cannot tell (busy)."""
    try:
        rows = conn.execute("SELECT n FROM api_keys_epoch").fetchall()  # all: ends the read
    except sqlite3.Error:
        return None
    return int(rows[0][0]) if rows else None


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Autocommit mode: transactions are explicit, so a migration is exactly one transaction.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0])


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute(_SCHEMA_VERSION_TABLE)
    current = _schema_version(conn)
    if current > len(MIGRATIONS):
        raise StoreError(
            f"database schema version {current} is newer than this dinfer supports "
            f"({len(MIGRATIONS)}); upgrade dinfer"
        )
    for version in range(current + 1, len(MIGRATIONS) + 1):
        _apply_migration(conn, version)


def _apply_migration(conn: sqlite3.Connection, version: int) -> None:
    # The version row is claimed first, inside the migration's transaction: a second daemon
    # opening the same file concurrently fails the claim and skips, instead of re-running DDL.
    script = (
        "BEGIN IMMEDIATE;\n"
        f"INSERT INTO schema_version (version, applied_at) VALUES ({version}, {time.time()!r});\n"
        f"{MIGRATIONS[version - 1]}\n"
        "COMMIT;"
    )
    try:
        conn.executescript(script)
    except sqlite3.IntegrityError:
        _rollback(conn)
        if _schema_version(conn) < version:
            raise
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _live_hashes(conn: sqlite3.Connection, kind: _Kind) -> dict[str, str]:
    rows = conn.execute(f"SELECT secret_hash, id FROM {kind.table} WHERE revoked_at IS NULL")
    return dict(rows.fetchall())


def _insert(conn: sqlite3.Connection, kind: _Kind, id_: str, name: str, digest: str) -> None:
    conn.execute(
        f"INSERT INTO {kind.table} (id, name, secret_hash, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (id_, name, digest, *[time.time()] * 2),
    )


_KEY_COLUMNS: Final = "id, name, created_at, revoked_at, " + ", ".join(LIMIT_FIELDS)


def _limit_columns(limits: KeyLimits) -> tuple[Any, ...]:
    models = limits.allowed_models
    return (
        *(getattr(limits, name) for name in COUNT_FIELDS),
        None if models is None else json.dumps(sorted(models)),
        limits.expires_at,
    )


def _limits_of(row: tuple[Any, ...]) -> KeyLimits:
    """KeyLimits from the limit columns, in LIMIT_FIELDS order."""
    rpm, tpm, daily_tokens, max_concurrency, models, expires_at = row
    return KeyLimits(
        rpm=rpm,
        tpm=tpm,
        daily_tokens=daily_tokens,
        max_concurrency=max_concurrency,
        allowed_models=None if models is None else frozenset(json.loads(models)),
        expires_at=expires_at,
    )


def _key_record(row: tuple[Any, ...]) -> KeyRecord:
    id_, name, created_at, revoked_at, *limits = row
    return KeyRecord(id_, name, created_at, revoked_at, _limits_of(tuple(limits)))


def _insert_key(
    conn: sqlite3.Connection, id_: str, name: str, digest: str, limits: KeyLimits
) -> None:
    marks = ", ".join("?" * (5 + len(LIMIT_FIELDS)))
    conn.execute(
        "INSERT INTO api_keys (id, name, secret_hash, created_at, updated_at, "
        f"{', '.join(LIMIT_FIELDS)}) VALUES ({marks})",
        (id_, name, digest, *[time.time()] * 2, *_limit_columns(limits)),
    )


def _live_keys(conn: sqlite3.Connection) -> LiveKeys:
    conn.execute("BEGIN")  # the epoch and the rows from one snapshot
    try:
        return _read_live_keys(conn)
    finally:
        conn.execute("COMMIT")


def _keys_epoch(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT n FROM api_keys_epoch").fetchone()[0])


def _live_keys_since(conn: sqlite3.Connection, epoch: int) -> LiveKeys | None:
    """The live keys, or None when nothing in api_keys changed since `epoch` (another table's
    commit, such as usage rows, moves data_version too)."""
    return None if _keys_epoch(conn) == epoch else _live_keys(conn)


def _read_live_keys(conn: sqlite3.Connection) -> LiveKeys:
    epoch = _keys_epoch(conn)
    rows = conn.execute(
        f"SELECT secret_hash, id, {', '.join(LIMIT_FIELDS)} FROM api_keys WHERE revoked_at IS NULL"
    ).fetchall()
    ids = {digest: id_ for digest, id_, *_ in rows}
    limits = {id_: _limits_of(tuple(rest)) for _, id_, *rest in rows}
    return LiveKeys(ids, {id_: lim for id_, lim in limits.items() if not lim.empty}, epoch)


def _list(conn: sqlite3.Connection, kind: _Kind) -> list[SecretRecord]:
    rows = conn.execute(
        f"SELECT id, name, created_at, revoked_at FROM {kind.table} ORDER BY created_at, id"
    )
    return [SecretRecord(*row) for row in rows.fetchall()]


def _list_keys(conn: sqlite3.Connection) -> list[KeyRecord]:
    rows = conn.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id")
    return [_key_record(row) for row in rows.fetchall()]


def _get_key(conn: sqlite3.Connection, id_: str) -> KeyRecord | None:
    row = conn.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (id_,)).fetchone()
    return None if row is None else _key_record(row)


# A change's `updated_at`: now, but always past the row's last change (that may have come from
# another machine whose clock runs ahead), so a change made here wins over what it changed.
_TOUCH: Final = "updated_at = max(?, updated_at + 0.000001)"


def _transaction(conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
    """`fn` in one write transaction, so a concurrent CLI cannot interleave with it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
    except BaseException:
        _rollback(conn)
        raise
    conn.execute("COMMIT")
    return result


def _update_key(
    conn: sqlite3.Connection, id_: str, name: str | None, changes: Mapping[str, Any]
) -> KeyRecord | None:
    """Apply limit changes (and a new name) to a live key; None when unknown or revoked."""

    def update() -> KeyRecord | None:
        old = _get_key(conn, id_)
        if old is None or old.revoked_at is not None:
            return None
        new = KeyRecord(
            old.id, name or old.name, old.created_at, None, old.limits.with_changes(changes)
        )
        sets = ", ".join(f"{column} = ?" for column in ("name", *LIMIT_FIELDS))
        conn.execute(
            f"UPDATE api_keys SET {sets}, {_TOUCH} WHERE id = ?",
            (new.name, *_limit_columns(new.limits), time.time(), id_),
        )
        return new

    return _transaction(conn, update)


def _rehash(conn: sqlite3.Connection, id_: str, digest: str) -> str | None:
    """Give a live key a new secret digest; its old digest, or None when unknown or revoked."""

    def rehash() -> str | None:
        row = conn.execute(
            "SELECT secret_hash FROM api_keys WHERE id = ? AND revoked_at IS NULL", (id_,)
        ).fetchone()
        if row is None:
            return None
        conn.execute(
            f"UPDATE api_keys SET secret_hash = ?, {_TOUCH} WHERE id = ?",
            (digest, time.time(), id_),
        )
        return str(row[0])

    return _transaction(conn, rehash)


def _mark_revoked(conn: sqlite3.Connection, kind: _Kind, id_: str) -> str | None:
    """Revoke a live row; return its hash, or None when unknown or already revoked."""
    row = conn.execute(
        f"UPDATE {kind.table} SET revoked_at = ?, {_TOUCH} WHERE id = ? AND revoked_at IS NULL "
        "RETURNING secret_hash",
        (*[time.time()] * 2, id_),
    ).fetchone()
    return None if row is None else str(row[0])


# Whole rows, for replication across a cluster (daemon/cluster/credentials.py) --------------

CREDENTIAL_TABLES: Final = (_API_KEYS.table, _PROVIDER_TOKENS.table)
_ROW_COLUMNS: Final = "id, name, secret_hash, created_at, revoked_at, updated_at"


@dataclass(frozen=True, slots=True)
class CredentialRow:
    """One row of api_keys or provider_tokens as it replicates: the digest, never a secret;
    `limits` is NO_LIMITS for a provider token."""

    id: str
    name: str
    secret_hash: str
    created_at: float
    revoked_at: float | None
    updated_at: float
    limits: KeyLimits = NO_LIMITS


# Whether `incoming` should replace `current` (None: no row of that id here).
Supersedes = Callable[[CredentialRow, "CredentialRow | None"], bool]


def _columns(table: str) -> str:
    return _ROW_COLUMNS + ("".join(f", {f}" for f in LIMIT_FIELDS) if table == "api_keys" else "")


def _credential_row(table: str, row: tuple[Any, ...]) -> CredentialRow:
    id_, name, digest, created_at, revoked_at, updated_at, *limits = row
    found = _limits_of(tuple(limits)) if table == "api_keys" else NO_LIMITS
    return CredentialRow(id_, name, digest, created_at, revoked_at, updated_at, found)


def _credential_rows(conn: sqlite3.Connection, table: str) -> list[CredentialRow]:
    rows = conn.execute(f"SELECT {_columns(table)} FROM {table}").fetchall()
    return [_credential_row(table, row) for row in rows]


Replaced = list[tuple[CredentialRow, CredentialRow | None]]  # (new, old) per row written


def _live_of(conn: sqlite3.Connection, table: str) -> LiveKeys | dict[str, str]:
    return _read_live_keys(conn) if table == "api_keys" else _live_hashes(conn, _PROVIDER_TOKENS)


def _merge_rows(
    conn: sqlite3.Connection, table: str, rows: list[CredentialRow], supersedes: Supersedes
) -> tuple[Replaced, LiveKeys | dict[str, str]]:
    """Upsert the rows that supersede ours, in one transaction; (what replaced what, the
    table's live set as it now is)."""
    columns = _columns(table)
    names = [c.strip() for c in columns.split(",")]
    upsert = (
        f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(names))}) "
        f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{n} = excluded.{n}' for n in names[1:])}"
    )

    def merge() -> tuple[Replaced, LiveKeys | dict[str, str]]:
        applied: Replaced = []
        for row in rows:
            found = conn.execute(f"SELECT {columns} FROM {table} WHERE id = ?", (row.id,))
            current = found.fetchone()
            old = None if current is None else _credential_row(table, current)
            if not supersedes(row, old):
                continue
            clash = conn.execute(
                f"SELECT 1 FROM {table} WHERE secret_hash = ? AND id != ?",
                (row.secret_hash, row.id),
            ).fetchone()
            if clash is not None:
                continue  # another id holds this digest: never two keys for one secret
            values: tuple[Any, ...] = (
                row.id,
                row.name,
                row.secret_hash,
                row.created_at,
                row.revoked_at,
                row.updated_at,
            )
            if table == "api_keys":
                values += _limit_columns(row.limits)
            conn.execute(upsert, values)
            applied.append((row, old))
        return applied, _live_of(conn, table)

    return _transaction(conn, merge)


def _epochs(conn: sqlite3.Connection) -> tuple[int, int] | None:
    """(api_keys_epoch, provider_tokens_epoch) as the watch connection reads them; None when
    it cannot tell (busy)."""
    try:
        rows = conn.execute(
            "SELECT (SELECT n FROM api_keys_epoch), (SELECT n FROM provider_tokens_epoch)"
        ).fetchall()
    except sqlite3.Error:
        return None
    return (int(rows[0][0]), int(rows[0][1])) if rows else None


# The async store ---------------------------------------------------------------------------


class Store:
    """The daemon's persistent state. Get one from `open_store`."""

    def __init__(
        self, conns: _Connections, tokens: dict[str, str], keys: LiveKeys, path: Path
    ) -> None:
        self.path = path  # the database file, for the usage ledger's own connections
        self._conn = conns.main
        self._watch = conns.watch
        self._lock = trio.Lock()
        # Per kind: SHA-256 hex digest of a live secret -> its id.
        self._live = {_PROVIDER_TOKENS: tokens, _API_KEYS: keys.ids}
        self._key_limits = keys.limits  # live key id -> its limits, for keys that have any
        self._keys_epoch = keys.epoch
        self._hits_checked_at = -math.inf  # when a hit last asked data_version
        # The watch connection's data_version when the live API keys were read.
        self._keys_version = conns.version_at_load
        self._tokens_version = conns.version_at_load  # the same, for the provider tokens
        self._reloading: trio.Event | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            return await trio.to_thread.run_sync(fn, self._conn)

    async def _create(self, kind: _Kind, name: str, limits: KeyLimits = NO_LIMITS) -> IssuedSecret:
        _check_name(name)
        issued = IssuedSecret(
            id=kind.id_prefix + secrets.token_hex(6),
            secret=kind.secret_prefix + secrets.token_urlsafe(32),
        )
        digest = hash_secret(issued.secret)
        if kind is _API_KEYS:
            await self._run(lambda conn: _insert_key(conn, issued.id, name, digest, limits))
            self._set_limits(issued.id, limits)
        else:
            await self._run(lambda conn: _insert(conn, kind, issued.id, name, digest))
        self._live[kind][digest] = issued.id
        return issued

    async def _revoke(self, kind: _Kind, id_: str) -> bool:
        digest = await self._run(lambda conn: _mark_revoked(conn, kind, id_))
        if digest is None:
            return False
        self._live[kind].pop(digest, None)
        if kind is _API_KEYS:
            self._key_limits.pop(id_, None)
        return True

    def _lookup(self, kind: _Kind, secret: str) -> str | None:
        # A dict probe on the digest leaks nothing useful about the secret through timing.
        return self._live[kind].get(hash_secret(secret))

    def _set_limits(self, id_: str, limits: KeyLimits) -> None:
        if limits.empty:
            self._key_limits.pop(id_, None)
        else:
            self._key_limits[id_] = limits

    async def create_provider_token(self, name: str) -> IssuedSecret:
        """Issue a provider token (`dpt_...`); raise ValueError for a bad name."""
        return await self._create(_PROVIDER_TOKENS, name)

    async def revoke_provider_token(self, id: str) -> bool:
        """Revoke a token by id; False when it is unknown or already revoked."""
        return await self._revoke(_PROVIDER_TOKENS, id)

    def lookup_provider_token(self, secret: str) -> str | None:
        """The id of the live token `secret`, else None. Synchronous: served from memory, as
        fresh as the last `refresh_provider_tokens`."""
        return self._lookup(_PROVIDER_TOKENS, secret)

    async def refresh_provider_tokens(self) -> None:
        """Reread the live provider tokens if anything was committed since they were read.

        Called for each new provider connection (rare, unlike consumer requests), so a token
        that `dinfer tokens create` or `revoke` (another process), or a sibling `--workers`
        process's admin API, wrote is honoured by the next registration without a restart.
        Nothing changed: one `data_version` read on the Trio thread, no thread hop.
        """
        version = _data_version(self._watch)
        if version is not None and version == self._tokens_version:
            return
        tokens = await self._run(lambda conn: _live_hashes(conn, _PROVIDER_TOKENS))
        self._live[_PROVIDER_TOKENS] = tokens
        self._tokens_version = version

    async def list_provider_tokens(self) -> list[SecretRecord]:
        """Every provider token, live and revoked, oldest first."""
        return await self._run(lambda conn: _list(conn, _PROVIDER_TOKENS))

    async def create_api_key(self, name: str, limits: KeyLimits = NO_LIMITS) -> IssuedSecret:
        """Issue a consumer API key (`dk_...`); raise ValueError for a bad name."""
        return await self._create(_API_KEYS, name, limits)

    async def revoke_api_key(self, id: str) -> bool:
        """Revoke a key by id; False when it is unknown or already revoked."""
        return await self._revoke(_API_KEYS, id)

    async def list_api_keys(self) -> list[KeyRecord]:
        """Every API key, live and revoked, oldest first, with its limits."""
        return await self._run(_list_keys)

    async def get_api_key(self, id: str) -> KeyRecord | None:
        return await self._run(lambda conn: _get_key(conn, id))

    async def update_api_key(
        self, id: str, changes: Mapping[str, Any], *, name: str | None = None
    ) -> KeyRecord | None:
        """Apply `changes` (from `key_policy.parse_changes`) to a live key's limits, and a new
        name if given; the key as it now is, or None when unknown or revoked."""
        if name is not None:
            _check_name(name)
        record = await self._run(lambda conn: _update_key(conn, id, name, changes))
        if record is not None:
            self._set_limits(id, record.limits)
        return record

    async def rotate_api_key(self, id: str) -> IssuedSecret | None:
        """A new secret for a live key, same id and limits; the old secret is dead on return.
        None when the key is unknown or revoked."""
        issued = IssuedSecret(id=id, secret=_API_KEYS.secret_prefix + secrets.token_urlsafe(32))
        digest = hash_secret(issued.secret)
        old = await self._run(lambda conn: _rehash(conn, id, digest))
        if old is None:
            return None
        self._live[_API_KEYS].pop(old, None)
        self._live[_API_KEYS][digest] = id
        return issued

    # Replication (daemon/cluster/credentials.py) ---------------------------------------------

    def credential_epochs(self) -> tuple[int, int] | None:
        """Change counters of (api_keys, provider_tokens), moved by any process's commit to
        that table; None when the database is busy (ask again). Microseconds, no thread hop."""
        return _epochs(self._watch)

    async def credential_rows(self, table: str) -> list[CredentialRow]:
        """Every row of `table` (one of CREDENTIAL_TABLES), live and revoked."""
        return await self._run(lambda conn: _credential_rows(conn, table))

    async def merge_credential_rows(
        self, table: str, rows: list[CredentialRow], supersedes: Supersedes
    ) -> Replaced:
        """Write the `rows` that supersede this store's (by `supersedes`) in one transaction;
        the live set in memory follows at once. (new, old) for each row written."""
        applied, live = await self._run(lambda conn: _merge_rows(conn, table, rows, supersedes))
        self._take_live(table, live)
        return applied

    async def reload_provider_tokens(self) -> set[str]:
        """Reread the live provider tokens (another process, `dinfer tokens` or a sibling
        worker, may have changed them); the ids live before and not now."""
        live = await self._run(lambda conn: _live_hashes(conn, _PROVIDER_TOKENS))
        before = set(self._live[_PROVIDER_TOKENS].values())
        self._take_live(_PROVIDER_TOKENS.table, live)
        return before - set(live.values())

    def _take_live(self, table: str, live: LiveKeys | dict[str, str]) -> None:
        if isinstance(live, LiveKeys):
            self._live[_API_KEYS], self._key_limits = live.ids, live.limits
            self._keys_epoch = live.epoch
        else:
            self._live[_PROVIDER_TOKENS] = live

    def lookup_api_key(self, secret: str) -> str | None:
        """The id of the live key `secret`, else None. Synchronous: served from memory."""
        return self._lookup(_API_KEYS, secret)

    def api_key_limits(self, id: str) -> KeyLimits | None:
        """The live key's limits, None when it has none. One dict probe."""
        return self._key_limits.get(id)

    async def find_api_key(self, secret: str) -> str | None:
        """lookup_api_key, first reloading the live keys if the database changed since.

        Finds keys that `dinfer keys create` wrote from another process without a restart;
        sees a `dinfer keys set`, `rotate` or `revoke` within HIT_RECHECK_S; while nothing
        changed, hits and misses never leave memory (see the module docstring).
        """
        digest = hash_secret(secret)
        found = self._live[_API_KEYS].get(digest)
        if (found is None or self._hit_recheck_due()) and self._keys_may_be_stale():
            await self._reload_api_keys()
            found = self._live[_API_KEYS].get(digest)
        return found

    def _hit_recheck_due(self) -> bool:
        now = trio.current_time()
        if now - self._hits_checked_at < HIT_RECHECK_S:
            return False
        self._hits_checked_at = now
        return True

    def _keys_may_be_stale(self) -> bool:
        version = self._keys_version
        return version is None or _data_version(self._watch) != version

    async def _reload_api_keys(self) -> None:
        if self._reloading is not None:  # one reload answers every lookup that waits for it
            await self._reloading.wait()
            return
        self._reloading = done = trio.Event()
        try:
            # Read before the keys: a commit in between shows as a change next time.
            version = _data_version(self._watch)
            epoch = self._keys_epoch
            if version is not None and _watched_keys_epoch(self._watch) == epoch:
                # Only another table moved (the ledger's usage rows, on almost every recheck of
                # a busy daemon): one row read here says so, without a worker thread's hop.
                self._keys_version = version
                return
            keys = await self._run(lambda conn: _live_keys_since(conn, epoch))
            if keys is not None:
                self._live[_API_KEYS], self._key_limits = keys.ids, keys.limits
                self._keys_epoch = keys.epoch
            self._keys_version = version
        finally:
            self._reloading = None
            done.set()


@dataclass(frozen=True, slots=True)
class _Connections:
    main: sqlite3.Connection  # every statement, in worker threads, one at a time
    watch: sqlite3.Connection  # data_version and api_keys_epoch only, on the Trio thread
    version_at_load: int | None


def _open(path: Path) -> tuple[_Connections, dict[str, str], LiveKeys]:
    conn = _connect(path)
    try:
        watch = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    except BaseException:
        conn.close()
        raise
    try:
        version = _data_version(watch)
        conns = _Connections(conn, watch, version)
        return conns, _live_hashes(conn, _PROVIDER_TOKENS), _live_keys(conn)
    except BaseException:
        watch.close()
        conn.close()
        raise


def _close(conns: _Connections) -> None:
    conns.watch.close()
    conns.main.close()


@asynccontextmanager
async def open_store(data_dir: Path) -> AsyncIterator[Store]:
    """Open (creating if needed) `<data_dir>/dinfer.sqlite3`, migrate it, close it at exit."""
    path = database_path(data_dir)
    conns, tokens, keys = await trio.to_thread.run_sync(_open, path)
    try:
        yield Store(conns, tokens, keys, path)
    finally:
        # Closing checkpoints the WAL; it must finish even when the owner is being cancelled.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close, conns)
