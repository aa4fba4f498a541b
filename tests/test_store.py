"""The SQLite store: migrations run once, secrets are issued, looked up, revoked, never kept."""

import hashlib
import re
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from daemon import store as store_module
from daemon.key_policy import KeyLimits
from daemon.store import HIT_RECHECK_S, MIGRATIONS, StoreError, database_path, open_store


def query(data_dir: Path, sql: str) -> list[Any]:
    """Read the database file the way an operator (or an attacker with the file) would."""
    with closing(sqlite3.connect(database_path(data_dir))) as conn:
        return conn.execute(sql).fetchall()


def files_bytes(data_dir: Path) -> bytes:
    """Every byte the store left on disk (the database, and its WAL if any)."""
    return b"".join(path.read_bytes() for path in data_dir.iterdir() if path.is_file())


async def test_open_creates_the_directory_and_applies_every_migration(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "state"
    async with open_store(data_dir):
        pass
    assert database_path(data_dir) == data_dir / "dinfer.sqlite3"
    versions = query(data_dir, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(n,) for n in range(1, len(MIGRATIONS) + 1)]


async def test_reopening_applies_nothing_twice(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        issued = await store.create_api_key("kept")
    before = query(tmp_path, "SELECT version, applied_at FROM schema_version")
    async with open_store(tmp_path) as store:
        assert store.lookup_api_key(issued.secret) == issued.id
    assert query(tmp_path, "SELECT version, applied_at FROM schema_version") == before


async def test_a_new_migration_is_applied_once_on_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(tmp_path):
        pass
    extra = "CREATE TABLE later (id INTEGER PRIMARY KEY); INSERT INTO later VALUES (7);"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, extra))
    for _ in range(2):
        async with open_store(tmp_path):
            pass
    assert query(tmp_path, "SELECT id FROM later") == [(7,)]
    assert query(tmp_path, "SELECT max(version) FROM schema_version") == [(len(MIGRATIONS) + 1,)]


async def test_a_failing_migration_leaves_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(tmp_path):
        pass
    broken = "CREATE TABLE half (id INTEGER); INSERT INTO missing VALUES (1);"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, broken))
    with pytest.raises(sqlite3.OperationalError, match="no such table: missing"):
        async with open_store(tmp_path):
            pass
    tables = query(tmp_path, "SELECT name FROM sqlite_master WHERE name = 'half'")
    assert tables == []
    assert query(tmp_path, "SELECT max(version) FROM schema_version") == [(len(MIGRATIONS),)]


def test_a_migration_another_opener_already_applied_is_skipped(tmp_path: Path) -> None:
    # The losing side of two daemons racing to migrate the same fresh file.
    with closing(store_module._connect(database_path(tmp_path))) as conn:
        store_module._apply_migration(conn, 1)
        assert not conn.in_transaction
        count = (len(MIGRATIONS),)
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == count


async def test_a_database_from_a_newer_dinfer_is_refused(tmp_path: Path) -> None:
    async with open_store(tmp_path):
        pass
    with closing(sqlite3.connect(database_path(tmp_path))) as conn, conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreError, match="newer than this dinfer supports"):
        async with open_store(tmp_path):
            pass


async def test_the_database_is_in_wal_mode(tmp_path: Path) -> None:
    async with open_store(tmp_path):
        assert query(tmp_path, "PRAGMA journal_mode") == [("wal",)]


