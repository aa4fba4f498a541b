"""`POST /v1/chat/completions` and the consumer API keys, end to end.

A real daemon on a loopback port, real HTTP clients (httpx, and hand-driven HTTP/1.1 where the
connection itself is the subject) and scripted fake providers speaking the real encrypted
protocol. Each test names the outcome a consumer or an operator would see.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from dinfer import cli
from protocol.messages import ModelInfo
from tests.conftest import ADMIN_KEY, StartDaemon
from tests.consumer_harness import (
    ADMIN,
    BOUND_S,
    DISPATCH_ENV,
    HELLO,
    TOOL_SCRIPT,
    UUID_RE,
    Api,
    OpenApi,
    RawConnection,
    assert_openai_error,
    chat_body,
    dispatches,
    error_of,
    in_turn,
    role_deltas,
    sse_data,
    sse_events,
    streamed_text,
    tool,
)
from tests.fakes.provider import (
    Complete,
    Drop,
    Fail,
    FakeProvider,
    Script,
    Stall,
    always,
    answer,
    content_chunk,
    role_chunk,
    start_fakes,
)

# Consumer API keys --------------------------------------------------------------------------


async def test_an_issued_key_works_until_revoked(api: Api) -> None:
    await api.connect(api.fake())
    response = await api.client.post("/v1/admin/keys", json={"name": "alice"}, headers=ADMIN)
    assert response.status_code == 201
    issued = response.json()
    assert issued["id"].startswith("key_") and issued["key"].startswith("dk_")
    headers = {"Authorization": f"Bearer {issued['key']}"}

    ok = await api.client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["content"] == "Hello world"

    revoked = await api.client.delete(f"/v1/admin/keys/{issued['id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    refused = await api.client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert_openai_error(refused, 401, "invalid_api_key")
    again = await api.client.delete(f"/v1/admin/keys/{issued['id']}", headers=ADMIN)
    assert_openai_error(again, 404, "key_not_found")
    # Revoking one key leaves the others alone.
    assert (await api.chat()).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Bearer dk_not-a-key", f"Basic {ADMIN_KEY}", "dk_missing-the-scheme"],
)
async def test_a_missing_or_unknown_key_is_401(api: Api, authorization: str | None) -> None:
    fake = (await api.connect(api.fake()))[0]
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await api.client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    error = assert_openai_error(response, 401, "invalid_api_key")
    assert error["type"] == "authentication_error"
    assert UUID_RE.match(response.headers["x-request-id"])
    assert fake.received == []


async def test_the_admin_key_is_not_a_consumer_key(api: Api) -> None:
    response = await api.client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert_openai_error(response, 401, "invalid_api_key")


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-admin-key"])
async def test_issuing_keys_needs_the_admin_key(api: Api, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await api.client.post("/v1/admin/keys", json={"name": "x"}, headers=headers)
    assert_openai_error(response, 401, "invalid_admin_key")
    consumer = await api.client.post("/v1/admin/keys", json={"name": "x"}, headers=api.auth)
    assert_openai_error(consumer, 401, "invalid_admin_key")


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": 5}, [], "x"])
async def test_a_key_needs_a_name(api: Api, body: Any) -> None:
    response = await api.client.post("/v1/admin/keys", json=body, headers=ADMIN)
    assert_openai_error(response, 400, "invalid_name")


async def test_keys_create_from_the_shell_makes_a_working_key(
    start_daemon: StartDaemon,
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The fixture's daemon uses tmp_path/"data": the shell command writes the same store.
    monkeypatch.setenv("DINFER_DATA_DIR", str(tmp_path / "data"))
    argv = ["keys", "create", "--name", "shell"]
    assert await trio.to_thread.run_sync(cli.main, argv) == 0
    printed = dict(
        line.split(":", 1) for line in capsys.readouterr().out.splitlines() if ":" in line
    )
    key = printed["key"].strip()
    assert key.startswith("dk_") and printed["id"].strip().startswith("key_")

    daemon = await start_daemon(**DISPATCH_ENV)
    await start_fakes(nursery, [FakeProvider(daemon.provider_url)])
    async with httpx.AsyncClient(base_url=daemon.base_url, timeout=BOUND_S) as client:
        headers = {"Authorization": f"Bearer {key}"}
        ok = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"] == "Hello world"
        revoked = await client.delete(f"/v1/admin/keys/{printed['id'].strip()}", headers=ADMIN)
        assert revoked.status_code == 200
        refused = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert_openai_error(refused, 401, "invalid_api_key")


# Bad input: a clear 4xx, never a 500 --------------------------------------------------------


def _bad(raw: bytes | dict[str, Any], param: str | None, id_: str) -> Any:
    encoded = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return pytest.param(encoded, param, id=id_)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        _bad(b"{not json", None, "not-json"),
        _bad(b"", None, "empty"),
        _bad(b"\xff\xfe{}", None, "not-utf8"),
        _bad(b"[1, 2]", None, "array"),
        _bad(b'"text"', None, "string"),
        _bad({"messages": HELLO}, "model", "no-model"),
        _bad({"model": 5, "messages": HELLO}, "model", "model-not-a-string"),
        _bad({"model": "", "messages": HELLO}, "model", "model-empty"),
        _bad({"model": "m"}, "messages", "no-messages"),
        _bad({"model": "m", "messages": "hi"}, "messages", "messages-not-an-array"),
        _bad({"model": "m", "messages": []}, "messages", "messages-empty"),
        _bad({"model": "m", "messages": [1]}, "messages", "message-not-an-object"),
        _bad(chat_body(n=2), "n", "n-2"),
        _bad(chat_body(n=0), "n", "n-0"),
        _bad(chat_body(n=True), "n", "n-bool"),
        _bad(chat_body(stream="yes"), "stream", "stream-not-bool"),
        _bad(chat_body(tools={"type": "function"}), "tools", "tools-not-an-array"),
        _bad(chat_body(max_tokens=-1), "max_tokens", "max-tokens-negative"),
        _bad(chat_body(max_completion_tokens="9"), "max_completion_tokens", "max-tokens-string"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(api: Api, raw: bytes, param: str | None) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await api.post_raw(raw)
    error = assert_openai_error(response, 400, "invalid_request")
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if param is not None:
        assert param in error["message"]
    assert fake.received == []


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"[" * 100_000 + b"]" * 100_000, 400),
        (
            b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": ' + b"9" * 5000 + b"}",
            400,
        ),
        (json.dumps(chat_body(tools=[{"function": {"parameters": {"type": [5]}}}])).encode(), 200),
        (
            json.dumps(
                chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
            ).encode(),
            503,
        ),
    ],
    ids=["deep-nesting", "huge-integer", "odd-tool-schema", "image-for-a-text-model"],
)
async def test_odd_bodies_get_a_deliberate_answer_not_a_500(
    api: Api, raw: bytes, status: int
) -> None:
    await api.connect(api.fake())
    response = await api.post_raw(raw)
    assert response.status_code == status, response.text


async def test_an_unknown_model_is_404(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await api.chat(model="no-such-model")
    error = assert_openai_error(response, 404, "model_not_found")
    assert "no-such-model" in error["message"]
    assert fake.received == []


async def test_get_is_405(api: Api) -> None:
    response = await api.client.get("/v1/chat/completions", headers=api.auth)
    assert_openai_error(response, 405)


async def test_a_body_over_the_limit_is_413_and_one_at_the_limit_is_served(
    open_api: OpenApi,
) -> None:
    api = await open_api(max_body_bytes="2048")
    fake = (await api.connect(api.fake()))[0]
    body = json.dumps(chat_body()).encode()
    at_limit = body + b" " * (2048 - len(body))  # trailing JSON whitespace: still valid

    assert (await api.post_raw(at_limit)).status_code == 200
    error = assert_openai_error(await api.post_raw(at_limit + b" "), 413, "request_too_large")
    assert "2048" in error["message"]
    assert dispatches(fake) == 1


async def test_the_default_limit_refuses_a_17_mib_body_and_keeps_the_connection(
    api: Api,
) -> None:
    """The default DINFER_MAX_BODY_BYTES is 16 MiB; the connection survives the refusal."""
    await api.connect(api.fake())
    body = json.dumps(chat_body()).encode()
    huge = body + b" " * (17 * 1024 * 1024 - len(body))
    conn = await RawConnection.open(api.daemon.base_url)
    try:
        status, _, payload = await conn.request("POST", "/v1/chat/completions", huge, api.auth)
        assert status == 413
        assert error_of(payload)["code"] == "request_too_large"
        assert conn.reusable
        status, _, payload = await conn.request("POST", "/v1/chat/completions", body, api.auth)
        assert status == 200, payload
    finally:
        await conn.aclose()


async def test_early_errors_keep_the_connection_alive(open_api: OpenApi) -> None:
    """401, 404, 413, 400 and 405 all answer on a connection that then serves a 200."""
    api = await open_api(max_body_bytes="4096")
    fake = (await api.connect(api.fake()))[0]
    good = json.dumps(chat_body()).encode()
    path = "/v1/chat/completions"
    conn = await RawConnection.open(api.daemon.base_url)
    try:
        steps: list[tuple[str, bytes, dict[str, str], int, str]] = [
            ("POST", good, {}, 401, "invalid_api_key"),
            ("POST", good, {"Authorization": "Bearer dk_nope"}, 401, "invalid_api_key"),
            ("POST", json.dumps(chat_body(model="x")).encode(), api.auth, 404, "model_not_found"),
            ("POST", good + b" " * 5000, api.auth, 413, "request_too_large"),
            ("POST", good + b" " * 5000, {}, 401, "invalid_api_key"),
            ("POST", b"{oops", api.auth, 400, "invalid_request"),
            ("GET", b"", api.auth, 405, "method_not_allowed"),
        ]
        for method, body, headers, status, code in steps:
            got, _, payload = await conn.request(method, path, body, headers)
            assert (got, error_of(payload)["code"]) == (status, code)
            assert conn.reusable, f"the connection was closed after a {status}"
        status, _, payload = await conn.request("POST", path, good, api.auth)
        assert status == 200
        assert json.loads(payload)["choices"][0]["message"]["content"] == "Hello world"
    finally:
        await conn.aclose()
    assert dispatches(fake) == 1


async def test_a_full_queue_is_429_with_retry_after(open_api: OpenApi) -> None:
    api = await open_api(queue_timeout_s="0.2")
    fake = api.fake(in_turn([role_chunk(), content_chunk("busy"), Stall()]), max_concurrency=1)
    await api.connect(fake)
    with trio.fail_after(BOUND_S):
        async with api.client.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=api.auth
        ) as busy:
            assert busy.status_code == 200  # committed: it holds the provider's only slot
            waited = await api.chat()
            error = assert_openai_error(waited, 429, "queue_timeout")
            assert error["type"] == "rate_limit_error"
            assert int(waited.headers["retry-after"]) >= 1
    assert dispatches(fake) == 1


# Dispatch over the real protocol ------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize(
    "failure", [[role_chunk(), Fail(500)], [role_chunk(), Drop()]], ids=["500", "drop"]
)
async def test_a_failure_after_the_role_chunk_fails_over_invisibly(
    api: Api, stream: bool, failure: Script
) -> None:
    behave = in_turn(failure, answer("from", " the other one"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await api.chat(stream=stream)
    assert response.status_code == 200, response.text
    winner = response.headers["x-provider-id"]
    loser = a if winner == b.provider_id else b
    assert winner in {a.provider_id, b.provider_id} and winner != loser.provider_id
    assert dispatches(a, b) == 2
    assert len(loser.received) == 1
    if stream:
        assert sse_data(response.text).count("[DONE]") == 1
        assert sse_data(response.text)[-1] == "[DONE]"
        events = sse_events(response.text)
        assert streamed_text(events) == "from the other one"
        assert role_deltas(events) == 1  # the failed racer's held role chunk was dropped
    else:
        assert response.json()["choices"][0]["message"]["content"] == "from the other one"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_failure_after_content_is_in_band_and_never_retried(api: Api, stream: bool) -> None:
    committed: Script = [role_chunk(), content_chunk("partial"), Fail(500, "backend crashed")]
    behave = in_turn(committed, answer("must not be used"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await api.chat(stream=stream)
    if stream:
        assert response.status_code == 200
        data = sse_data(response.text)
        assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
        events = sse_events(response.text)
        assert streamed_text(events) == "partial"
        assert events[-1] == {"error": {"type": "provider_error", "message": "backend crashed"}}
    else:
        error = assert_openai_error(response, 502, "provider_error")
        assert "backend crashed" in error["message"]
    assert dispatches(a, b) == 1  # the healthy provider never saw the request


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_clean_completion_without_content_is_an_empty_answer(
    api: Api, stream: bool
) -> None:
    behave = always([role_chunk(), Complete(prompt_tokens=4, completion_tokens=0)])
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await api.chat(stream=stream)
    assert response.status_code == 200, response.text
    if stream:
        data = sse_data(response.text)
        assert data.count("[DONE]") == 1 and data[-1] == "[DONE]"
        assert streamed_text(sse_events(response.text)) == ""
    else:
        completion = response.json()
        assert completion["choices"][0]["message"] == {"role": "assistant", "content": ""}
        assert completion["usage"]["prompt_tokens"] == 4
    assert dispatches(a, b) == 1


async def test_two_failures_put_a_provider_in_cooldown(api: Api) -> None:
    """Breaker threshold 2: after two 500s the provider is skipped, with a 503 that says why
    while it is the only one, and in favour of a healthy provider once one connects."""
    sick = (await api.connect(api.fake(always([role_chunk(), Fail(500)]))))[0]
    for _ in range(2):
        failed = await api.chat()
        assert_openai_error(failed, 502, "provider_error")  # a provider 500 is a bad gateway
    assert dispatches(sick) == 2

    skipped = await api.chat()
    error = assert_openai_error(skipped, 503)
    assert "cooling down" in error["message"]
    assert int(skipped.headers["retry-after"]) >= 1
    assert dispatches(sick) == 2

    healthy = (await api.connect(api.fake()))[0]
    for _ in range(3):
        response = await api.chat()
        assert response.headers["x-provider-id"] == healthy.provider_id
    assert dispatches(sick) == 2 and dispatches(healthy) == 3


async def test_tools_on_old_providers_is_503_at_once_naming_the_floor(api: Api) -> None:
    old = await api.connect(api.fake(version="0.5.0"), api.fake(version="0.6.2"))
    started = trio.current_time()
    response = await api.chat(tools=[tool({"type": "object", "properties": {}})])
    assert trio.current_time() - started < 0.5
    error = assert_openai_error(response, 503)
    assert "0.6.3" in error["message"] and "tools" in error["message"]
    assert int(response.headers["retry-after"]) >= 1
    assert dispatches(*old) == 0
    # The same providers still serve plain chat.
    assert (await api.chat()).status_code == 200


async def test_a_provider_whose_template_fails_gets_nothing(api: Api) -> None:
    broken = api.fake(models=[ModelInfo(id="m", template_render_ok=False)])
    await api.connect(broken)
    response = await api.chat()
    error = assert_openai_error(response, 503)
    assert "template" in error["message"]
    assert "retry-after" in response.headers
    assert dispatches(broken) == 0


async def test_the_provider_gets_a_normalized_streaming_body(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    parameters = {
        "type": "object",
        "properties": {
            "city": {"type": ["string", "null"], "description": "optional"},
            "unit": {"enum": ["c", "f"]},
        },
    }
    response = await api.chat(tools=[tool(parameters)], temperature=0.5)
    assert response.status_code == 200, response.text

    envelope = fake.received[0]
    assert envelope["endpoint"] == "/v1/chat/completions"
    body = envelope["body"]
    repaired = body["tools"][0]["function"]["parameters"]["properties"]
    assert repaired["city"] == {"type": "string", "nullable": True, "description": "optional"}
    assert repaired["unit"] == {"type": "string", "enum": ["c", "f"]}
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["messages"], body["temperature"]) == ("m", HELLO, 0.5)


async def test_a_consumer_hanging_up_cancels_the_provider_and_frees_the_slot(api: Api) -> None:
    stalls: Script = [role_chunk(), content_chunk("first words"), Stall()]
    fake = api.fake(in_turn(stalls, answer("next")), max_concurrency=1)
    await api.connect(fake)
    conn = await RawConnection.open(api.daemon.base_url)
    body = json.dumps(chat_body(stream=True)).encode()
    with trio.fail_after(BOUND_S):
        status = await conn.stream_until(b"first words", "/v1/chat/completions", body, api.auth)
        assert status == 200
        await conn.aclose()  # the consumer hangs up mid-stream
        await fake.cancel_seen.wait()
    assert fake.cancels == fake.request_ids[:1]
    entry = api.daemon.supervisor.registry.get(fake.provider_id)
    assert entry is not None and entry.in_flight == 0
    # The provider's only slot is free again: the next request is served at once.
    assert (await api.chat()).json()["choices"][0]["message"]["content"] == "next"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_committed_answer_names_request_provider_and_timings(
    api: Api, stream: bool
) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await api.chat(stream=stream)
    assert response.status_code == 200
    assert UUID_RE.match(response.headers["x-request-id"])
    assert response.headers["x-provider-id"] == fake.provider_id
    timings = {}
    for part in response.headers["server-timing"].split(","):
        metric = re.fullmatch(r"(\w+);dur=([0-9.]+)", part.strip())
        assert metric is not None, part
        timings[metric[1]] = metric[2]
    assert set(timings) == {"queue", "route", "ttft"}
    assert all(float(value) >= 0 for value in timings.values())
    expected_type = "text/event-stream" if stream else "application/json"
    assert response.headers["content-type"] == expected_type


async def test_every_request_gets_its_own_request_id(api: Api) -> None:
    await api.connect(api.fake())
    ids = {(await api.chat()).headers["x-request-id"] for _ in range(3)}
    ids.add((await api.chat(model="unknown")).headers["x-request-id"])
    assert len(ids) == 4 and all(uuid.UUID(value) for value in ids)


async def test_a_non_streaming_request_gets_one_assembled_completion(api: Api) -> None:
    await api.connect(api.fake(always(TOOL_SCRIPT)))
    response = await api.chat(tools=[tool({"type": "object"})])
    assert response.status_code == 200
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["id"] == "chatcmpl-fake" and completion["model"] == "m"
    (choice,) = completion["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "convert", "arguments": '{"unit": "c"}'},
            },
        ],
    }
    assert completion["usage"] == {"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21}


@pytest.mark.parametrize("include_usage", [True, False])
async def test_the_usage_chunk_reaches_only_consumers_who_asked(
    api: Api, include_usage: bool
) -> None:
    await api.connect(api.fake(always(TOOL_SCRIPT)))
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    response = await api.chat(stream=True, **extra)
    events = sse_events(response.text)
    usage = [event["usage"] for event in events if event.get("usage")]
    assert usage == (
        [{"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21}] if include_usage else []
    )
    assert streamed_text(events) == "Let me check."
    assert sse_data(response.text).count("[DONE]") == 1


async def test_usage_comes_from_inference_complete_when_the_backend_sent_no_usage_chunk(
    api: Api,
) -> None:
    await api.connect(api.fake(always(answer("Hi"))))  # no usage chunk; Complete(3, 2)
    response = await api.chat(stream=True, stream_options={"include_usage": True})
    events = sse_events(response.text)
    usage = [event["usage"] for event in events if event.get("usage")]
    assert usage == [{"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}]
    assert events[-1]["choices"] == []
    assert sse_data(response.text)[-1] == "[DONE]"


async def test_capacity_errors_are_retried_elsewhere_and_are_not_strikes(api: Api) -> None:
    busy = always([Fail(503, "busy")])
    a, b = await api.connect(api.fake(busy), api.fake(busy))
    for round_ in range(1, 4):
        response = await api.chat()
        error = assert_openai_error(response, 503, "provider_capacity")
        assert "2 attempts" in error["message"]
        assert int(response.headers["retry-after"]) >= 1
        # Both tried every time: a 503 never puts a provider into cooldown.
        assert (len(a.received), len(b.received)) == (round_, round_)


async def test_a_request_fault_from_a_provider_is_not_retried(api: Api) -> None:
    behave = in_turn([Fail(400, "prompt exceeds the context window")], answer("unused"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await api.chat()
    error = assert_openai_error(response, 400)
    assert "context window" in error["message"]
    assert dispatches(a, b) == 1


async def test_a_silent_primary_is_overtaken_by_a_backup(open_api: OpenApi) -> None:
    """At the speculative point a second provider gets the request; the first to produce
    content wins and the silent one is told to stop."""
    api = await open_api(ttft_base_s="0.4")
    behave = in_turn([Stall()], answer("from the backup"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await api.chat(stream=True)
    assert streamed_text(sse_events(response.text)) == "from the backup"
    winner = response.headers["x-provider-id"]
    silent = a if winner == b.provider_id else b
    with trio.fail_after(BOUND_S):
        await silent.cancel_seen.wait()
    assert silent.cancels == silent.request_ids
    assert dispatches(a, b) == 2


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_stall_after_content_ends_in_an_in_band_timeout(
    open_api: OpenApi, stream: bool
) -> None:
    api = await open_api(inference_timeout_s="0.3")
    fake = (await api.connect(api.fake(always([role_chunk(), content_chunk("so"), Stall()]))))[0]
    response = await api.chat(stream=stream)
    if stream:
        assert response.status_code == 200
        events = sse_events(response.text)
        assert streamed_text(events) == "so"
        assert events[-1]["error"]["type"] == "timeout"
        assert sse_data(response.text)[-1] == "[DONE]"
    else:
        assert_openai_error(response, 504, "timeout")
    with trio.fail_after(BOUND_S):
        await fake.cancel_seen.wait()  # the provider is told to stop, too
    assert dispatches(fake) == 1


async def test_an_unknown_route_answers_in_the_openai_shape(api: Api) -> None:
    response = await api.client.post("/v1/no-such-route", json={}, headers=api.auth)
    assert_openai_error(response, 404, "not_found")
