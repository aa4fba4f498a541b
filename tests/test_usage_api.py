"""The usage ledger through the real daemon: every consumer request with a valid key leaves
one settled row, whichever way it ends (answered, refused, failed, failed in band, hung up,
cut by shutdown); the admin and consumer usage routes; the per-request log line."""

from __future__ import annotations

import json
import logging
import random
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemon.api.serve import RunningDaemon, serve
from daemon.config import load_settings
from tests.conftest import FAST_ENV
from tests.consumer_harness import (
    ADMIN,
    BOUND_S,
    DISPATCH_ENV,
    HELLO,
    Api,
    OpenApi,
    RawConnection,
    assert_openai_error,
    chat_body,
    create_key,
    in_turn,
    poll_until,
)
from tests.fakes.provider import (
    Chunk,
    Complete,
    Fail,
    FakeProvider,
    Hold,
    Wait,
    always,
    answer,
    content_chunk,
    finish_chunk,
    role_chunk,
    start_fakes,
)


async def ledger_rows(daemon: RunningDaemon, where: str = "1") -> list[dict[str, Any]]:
    """The rows, once every row opened so far is settled (a request settles just after its
    answer's last byte, so the client may see the answer first)."""
    with trio.fail_after(BOUND_S):
        while True:
            await daemon.supervisor.ledger.flush()
            if not _select(daemon, "outcome IS NULL"):
                return _select(daemon, where)
            await trio.sleep(0.01)