async def test_the_connection_is_closed_at_exit(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        pass
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        await store.create_api_key("too late")


async def test_provider_tokens_are_issued_looked_up_and_revoked(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        issued = await store.create_provider_token("gpu box 1")
        assert re.fullmatch(r"pt_[0-9a-f]{12}", issued.id)
        assert re.fullmatch(r"dpt_[A-Za-z0-9_-]{43}", issued.secret)
        assert store.lookup_provider_token(issued.secret) == issued.id
        assert store.lookup_provider_token(issued.secret + "x") is None
        assert await store.revoke_provider_token(issued.id) is True
        assert store.lookup_provider_token(issued.secret) is None
        assert await store.revoke_provider_token(issued.id) is False
        assert await store.revoke_provider_token("pt_000000000000") is False


async def test_api_keys_are_issued_looked_up_and_revoked(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        issued = await store.create_api_key("alice")
        assert re.fullmatch(r"key_[0-9a-f]{12}", issued.id)
        assert re.fullmatch(r"dk_[A-Za-z0-9_-]{43}", issued.secret)
        assert store.lookup_api_key(issued.secret) == issued.id
        assert await store.revoke_api_key(issued.id) is True
        assert store.lookup_api_key(issued.secret) is None
        assert await store.revoke_api_key(issued.id) is False
        assert await store.revoke_api_key("key_000000000000") is False


async def test_the_two_kinds_never_stand_in_for_each_other(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        token = await store.create_provider_token("box")
        key = await store.create_api_key("alice")
        assert store.lookup_api_key(token.secret) is None
        assert store.lookup_provider_token(key.secret) is None
        assert await store.revoke_api_key(token.id) is False
        assert await store.revoke_provider_token(key.id) is False
        assert store.lookup_provider_token(token.secret) == token.id


async def test_revocations_and_live_secrets_survive_a_reopen(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        revoked_token = await store.create_provider_token("old box")
        live_token = await store.create_provider_token("new box")
        revoked_key = await store.create_api_key("bob")
        live_key = await store.create_api_key("carol")
        await store.revoke_provider_token(revoked_token.id)
        await store.revoke_api_key(revoked_key.id)
    async with open_store(tmp_path) as store:
        assert store.lookup_provider_token(revoked_token.secret) is None
        assert store.lookup_api_key(revoked_key.secret) is None
        assert store.lookup_provider_token(live_token.secret) == live_token.id
        assert store.lookup_api_key(live_key.secret) == live_key.id
        assert await store.revoke_api_key(revoked_key.id) is False


async def test_secrets_are_stored_only_as_sha256_digests(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        token = await store.create_provider_token("box")
        key = await store.create_api_key("alice")
    rows = query(tmp_path, "SELECT id, name, secret_hash FROM provider_tokens")
    rows += query(tmp_path, "SELECT id, name, secret_hash FROM api_keys")
    assert rows == [
        (token.id, "box", hashlib.sha256(token.secret.encode()).hexdigest()),
        (key.id, "alice", hashlib.sha256(key.secret.encode()).hexdigest()),
    ]
    raw = files_bytes(tmp_path)
    assert rows[0][2].encode() in raw  # the read sees the stored rows
    assert token.secret.encode() not in raw
    assert key.secret.encode() not in raw


async def test_an_issued_secret_does_not_print_its_secret(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        issued = await store.create_api_key("alice")
    assert issued.id in repr(issued)
    assert issued.secret not in repr(issued)


@pytest.mark.parametrize("name", ["", "   ", "x" * 201])
async def test_bad_names_are_refused_and_nothing_is_stored(tmp_path: Path, name: str) -> None:
    async with open_store(tmp_path) as store:
        with pytest.raises(ValueError, match="name must"):
            await store.create_provider_token(name)
        with pytest.raises(ValueError, match="name must"):
            await store.create_api_key(name)
    assert query(tmp_path, "SELECT count(*) FROM provider_tokens") == [(0,)]
    assert query(tmp_path, "SELECT count(*) FROM api_keys") == [(0,)]


async def test_a_name_of_exactly_200_characters_is_accepted(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        issued = await store.create_api_key("x" * 200)
        assert store.lookup_api_key(issued.secret) == issued.id


async def test_concurrent_writers_share_the_one_connection(tmp_path: Path) -> None:
    issued = []

    async def create(n: int) -> None:
        issued.append(await store.create_api_key(f"key {n}"))

    async with open_store(tmp_path) as store:
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(create, n)
        assert all(store.lookup_api_key(i.secret) == i.id for i in issued)
    assert query(tmp_path, "SELECT count(*) FROM api_keys") == [(20,)]


# Unknown API keys: answered from memory while the database is unchanged ----------------------


def count_thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every function the store sends to a worker thread from now on (each a database trip)."""
    hops: list[object] = []
    real = trio.to_thread.run_sync

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    return hops


async def test_a_flood_of_distinct_unknown_keys_costs_no_database_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(tmp_path) as store:
        issued = await store.create_api_key("alice")
        assert await store.find_api_key("dk_settle") is None  # may reload once after a write
        hops = count_thread_hops(monkeypatch)

        for n in range(1000):
            assert await store.find_api_key(f"dk_unknown_{n}") is None
        assert await store.find_api_key(issued.secret) == issued.id

        assert hops == []


async def test_a_key_issued_here_after_misses_works_at_once(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        for n in range(10):
            assert await store.find_api_key(f"dk_unknown_{n}") is None
        issued = await store.create_api_key("alice")
        assert await store.find_api_key(issued.secret) == issued.id


async def test_a_key_written_by_another_process_works_at_once_then_misses_are_free_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second store on the same file is what `dinfer keys create` is: another connection.
    async with open_store(tmp_path) as daemon, open_store(tmp_path) as cli:
        for n in range(10):
            assert await daemon.find_api_key(f"dk_unknown_{n}") is None
        issued = await cli.create_api_key("from the command line")
        hops = count_thread_hops(monkeypatch)

        assert await daemon.find_api_key(issued.secret) == issued.id
        reloads = len(hops)
        for n in range(100):
            assert await daemon.find_api_key(f"dk_unknown_again_{n}") is None

        assert reloads == 1
        assert len(hops) == reloads


async def test_a_provider_token_issued_or_revoked_by_another_process_counts_at_the_next_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `dinfer tokens create` / `revoke` while the daemon runs (or a sibling --workers process's
    # admin API): the daemon refreshes once per provider connection, and honours both.
    async with open_store(tmp_path) as daemon, open_store(tmp_path) as cli:
        issued = await cli.create_provider_token("rig")
        assert daemon.lookup_provider_token(issued.secret) is None  # not read yet
        await daemon.refresh_provider_tokens()
        assert daemon.lookup_provider_token(issued.secret) == issued.id

        hops = count_thread_hops(monkeypatch)
        await daemon.refresh_provider_tokens()  # nothing changed: no database trip
        assert hops == []

        assert await cli.revoke_provider_token(issued.id)
        await daemon.refresh_provider_tokens()
        assert daemon.lookup_provider_token(issued.secret) is None


async def test_concurrent_misses_after_a_change_share_one_database_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(tmp_path) as daemon, open_store(tmp_path) as cli:
        issued = await cli.create_api_key("from the command line")
        hops = count_thread_hops(monkeypatch)
        found: list[str | None] = []

        async def find(secret: str) -> None:
            found.append(await daemon.find_api_key(secret))

        async with trio.open_nursery() as nursery:
            for n in range(50):
                nursery.start_soon(find, f"dk_unknown_{n}")
            nursery.start_soon(find, issued.secret)

        assert found.count(None) == 50 and issued.id in found
        assert len(hops) == 1


# Key limits ----------------------------------------------------------------------------------


async def test_keys_of_a_version_1_database_survive_the_upgrade_with_no_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database as the dinfer before limits left it: schema version 1, one key.
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:1])
    with closing(store_module._connect(database_path(tmp_path))) as conn:
        conn.execute(
            "INSERT INTO api_keys (id, name, secret_hash, created_at) VALUES (?, ?, ?, 0)",
            ("key_000000000001", "from before limits", store_module.hash_secret("dk_old")),
        )
    monkeypatch.undo()
    async with open_store(tmp_path) as store:
        assert await store.find_api_key("dk_old") == "key_000000000001"
        assert store.api_key_limits("key_000000000001") is None
        record = await store.get_api_key("key_000000000001")
        assert record is not None and record.name == "from before limits"
        assert record.limits == KeyLimits()


async def test_limits_are_stored_cached_and_cleared(tmp_path: Path) -> None:
    limits = KeyLimits(rpm=5, allowed_models=frozenset({"a", "b"}), expires_at=1.8e9)
    async with open_store(tmp_path) as store:
        issued = await store.create_api_key("limited", limits)
        plain = await store.create_api_key("plain")
        assert store.api_key_limits(issued.id) == limits
        assert store.api_key_limits(plain.id) is None  # no entry: one dict miss
        changed = await store.update_api_key(issued.id, {"rpm": None, "tpm": 9})
        assert changed is not None and changed.limits == KeyLimits(
            tpm=9, allowed_models=limits.allowed_models, expires_at=1.8e9
        )
        assert store.api_key_limits(issued.id) == changed.limits
        assert await store.update_api_key("key_000000000000", {"rpm": 1}) is None
    async with open_store(tmp_path) as store:
        assert store.api_key_limits(issued.id) == changed.limits
        cleared = await store.update_api_key(
            issued.id, {"tpm": None, "allowed_models": None, "expires_at": None}
        )
        assert cleared is not None and cleared.limits.empty
        assert store.api_key_limits(issued.id) is None


async def test_a_rotated_secret_replaces_the_old_one_at_once(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        issued = await store.create_api_key("app", KeyLimits(rpm=3))
        rotated = await store.rotate_api_key(issued.id)
        assert rotated is not None and rotated.id == issued.id
        assert store.lookup_api_key(issued.secret) is None
        assert await store.find_api_key(rotated.secret) == issued.id
        assert store.api_key_limits(issued.id) == KeyLimits(rpm=3)
        await store.revoke_api_key(issued.id)
        assert await store.rotate_api_key(issued.id) is None


async def test_changes_by_another_process_reach_hits_within_the_recheck_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_store(tmp_path) as daemon, open_store(tmp_path) as cli:
        issued = await daemon.create_api_key("app")
        assert await daemon.find_api_key(issued.secret) == issued.id
        await cli.update_api_key(issued.id, {"rpm": 2})
        await trio.sleep(HIT_RECHECK_S)
        assert await daemon.find_api_key(issued.secret) == issued.id
        assert daemon.api_key_limits(issued.id) == KeyLimits(rpm=2)
        rotated = await cli.rotate_api_key(issued.id)
        assert rotated is not None
        assert await daemon.find_api_key(rotated.secret) == issued.id  # a miss: at once
        await trio.sleep(HIT_RECHECK_S)
        assert await daemon.find_api_key(issued.secret) is None
        await cli.revoke_api_key(issued.id)
        await trio.sleep(HIT_RECHECK_S)
        assert await daemon.find_api_key(rotated.secret) is None


async def test_hits_ask_data_version_at_most_every_recheck_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(tmp_path) as daemon:
        issued = await daemon.create_api_key("app")
        asked = []
        real = store_module._data_version
        monkeypatch.setattr(
            store_module, "_data_version", lambda conn: asked.append(1) or real(conn)
        )
        for _ in range(100):
            assert await daemon.find_api_key(issued.secret) == issued.id
        assert len(asked) <= 2  # the first hit, and perhaps the reload after our own write
        await trio.sleep(HIT_RECHECK_S)
        before = len(asked)
        assert await daemon.find_api_key(issued.secret) == issued.id
        assert len(asked) == before + 1


async def test_commits_to_other_tables_do_not_reread_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(tmp_path) as daemon:
        issued = await daemon.create_api_key("app")
        assert await daemon.find_api_key(issued.secret) == issued.id
        read = []
        real = store_module._read_live_keys
        monkeypatch.setattr(
            store_module, "_read_live_keys", lambda conn: read.append(1) or real(conn)
        )
        with closing(sqlite3.connect(database_path(tmp_path))) as other, other:
            # What a ledger's commit is: a row written to another table.
            other.execute(
                "INSERT INTO usage (request_id, key_id, route, started_at)"
                " VALUES ('r', 'k', 'chat', 0)"
            )
        assert await daemon.find_api_key(issued.secret) == issued.id
        assert read == []
