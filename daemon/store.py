"""The daemon's SQLite store: schema migrations, provider tokens and consumer API keys.

The `usage` table is the usage ledger's (daemon/accounts/), which writes it on a connection of
its own; the store only creates it.

One connection, owned by the `Store` that `open_store` yields, lives in
`<DINFER_DATA_DIR>/dinfer.sqlite3` in WAL mode. Every statement runs in a Trio worker thread
(`trio.to_thread.run_sync`); a `trio.Lock` lets one thread use the connection at a time. The
one exception is a second, read-only-in-practice connection that only answers
`PRAGMA data_version` (below).

Secrets (provider tokens `dpt_...`, API keys `dk_...`) are shown once, when issued; the database
keeps only their SHA-256 hex digests. The digests of live secrets are also cached in memory
(loaded at open, updated on create and revoke), so the `lookup_*` methods on the request hot path
are plain synchronous methods with no thread hop.

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

The schema is `MIGRATIONS`, applied in order; the `schema_version` table records which have
run, so reopening applies only the new ones. Adding a migration is appending a script.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import trio

DB_FILENAME: Final = "dinfer.sqlite3"
MAX_NAME_CHARS: Final = 200

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
class _Kind:
    """One table of hashed secrets and the shape of its ids and secrets."""

    table: str
    id_prefix: str
    secret_prefix: str


_PROVIDER_TOKENS: Final = _Kind(table="provider_tokens", id_prefix="pt_", secret_prefix="dpt_")
_API_KEYS: Final = _Kind(table="api_keys", id_prefix="key_", secret_prefix="dk_")
_KINDS: Final = (_PROVIDER_TOKENS, _API_KEYS)


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
        f"INSERT INTO {kind.table} (id, name, secret_hash, created_at) VALUES (?, ?, ?, ?)",
        (id_, name, digest, time.time()),
    )


def _mark_revoked(conn: sqlite3.Connection, kind: _Kind, id_: str) -> str | None:
    """Revoke a live row; return its hash, or None when unknown or already revoked."""
    row = conn.execute(
        f"UPDATE {kind.table} SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL "
        "RETURNING secret_hash",
        (time.time(), id_),
    ).fetchone()
    return None if row is None else str(row[0])


# The async store ---------------------------------------------------------------------------


class Store:
    """The daemon's persistent state. Get one from `open_store`."""

    def __init__(self, conns: _Connections, live: dict[_Kind, dict[str, str]], path: Path) -> None:
        self.path = path  # the database file, for the usage ledger's own connections
        self._conn = conns.main
        self._watch = conns.watch
        self._lock = trio.Lock()
        # Per kind: SHA-256 hex digest of a live secret -> its id.
        self._live = live
        # The watch connection's data_version when the live API keys were read.
        self._keys_version = conns.version_at_load
        self._reloading: trio.Event | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            return await trio.to_thread.run_sync(fn, self._conn)

    async def _create(self, kind: _Kind, name: str) -> IssuedSecret:
        _check_name(name)
        issued = IssuedSecret(
            id=kind.id_prefix + secrets.token_hex(6),
            secret=kind.secret_prefix + secrets.token_urlsafe(32),
        )
        digest = hash_secret(issued.secret)
        await self._run(lambda conn: _insert(conn, kind, issued.id, name, digest))
        self._live[kind][digest] = issued.id
        return issued

    async def _revoke(self, kind: _Kind, id_: str) -> bool:
        digest = await self._run(lambda conn: _mark_revoked(conn, kind, id_))
        if digest is None:
            return False
        self._live[kind].pop(digest, None)
        return True

    def _lookup(self, kind: _Kind, secret: str) -> str | None:
        # A dict probe on the digest leaks nothing useful about the secret through timing.
        return self._live[kind].get(hash_secret(secret))

    async def create_provider_token(self, name: str) -> IssuedSecret:
        """Issue a provider token (`dpt_...`); raise ValueError for a bad name."""
        return await self._create(_PROVIDER_TOKENS, name)

    async def revoke_provider_token(self, id: str) -> bool:
        """Revoke a token by id; False when it is unknown or already revoked."""
        return await self._revoke(_PROVIDER_TOKENS, id)

    def lookup_provider_token(self, secret: str) -> str | None:
        """The id of the live token `secret`, else None. Synchronous: served from memory."""
        return self._lookup(_PROVIDER_TOKENS, secret)

    async def create_api_key(self, name: str) -> IssuedSecret:
        """Issue a consumer API key (`dk_...`); raise ValueError for a bad name."""
        return await self._create(_API_KEYS, name)

    async def revoke_api_key(self, id: str) -> bool:
        """Revoke a key by id; False when it is unknown or already revoked."""
        return await self._revoke(_API_KEYS, id)

    def lookup_api_key(self, secret: str) -> str | None:
        """The id of the live key `secret`, else None. Synchronous: served from memory."""
        return self._lookup(_API_KEYS, secret)

    async def find_api_key(self, secret: str) -> str | None:
        """lookup_api_key, and on a miss the database, if it changed since the keys were read.

        Finds keys that `dinfer keys create` wrote from another process without a restart;
        hits, and misses while nothing changed, never leave memory (see the module docstring).
        """
        digest = hash_secret(secret)
        found = self._live[_API_KEYS].get(digest)
        if found is None and self._keys_may_be_stale():
            await self._reload_api_keys()
            found = self._live[_API_KEYS].get(digest)
        return found

    def _keys_may_be_stale(self) -> bool:
        version = self._keys_version
        return version is None or _data_version(self._watch) != version

    async def _reload_api_keys(self) -> None:
        if self._reloading is not None:  # one reload answers every miss that waits for it
            await self._reloading.wait()
            return
        self._reloading = done = trio.Event()
        try:
            # Read before the keys: a commit in between shows as a change next time.
            version = _data_version(self._watch)
            self._live[_API_KEYS] = await self._run(lambda conn: _live_hashes(conn, _API_KEYS))
            self._keys_version = version
        finally:
            self._reloading = None
            done.set()


@dataclass(frozen=True, slots=True)
class _Connections:
    main: sqlite3.Connection  # every statement, in worker threads, one at a time
    watch: sqlite3.Connection  # PRAGMA data_version only, on the Trio thread
    version_at_load: int | None


def _open(path: Path) -> tuple[_Connections, dict[_Kind, dict[str, str]]]:
    conn = _connect(path)
    try:
        watch = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    except BaseException:
        conn.close()
        raise
    try:
        version = _data_version(watch)
        conns = _Connections(conn, watch, version)
        return conns, {kind: _live_hashes(conn, kind) for kind in _KINDS}
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
    conns, live = await trio.to_thread.run_sync(_open, path)
    try:
        yield Store(conns, live, path)
    finally:
        # Closing checkpoints the WAL; it must finish even when the owner is being cancelled.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close, conns)
