"""The usage ledger on its own: exactly-once settling, the writer's batches, backpressure and
shutdown flush, crash-left rows, the migration's upgrade, the queries, and the hang-up rule
on a virtual clock (in-memory providers)."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

import daemon.accounts.ledger as ledger_module
from daemon.accounts.ledger import Settlement, Tokens, abort_open_rows, run_ledger
from daemon.accounts.usage import OUTCOMES, parse_query, parse_time, query_usage
from daemon.api.handler import LATE_TERMINAL_S, Parsed, _after_hang_up
from daemon.config import load_settings
from daemon.nursery.supervisor import open_supervisor
from daemon.store import MIGRATIONS, database_path, hash_secret, open_store
from dinfer.cli import main
from tests.dispatch_harness import TRAITS, World
from tests.fakes.provider import Complete, Stall, Wait, content_chunk, role_chunk

DONE = Settlement(200, "completed", "m", "base", "p1", 1, ("p1",), Tokens(5, 7), 12.5)


def rows(data_dir: Path, where: str = "1") -> list[dict[str, Any]]:
    conn = sqlite3.connect(database_path(data_dir))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM usage WHERE {where}")]
    finally:
        conn.close()


async def test_a_row_is_settled_once_and_a_second_settle_is_a_no_op(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with open_store(tmp_path) as store:
        ledger = await nursery.start(run_ledger, store.path)
        charge = await ledger.open("req-1", "key_a", "chat")
        assert await charge.settle(DONE)
        assert not await charge.settle(Settlement(502, "failed"))
        await ledger.aclose()
    (row,) = rows(tmp_path)
    assert row["request_id"] == "req-1" and row["key_id"] == "key_a" and row["route"] == "chat"
    assert (row["outcome"], row["status"], row["model"], row["shape"]) == (
        "completed",
        200,
        "m",
        "base",
    )
    assert (row["prompt_tokens"], row["completion_tokens"], row["tokens_estimated"]) == (5, 7, 0)
    assert (row["provider_id"], row["providers"], row["attempts"]) == ("p1", "p1", 1)
    assert row["ttft_ms"] == 12.5 and row["ended_at"] >= row["started_at"]


async def test_an_open_row_is_on_disk_before_it_is_settled(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with open_store(tmp_path) as store:
        ledger = await nursery.start(run_ledger, store.path)
        await ledger.open("req-open", "key_a", "messages")
        await ledger.flush()
        (row,) = rows(tmp_path)
        assert row["outcome"] is None and row["route"] == "messages"
        await ledger.aclose()


async def test_closing_the_supervisor_flushes_every_settled_row(tmp_path: Path) -> None:
    settings = load_settings({"DINFER_DATA_DIR": str(tmp_path)})
    count = 600  # more than two batches
    async with open_store(tmp_path) as store, open_supervisor(settings, store) as sup:
        for n in range(count):
            charge = await sup.ledger.open(f"req-{n}", "key_a", "chat")
            await charge.settle(DONE)
    assert len(rows(tmp_path, "outcome = 'completed'")) == count


async def test_a_full_channel_makes_settling_wait_and_drops_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "CHANNEL_ROWS", 1)
    monkeypatch.setattr(ledger_module, "BATCH_ROWS", 2)

    async def one(ledger: ledger_module.Ledger, n: int) -> None:
        charge = await ledger.open(f"req-{n}", "key_b", "chat")
        await charge.settle(DONE)

    async with open_store(tmp_path) as store, trio.open_nursery() as nursery:
        ledger = await nursery.start(run_ledger, store.path)
        async with trio.open_nursery() as requests:
            for n in range(100):
                requests.start_soon(one, ledger, n)
        await ledger.aclose()
    assert len(rows(tmp_path, "outcome = 'completed'")) == 100


async def test_a_row_a_crash_left_open_is_aborted_at_the_next_start(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with open_store(tmp_path):
        pass
    conn = sqlite3.connect(database_path(tmp_path))
    with conn:
        conn.execute(
            "INSERT INTO usage (request_id, key_id, route, started_at) VALUES (?, ?, ?, ?)",
            ("crashed", "key_a", "chat", 1000.0),
        )
        conn.execute(
            "INSERT INTO usage (request_id, key_id, route, started_at, outcome, status) "
            "VALUES (?, ?, ?, ?, 'completed', 200)",
            ("finished", "key_a", "chat", 1000.0),
        )
    conn.close()
    async with open_store(tmp_path) as store:
        ledger = await nursery.start(run_ledger, store.path)
        await ledger.aclose()
    outcomes = {r["request_id"]: r["outcome"] for r in rows(tmp_path)}
    assert outcomes == {"crashed": "aborted", "finished": "completed"}
    (aborted,) = rows(tmp_path, "request_id = 'crashed'")
    assert aborted["ended_at"] is not None


async def test_a_worker_leaves_its_siblings_open_rows_to_the_parent(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # `dinfer serve --workers`: a worker starting while a sibling serves must not close the
    # sibling's live rows; the parent closes stale ones once, before any worker starts.
    async with open_store(tmp_path):
        pass
    with closing(sqlite3.connect(database_path(tmp_path))) as conn, conn:
        conn.execute(
            "INSERT INTO usage (request_id, key_id, route, started_at) VALUES (?, ?, ?, ?)",
            ("live", "key_a", "chat", 1000.0),
        )
    async with open_store(tmp_path) as store:
        ledger = await nursery.start(partial(run_ledger, store.path, abort_open=False))
        await ledger.aclose()
    assert {r["request_id"]: r["outcome"] for r in rows(tmp_path)} == {"live": None}
    abort_open_rows(database_path(tmp_path))
    assert {r["request_id"]: r["outcome"] for r in rows(tmp_path)} == {"live": "aborted"}


async def test_a_store_from_before_the_ledger_keeps_its_keys_and_gains_the_table(
    tmp_path: Path,
) -> None:
    path = database_path(tmp_path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO schema_version VALUES (1, 0)")
    conn.execute(
        "INSERT INTO api_keys (id, name, secret_hash, created_at) VALUES (?, ?, ?, 0)",
        ("key_old", "old", hash_secret("dk_old_secret")),
    )
    conn.execute(
        "INSERT INTO provider_tokens (id, name, secret_hash, created_at) VALUES (?, ?, ?, 0)",
        ("pt_old", "old", hash_secret("dpt_old_secret")),
    )
    conn.close()
    async with open_store(tmp_path) as store:
        assert await store.find_api_key("dk_old_secret") == "key_old"
        assert store.lookup_provider_token("dpt_old_secret") == "pt_old"
    conn = sqlite3.connect(path)
    try:
        (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        assert version == len(MIGRATIONS)
        assert conn.execute("SELECT count(*) FROM usage").fetchone() == (0,)
    finally:
        conn.close()


# Queries ------------------------------------------------------------------------------------

DAY1 = parse_time("2026-11-30T10:00:00Z")
DAY2 = parse_time("2026-12-01T10:00:00Z")


def seed(data_dir: Path) -> None:
    table = [
        # request_id, key, model, provider, outcome, prompt, completion, reasoning, ttft, at
        ("r1", "key_a", "m1", "p1", "completed", 10, 20, 0, 100.0, DAY1),
        ("r2", "key_a", "m1", "p2", "completed", 1, 2, 3, 300.0, DAY1),
        ("r3", "key_b", "m2", "p1", "failed", 0, 0, 0, None, DAY2),
        ("r4", "key_b", "m1", "p1", "client_gone", 4, 5, 0, 200.0, DAY2),
    ]
    conn = sqlite3.connect(database_path(data_dir))
    with conn:
        conn.executemany(
            "INSERT INTO usage (request_id, key_id, route, model, provider_id, outcome, status, "
            "prompt_tokens, completion_tokens, reasoning_tokens, ttft_ms, started_at) "
            "VALUES (?, ?, 'chat', ?, ?, ?, 200, ?, ?, ?, ?, ?)",
            table,
        )
        conn.execute(
            "INSERT INTO usage (request_id, key_id, route, started_at) "
            "VALUES ('open', 'key_a', 'chat', ?)",
            (DAY1,),
        )
    conn.close()


@pytest.fixture
async def seeded(tmp_path: Path) -> Path:
    async with open_store(tmp_path):
        pass
    seed(tmp_path)
    return tmp_path


def by_group(data_dir: Path, **params: str) -> dict[Any, dict[str, Any]]:
    return {g["group"]: g for g in query_usage(database_path(data_dir), parse_query(params))}


async def test_usage_groups_by_model_with_sums_and_ttft_percentiles(seeded: Path) -> None:
    groups = by_group(seeded, group_by="model")
    assert set(groups) == {"m1", "m2"}
    m1 = groups["m1"]
    assert m1["requests"] == 3  # the open row is not counted
    assert m1["outcomes"]["completed"] == 2 and m1["outcomes"]["client_gone"] == 1
    assert (m1["prompt_tokens"], m1["completion_tokens"], m1["reasoning_tokens"]) == (15, 27, 3)
    assert (m1["ttft_p50_ms"], m1["ttft_p95_ms"]) == (200.0, 300.0)
    assert groups["m2"]["ttft_p50_ms"] is None and groups["m2"]["outcomes"]["failed"] == 1


async def test_usage_groups_by_day_key_and_provider(seeded: Path) -> None:
    assert {d: g["requests"] for d, g in by_group(seeded, group_by="day").items()} == {
        "2026-11-30": 2,
        "2026-12-01": 2,
    }
    keys = by_group(seeded, group_by="key")
    assert {k: g["completion_tokens"] for k, g in keys.items()} == {"key_a": 22, "key_b": 5}
    providers = by_group(seeded, group_by="provider")
    assert {p: g["requests"] for p, g in providers.items()} == {"p1": 3, "p2": 1}
    (everything,) = by_group(seeded).values()
    assert everything["requests"] == 4


async def test_usage_filters_by_time_key_and_model(seeded: Path) -> None:
    (late,) = by_group(seeded, since="2026-12-01T00:00:00Z").values()
    assert late["requests"] == 2
    (early,) = by_group(seeded, until=str(int(DAY2) - 3600)).values()
    assert early["requests"] == 2
    (one,) = by_group(seeded, key_id="key_b", model="m1").values()
    assert one["requests"] == 1 and one["prompt_tokens"] == 4


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "nan"}, "until"),
        ({"group_by": "hour"}, "group_by"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_usage_parameters_say_which(params: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_query(params)


def test_times_are_rfc3339_or_unix_seconds() -> None:
    assert parse_time("1700000000") == 1700000000.0
    assert parse_time("2023-11-14T22:13:20Z") == 1700000000.0
    assert parse_time("2023-11-14T23:13:20+01:00") == 1700000000.0


async def test_dinfer_usage_json_reads_the_store_directly(
    seeded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["usage", "--data-dir", str(seeded), "--group-by", "key", "--json"]
    assert await trio.to_thread.run_sync(main, argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["group_by"] == "key"
    assert {g["group"]: g["requests"] for g in printed["data"]} == {"key_a": 2, "key_b": 2}
    assert await trio.to_thread.run_sync(main, ["usage", "--data-dir", str(seeded)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["all", "requests", "completed"]
    assert table[1].split()[:3] == ["all", "4", "2"]


async def test_dinfer_usage_table_has_a_column_for_every_outcome(
    seeded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A cluster owner's `orphaned` rows were counted in `requests` but shown nowhere else.
    assert await trio.to_thread.run_sync(main, ["usage", "--data-dir", str(seeded)]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert [o for o in OUTCOMES if o not in header] == []


# The hang-up rule on a virtual clock ---------------------------------------------------------

PARSED = Parsed(TRAITS, b"{}", None)


async def test_a_late_terminal_within_the_bound_is_charged_as_reported(
    autojump_clock: MockClock, world: World
) -> None:
    world.provider([role_chunk(), content_chunk("a"), Wait(1.5), Complete(11, 7)])
    committed = await world.dispatch()
    await committed.next_event()  # the consumer read one chunk, then hung up
    hung_up_at = trio.current_time()
    row = await _after_hang_up(PARSED, committed, 200)
    committed.close()
    assert trio.current_time() - hung_up_at == pytest.approx(1.5)
    assert (row.outcome, row.status) == ("client_gone", 200)
    assert row.tokens == Tokens(11, 7, 0, estimated=False)
    await world.assert_nothing_leaked()


async def test_no_terminal_within_the_bound_charges_the_counted_chunks(
    autojump_clock: MockClock, world: World
) -> None:
    fake = world.provider(
        [role_chunk(), content_chunk("a"), content_chunk("b"), content_chunk("c"), Stall()]
    )
    committed = await world.dispatch()
    await committed.next_event()
    hung_up_at = trio.current_time()
    row = await _after_hang_up(PARSED, committed, 200)
    assert trio.current_time() - hung_up_at == LATE_TERMINAL_S
    committed.close()
    assert row.outcome == "client_gone"
    assert row.tokens == Tokens(TRAITS.prompt_tokens, 3, 0, estimated=True)
    assert row.provider_id == fake.id and row.attempts == 1
    await world.assert_nothing_leaked()


async def test_a_hang_up_before_the_commit_charges_nothing(world: World) -> None:
    row = await _after_hang_up(PARSED, None, None)
    assert (row.outcome, row.status, row.tokens) == ("client_gone", 499, Tokens())