def _select(daemon: RunningDaemon, where: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(daemon.supervisor.store.path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM usage WHERE {where}")]
    finally:
        conn.close()


ROUTES = {
    "chat": ("/v1/chat/completions", {"model": "m", "messages": HELLO}),
    "completions": ("/v1/completions", {"model": "m", "prompt": "hi"}),
    "responses": ("/v1/responses", {"model": "m", "input": "hi"}),
    "messages": ("/v1/messages", {"model": "m", "max_tokens": 16, "messages": HELLO}),
}


@pytest.mark.parametrize("stream", [False, True], ids=["one-object", "stream"])
@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_an_answered_request_leaves_one_completed_row(
    api: Api, route: str, stream: bool
) -> None:
    (fake,) = await api.connect(api.fake(always([*answer("hello")[:-1], Complete(9, 4)])))
    path, body = ROUTES[route]
    with trio.fail_after(BOUND_S):
        response = await api.client.post(path, json={**body, "stream": stream}, headers=api.auth)
    assert response.status_code == 200, response.text
    (row,) = await ledger_rows(api.daemon)
    assert row["request_id"] == response.headers["x-request-id"]
    assert (row["route"], row["outcome"], row["status"]) == (route, "completed", 200)
    assert (row["model"], row["shape"]) == ("m", "base")
    assert (row["provider_id"], row["providers"], row["attempts"]) == (
        fake.provider_id,
        fake.provider_id,
        1,
    )
    assert (row["prompt_tokens"], row["completion_tokens"], row["tokens_estimated"]) == (9, 4, 0)
    assert row["ttft_ms"] > 0 and row["duration_ms"] >= row["ttft_ms"]


async def test_requests_without_a_valid_key_leave_no_row(api: Api) -> None:
    await api.connect(api.fake())
    for headers in ({}, {"Authorization": "Bearer dk_wrong"}):
        response = await api.client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert_openai_error(response, 401, "invalid_api_key")
    assert await ledger_rows(api.daemon) == []


async def test_a_refused_request_is_rejected_with_its_status(api: Api) -> None:
    response = await api.post_raw(b'{"model": "m"}')
    assert_openai_error(response, 400)
    (row,) = await ledger_rows(api.daemon)
    assert (row["outcome"], row["status"], row["attempts"]) == ("rejected", 400, 0)


async def test_a_request_every_provider_failed_is_failed_with_the_providers_tried(
    api: Api,
) -> None:
    fakes = await api.connect(
        api.fake(always([Fail(500)]), version="0.7.0"), api.fake(always([Fail(500)]))
    )
    response = await api.chat()
    assert response.status_code == 502
    (row,) = await ledger_rows(api.daemon)
    assert (row["outcome"], row["status"], row["provider_id"]) == ("failed", 502, None)
    tried = row["providers"].split(",")
    assert set(tried) == {f.provider_id for f in fakes} and row["attempts"] == 2


async def test_a_stream_failing_after_the_commit_is_an_in_band_error(api: Api) -> None:
    await api.connect(api.fake(always([role_chunk(), content_chunk("half"), Fail(500)])))
    response = await api.chat(stream=True)
    assert response.status_code == 200 and '"error"' in response.text
    (row,) = await ledger_rows(api.daemon)
    assert (row["outcome"], row["status"]) == ("in_band_error", 200)
    assert (row["completion_tokens"], row["tokens_estimated"]) == (1, 1)


async def test_a_consumer_who_hangs_up_after_the_commit_is_charged_the_late_usage(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    release = trio.Event()
    script = [
        role_chunk(),
        content_chunk("first words"),
        Hold(release),
        content_chunk(" more"),
        finish_chunk(),
        Chunk("data: [DONE]"),
        Complete(11, 7),
    ]
    (fake,) = await api.connect(api.fake(in_turn(script)))
    conn = await RawConnection.open(api.daemon.base_url)
    body = json.dumps(chat_body(stream=True)).encode()
    with caplog.at_level(logging.INFO, logger="dinfer.api"), trio.fail_after(BOUND_S):
        assert await conn.stream_until(b"first words", "/v1/chat/completions", body, api.auth)
        await conn.aclose()
        await poll_until(lambda: "hung up after the commit" in caplog.text)
        release.set()
    (row,) = await ledger_rows(api.daemon)
    assert (row["outcome"], row["status"]) == ("client_gone", 200)
    assert (row["prompt_tokens"], row["completion_tokens"], row["tokens_estimated"]) == (11, 7, 0)
    assert fake.cancels == []  # it finished on its own: nothing to cancel


async def test_a_stream_cut_by_shutdown_is_settled_and_flushed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    env = {
        **FAST_ENV,
        **{f"DINFER_{k.upper()}": v for k, v in DISPATCH_ENV.items()},
        "DINFER_DATA_DIR": str(tmp_path / "data"),
        "DINFER_DRAIN_GRACE_S": "0.2",
    }
    stop, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[RunningDaemon]) -> None:
        try:
            await serve(load_settings(env), shutdown_trigger=stop.wait, task_status=task_status)
        finally:
            stopped.set()

    daemon: RunningDaemon = await nursery.start(run)
    release = trio.Event()
    held = [role_chunk(), content_chunk("first"), Hold(release), Complete()]
    await start_fakes(nursery, [FakeProvider(daemon.provider_url, behaviour=always(held))])
    async with httpx.AsyncClient(base_url=daemon.base_url, timeout=BOUND_S) as client:
        _, key = await create_key(client)
        auth = {"Authorization": f"Bearer {key}"}
        with trio.fail_after(BOUND_S):
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=auth
            ) as response:
                async for text in response.aiter_text():
                    if "first" in text:
                        stop.set()
            await stopped.wait()
    conn = sqlite3.connect(tmp_path / "data" / "dinfer.sqlite3")
    try:
        settled = conn.execute("SELECT outcome, status, completion_tokens FROM usage").fetchall()
    finally:
        conn.close()
    assert settled == [("in_band_error", 200, 1)]
    release.set()


async def test_admin_usage_groups_and_the_consumer_sees_only_its_own(api: Api) -> None:
    await api.connect(api.fake(always(answer("hi"))))
    own_id = (await api.client.get("/v1/usage", headers=api.auth)).json()
    assert own_id["data"] == []
    other_id, other_key = await create_key(api.client, "other")
    await api.chat()
    await api.chat()
    other = {"Authorization": f"Bearer {other_key}"}
    with trio.fail_after(BOUND_S):
        await api.client.post("/v1/chat/completions", json=chat_body(), headers=other)
    admin = await api.client.get("/v1/admin/usage", params={"group_by": "key"}, headers=ADMIN)
    assert admin.status_code == 200, admin.text
    per_key = {g["group"]: g for g in admin.json()["data"]}
    assert per_key[other_id]["requests"] == 1
    assert sum(g["requests"] for g in per_key.values()) == 3
    mine = await api.client.get("/v1/usage", params={"group_by": "model"}, headers=api.auth)
    (group,) = mine.json()["data"]
    assert (group["group"], group["requests"], group["completion_tokens"]) == ("m", 2, 4)
    assert group["outcomes"]["completed"] == 2 and group["ttft_p50_ms"] > 0
    theirs = await api.client.get("/v1/usage", headers=other)
    assert theirs.json()["data"][0]["requests"] == 1


async def test_usage_routes_refuse_bad_parameters_in_their_own_shapes(api: Api) -> None:
    bad = await api.client.get("/v1/admin/usage", params={"since": "soon"}, headers=ADMIN)
    assert bad.status_code == 400 and "since" in bad.json()["error"]["message"]
    assert_openai_error(
        await api.client.get("/v1/usage", params={"key_id": "key_x"}, headers=api.auth), 400
    )
    assert_openai_error(await api.client.get("/v1/usage"), 401, "invalid_api_key")
    unauthorised = await api.client.get("/v1/admin/usage")
    assert unauthorised.status_code == 401


async def test_each_request_logs_one_line_without_secrets(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    await api.connect(api.fake())
    with caplog.at_level(logging.INFO, logger="dinfer.request"):
        response = await api.chat(messages=[{"role": "user", "content": "a secret prompt"}])
        await ledger_rows(api.daemon)
    (record,) = [r for r in caplog.records if r.name == "dinfer.request"]
    logged = record.request  # type: ignore[attr-defined]
    assert logged["request_id"] == response.headers["x-request-id"]
    assert (logged["route"], logged["outcome"], logged["status"]) == ("chat", "completed", 200)
    assert set(logged) == {
        "request_id",
        "key_id",
        "route",
        "model",
        "status",
        "outcome",
        "attempts",
        "providers",
        "ttft_ms",
        "duration_ms",
        "tokens",
    }
    text = json.dumps(logged) + record.getMessage()
    assert api.key not in text and "secret prompt" not in text


def _by_case(body: dict[str, Any]) -> list[Any]:
    """The script a request names in its prompt: `ok:N`, `early`, `late`, `hangup:N`."""
    case, _, n = body["messages"][0]["content"].partition(":")
    match case:
        case "ok":
            return [*answer("fine")[:-1], Complete(5, int(n))]
        case "early":
            return [Fail(500)]
        case "late":
            return [role_chunk(), content_chunk("half"), Fail(500)]
        case _:  # hangup: the consumer leaves at "first", the provider finishes on its own
            return [
                role_chunk(),
                content_chunk("first"),
                Wait(0.2),
                *answer("x")[1:-1],
                Complete(5, int(n)),
            ]


async def test_chaos_every_row_settles_once_and_token_sums_match_the_providers(
    open_api: OpenApi,
) -> None:
    """Random faults, failures after the commit and hang-ups on a few providers: each request
    leaves exactly one settled row, and the tokens charged are what the providers reported."""
    api = await open_api(breaker_threshold="1000000")  # the faults are scripted, not sickness
    rng = random.Random(10)
    await api.connect(*(api.fake(_by_case, max_concurrency=8) for _ in range(3)))
    cases = [rng.choice(["ok", "ok", "early", "late", "hangup"]) for _ in range(150)]
    tokens = [rng.randint(1, 50) for _ in cases]
    limit = trio.CapacityLimiter(16)

    async def one(case: str, n: int) -> None:
        async with limit:
            body = chat_body(stream=True, messages=[{"role": "user", "content": f"{case}:{n}"}])
            if case != "hangup":
                await api.chat(body)
                return
            conn = await RawConnection.open(api.daemon.base_url)
            with trio.fail_after(BOUND_S):
                await conn.stream_until(
                    b"first", "/v1/chat/completions", json.dumps(body).encode(), api.auth
                )
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        for case, n in zip(cases, tokens, strict=True):
            nursery.start_soon(one, case, n)
    rows = await ledger_rows(api.daemon)
    assert len(rows) == len(cases) == len({r["request_id"] for r in rows})
    outcomes = Counter(r["outcome"] for r in rows)
    asked = Counter(cases)
    assert outcomes["failed"] == asked["early"] and outcomes["in_band_error"] == asked["late"]
    # A hang-up the daemon noticed only after the end was relayed is simply completed.
    assert outcomes["completed"] + outcomes["client_gone"] == asked["ok"] + asked["hangup"]
    assert 0 < outcomes["client_gone"] <= asked["hangup"]
    charged = sum(
        r["completion_tokens"] for r in rows if r["outcome"] in {"completed", "client_gone"}
    )
    reported = sum(n for c, n in zip(cases, tokens, strict=True) if c in {"ok", "hangup"})
    assert charged == reported
