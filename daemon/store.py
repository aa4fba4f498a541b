"""The daemon's SQLite store: schema migrations, provider tokens and consumer API keys.

One connection, owned by the `Store` that `open_store` yields, lives in
`<DINFER_DATA_DIR>/dinfer.sqlite3` in WAL mode. Every statement runs in a Trio worker thread
(`trio.to_thread.run_sync`); a `trio.Lock` lets one thread use the connection at a time.

Secrets (provider tokens `dpt_...`, API keys `dk_...`) are shown once, when issued; the database
keeps only their SHA-256 hex digests. The digests of live secrets are also cached in memory
(loaded at open, updated on create and revoke), so the `lookup_*` methods on the request hot path
are plain synchronous methods with no thread hop.

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


def _find_live(conn: sqlite3.Connection, kind: _Kind, digest: str) -> str | None:
    row = conn.execute(
        f"SELECT id FROM {kind.table} WHERE secret_hash = ? AND revoked_at IS NULL", (digest,)
    ).fetchone()
    return None if row is None else str(row[0])


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

    def __init__(self, conn: sqlite3.Connection, live: dict[_Kind, dict[str, str]]) -> None:
        self._conn = conn
        self._lock = trio.Lock()
        # Per kind: SHA-256 hex digest of a live secret -> its id.
        self._live = live

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
        """lookup_api_key, falling back to the database on a miss.

        `dinfer keys create` writes keys from another process while the daemon runs; the
        fallback finds them (and caches them) without a restart. Hits never leave memory.
        """
        found = self._lookup(_API_KEYS, secret)
        if found is None and secret:
            digest = hash_secret(secret)
            found = await self._run(lambda conn: _find_live(conn, _API_KEYS, digest))
            if found is not None:
                self._live[_API_KEYS][digest] = found
        return found


def _open(path: Path) -> tuple[sqlite3.Connection, dict[_Kind, dict[str, str]]]:
    conn = _connect(path)
    try:
        return conn, {kind: _live_hashes(conn, kind) for kind in _KINDS}
    except BaseException:
        conn.close()
        raise


@asynccontextmanager
async def open_store(data_dir: Path) -> AsyncIterator[Store]:
    """Open (creating if needed) `<data_dir>/dinfer.sqlite3`, migrate it, close it at exit."""
    conn, live = await trio.to_thread.run_sync(_open, database_path(data_dir))
    try:
        yield Store(conn, live)
    finally:
        # Closing checkpoints the WAL; it must finish even when the owner is being cancelled.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close)
