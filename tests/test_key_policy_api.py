"""Per-key limits and the keys admin API, end to end: a real daemon, fake providers, httpx.

What a consumer with a limited key sees on each inference route (429 with `Retry-After`,
403, 401, OpenAI's `x-ratelimit-*` headers, each route's own error shape), that a request's
concurrency slot comes back however it ended, that a rotated secret is dead on the very next
request, and that a change made by the CLI in another process reaches the running daemon.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemon.api.serve import RunningDaemon, serve
from daemon.config import load_settings
from dinfer import cli
from tests.conftest import FAST_ENV, _env_name
from tests.consumer_harness import (
    ADMIN,
    BOUND_S,
    DISPATCH_ENV,
    HELLO,
    Api,
    RawConnection,
    assert_openai_error,
    chat_body,
    in_turn,
    poll_until,
)
from tests.fakes.provider import (
    Complete,
    Fail,
    FakeProvider,
    Hold,
    always,
    answer,
    content_chunk,
    role_chunk,
    start_fakes,
)

# Each inference route with a valid body and its error shape.
ROUTES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", {"model": "m", "messages": HELLO}, "openai"),
    ("/v1/completions", {"model": "m", "prompt": "hi"}, "openai"),
    ("/v1/responses", {"model": "m", "input": "hi"}, "openai"),
    ("/v1/messages", {"model": "m", "max_tokens": 64, "messages": HELLO}, "anthropic"),
]
ROUTE_IDS = [path for path, _, _ in ROUTES]
REQUEST_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)
TOKEN_HEADERS = (
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


async def new_key(api: Api, **limits: Any) -> tuple[str, dict[str, str]]:
    """A key with `limits` through the admin API; (id, its consumer auth headers)."""
    reply = await api.client.post("/v1/admin/keys", json={"name": "t", **limits}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    return reply.json()["id"], auth(reply.json()["key"])


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "x-api-key": key, "anthropic-version": "2023-06-01"}


async def post(
    api: Api, headers: dict[str, str], path: str = "/v1/chat/completions", **body: Any
) -> httpx.Response:
    with trio.fail_after(BOUND_S):
        return await api.client.post(path, json=body or chat_body(), headers=headers)


def assert_route_error(reply: httpx.Response, shape: str, status: int, code: str) -> str:
    """The error in the route's own shape; its message."""
    if shape == "openai":
        error = assert_openai_error(reply, status, code)
        return str(error["message"])
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    kinds = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
    assert body["error"]["type"] == kinds[status]
    return str(body["error"]["message"])


async def cli_main(*argv: str) -> None:
    assert await trio.to_thread.run_sync(cli.main, list(argv)) == 0


# Limits on every inference route -------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "shape"), ROUTES, ids=ROUTE_IDS)
async def test_over_rpm_is_429_with_retry_after_and_headers_in_the_routes_shape(
    api: Api, path: str, body: dict[str, Any], shape: str
) -> None:
    await api.connect(api.fake())
    _, headers = await new_key(api, rpm=1, tpm=1000)
    served = await post(api, headers, path, **body)
    assert served.status_code == 200, served.text
    assert [served.headers[name] for name in REQUEST_HEADERS] == ["1", "0", "1m0s"]
    assert [served.headers[name] for name in TOKEN_HEADERS] == ["1000", "1000", "0s"]

    refused = await post(api, headers, path, **body)
    message = assert_route_error(refused, shape, 429, "rate_limit_exceeded")
    assert "1 requests per minute" in message
    assert refused.headers["retry-after"] == "60"
    assert refused.headers["x-ratelimit-limit-requests"] == "1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # The answer's 5 reported tokens were charged to the minute's window.
    assert refused.headers["x-ratelimit-remaining-tokens"] == "995"


@pytest.mark.parametrize(("path", "body", "shape"), ROUTES, ids=ROUTE_IDS)
async def test_a_streamed_answer_carries_the_ratelimit_headers(
    api: Api, path: str, body: dict[str, Any], shape: str
) -> None:
    await api.connect(api.fake())
    _, headers = await new_key(api, rpm=3, tpm=100)
    served = await post(api, headers, path, **body, stream=True)
    assert served.status_code == 200
    assert served.headers["content-type"] == "text/event-stream"
    assert [served.headers[name] for name in REQUEST_HEADERS] == ["3", "2", "20s"]
    assert [served.headers[name] for name in TOKEN_HEADERS] == ["100", "100", "0s"]


async def test_tpm_charges_the_tokens_the_provider_reported(api: Api) -> None:
    script = [*answer("hi")[:-1], Complete(prompt_tokens=30, completion_tokens=20)]
    await api.connect(api.fake(always(script)))
    _, headers = await new_key(api, tpm=50)
    assert (await post(api, headers)).status_code == 200
    refused = await post(api, headers)
    assert_route_error(refused, "openai", 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "x-ratelimit-limit-requests" not in refused.headers  # no rpm on this key


async def test_daily_tokens_refuse_once_spent(api: Api) -> None:
    await api.connect(api.fake())
    _, headers = await new_key(api, daily_tokens=5)  # the fake reports 3 + 2 tokens
    assert (await post(api, headers)).status_code == 200
    refused = await post(api, headers)
    assert "tokens per UTC day" in assert_route_error(refused, "openai", 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 86400


async def test_a_key_without_limits_carries_no_ratelimit_headers(api: Api) -> None:
    await api.connect(api.fake())
    served = await api.chat()
    assert served.status_code == 200
    assert not [name for name in served.headers if name.startswith("x-ratelimit-")]


@pytest.mark.parametrize(("path", "body", "shape"), ROUTES, ids=ROUTE_IDS)
async def test_a_model_not_allowed_is_403_before_any_provider(
    api: Api, path: str, body: dict[str, Any], shape: str
) -> None:
    fake = (await api.connect(api.fake()))[0]
    _, headers = await new_key(api, allowed_models=["other"], rpm=5)
    refused = await post(api, headers, path, **body)
    assert '"m"' in assert_route_error(refused, shape, 403, "model_not_allowed")
    assert refused.headers["x-ratelimit-remaining-requests"] == "5"  # nothing was taken
    assert fake.received == []


@pytest.mark.parametrize(("path", "body", "shape"), ROUTES, ids=ROUTE_IDS)
async def test_an_expired_key_is_401(api: Api, path: str, body: dict[str, Any], shape: str) -> None:
    fake = (await api.connect(api.fake()))[0]
    key_id, headers = await new_key(api, expires_at="2099-01-01T00:00:00Z")
    assert (await post(api, headers, path, **body)).status_code == 200
    patched = await api.client.patch(
        f"/v1/admin/keys/{key_id}", json={"expires_at": "2020-01-01T00:00:00Z"}, headers=ADMIN
    )
    assert patched.status_code == 200, patched.text
    refused = await post(api, headers, path, **body)
    assert "expired" in assert_route_error(refused, shape, 401, "api_key_expired")
    assert len(fake.received) == 1


# The concurrency slot comes back however the request ended -----------------------------------


async def test_max_concurrency_refuses_while_held_and_frees_the_slot_at_the_end(api: Api) -> None:
    release = trio.Event()
    held = [role_chunk(), content_chunk("slow"), Hold(release), *answer("rest")[2:]]
    await api.connect(api.fake(in_turn(held, answer("next")), max_concurrency=4))
    _, headers = await new_key(api, max_concurrency=1)
    async with trio.open_nursery() as nursery:
        first: list[httpx.Response] = []

        async def slow() -> None:
            first.append(await post(api, headers))

        nursery.start_soon(slow)
        await poll_until(lambda: api.daemon.supervisor.requests.value == 1)
        refused = await post(api, headers)
        assert "1 requests in flight" in assert_route_error(
            refused, "openai", 429, "rate_limit_exceeded"
        )
        assert refused.headers["retry-after"] == "1"
        release.set()
    assert first[0].status_code == 200
    assert (await post(api, headers)).status_code == 200


async def test_a_client_hanging_up_frees_its_concurrency_slot(api: Api) -> None:
    stalls = [role_chunk(), content_chunk("first words"), Hold(trio.Event())]
    fake = (await api.connect(api.fake(in_turn(stalls, answer("next")))))[0]
    _, headers = await new_key(api, max_concurrency=1)
    conn = await RawConnection.open(api.daemon.base_url)
    body = json.dumps(chat_body(stream=True)).encode()
    with trio.fail_after(BOUND_S):
        assert await conn.stream_until(b"first words", "/v1/chat/completions", body, headers) == 200
        await conn.aclose()
        await fake.cancel_seen.wait()
    await poll_until(lambda: api.daemon.supervisor.requests.value == 0)
    assert (await post(api, headers)).status_code == 200


async def test_a_failed_request_frees_its_concurrency_slot(api: Api) -> None:
    await api.connect(api.fake(in_turn([Fail(status=400, message="bad")], answer("ok"))))
    _, headers = await new_key(api, max_concurrency=1)
    assert (await post(api, headers)).status_code == 400
    assert (await post(api, headers)).status_code == 200


# Rotation, and changes from the CLI ----------------------------------------------------------


async def test_a_rotated_key_refuses_the_old_secret_on_the_very_next_request(api: Api) -> None:
    await api.connect(api.fake())
    key_id, old = await new_key(api, rpm=10)
    assert (await post(api, old)).status_code == 200
    rotated = await api.client.post(f"/v1/admin/keys/{key_id}/rotate", headers=ADMIN)
    assert rotated.status_code == 200
    assert rotated.json()["id"] == key_id
    assert_route_error(await post(api, old), "openai", 401, "invalid_api_key")
    new = auth(rotated.json()["key"])
    served = await post(api, new)
    assert served.status_code == 200
    assert served.headers["x-ratelimit-limit-requests"] == "10"  # same key, same limits


async def test_limits_set_by_the_cli_reach_the_running_daemon_at_once(api: Api) -> None:
    await api.connect(api.fake())
    key_id, headers = await new_key(api)
    data_dir = str(api.daemon.supervisor.settings.data_dir)
    assert "x-ratelimit-limit-requests" not in (await post(api, headers)).headers
    await cli_main("keys", "set", key_id, "--data-dir", data_dir, "--rpm", "1")
    served = await post(api, headers)
    assert served.headers["x-ratelimit-limit-requests"] == "1"
    assert_route_error(await post(api, headers), "openai", 429, "rate_limit_exceeded")
    await cli_main("keys", "set", key_id, "--data-dir", data_dir, "--rpm", "none")
    assert (await post(api, headers)).status_code == 200


async def test_a_key_rotated_or_revoked_by_the_cli_dies_at_once(api: Api) -> None:
    await api.connect(api.fake())
    key_id, headers = await new_key(api)
    data_dir = str(api.daemon.supervisor.settings.data_dir)
    assert (await post(api, headers)).status_code == 200
    await cli_main("keys", "rotate", key_id, "--data-dir", data_dir)
    assert_route_error(await post(api, headers), "openai", 401, "invalid_api_key")
    other_id, other = await new_key(api)
    assert (await post(api, other)).status_code == 200
    await cli_main("keys", "revoke", other_id, "--data-dir", data_dir)
    assert_route_error(await post(api, other), "openai", 401, "invalid_api_key")


# The keys and tokens admin API ---------------------------------------------------------------


async def test_keys_are_listed_and_read_with_limits_and_never_a_secret(api: Api) -> None:
    reply = await api.client.post(
        "/v1/admin/keys",
        json={"name": "app", "rpm": 60, "allowed_models": ["b", "a"], "expires_at": None},
        headers=ADMIN,
    )
    assert reply.status_code == 201
    created = reply.json()
    secret = created.pop("key")
    assert created["rpm"] == 60 and created["allowed_models"] == ["a", "b"]
    listed = await api.client.get("/v1/admin/keys", headers=ADMIN)
    assert listed.status_code == 200
    assert created in listed.json()["keys"]
    assert secret not in listed.text
    assert set(created) == {
        "id", "name", "created_at", "revoked_at", "rpm", "tpm", "daily_tokens",
        "max_concurrency", "allowed_models", "expires_at",
    }  # fmt: skip
    one = await api.client.get(f"/v1/admin/keys/{created['id']}", headers=ADMIN)
    assert one.json() == created
    await api.client.delete(f"/v1/admin/keys/{created['id']}", headers=ADMIN)
    revoked = (await api.client.get(f"/v1/admin/keys/{created['id']}", headers=ADMIN)).json()
    assert revoked["revoked_at"] is not None


async def test_patch_sets_and_clears_only_the_fields_given(api: Api) -> None:
    key_id, _ = await new_key(api, rpm=5, tpm=100)
    reply = await api.client.patch(
        f"/v1/admin/keys/{key_id}", json={"rpm": None, "max_concurrency": 2}, headers=ADMIN
    )
    assert reply.status_code == 200
    assert (reply.json()["rpm"], reply.json()["tpm"], reply.json()["max_concurrency"]) == (
        None,
        100,
        2,
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rpm": -1}, "rpm"),
        ({"tpm": "10"}, "tpm"),
        ({"colour": "red"}, "colour"),
        ({"expires_at": "next week"}, "expires_at"),
        ({"allowed_models": "m"}, "allowed_models"),
    ],
)
async def test_bad_limits_are_400_naming_the_field(
    api: Api, body: dict[str, Any], param: str
) -> None:
    key_id, _ = await new_key(api)
    for reply in (
        await api.client.post("/v1/admin/keys", json={"name": "x", **body}, headers=ADMIN),
        await api.client.patch(f"/v1/admin/keys/{key_id}", json=body, headers=ADMIN),
    ):
        error = assert_openai_error(reply, 400, "invalid_limit")
        assert error["param"] == param and param in error["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/admin/keys/key_000000000000"),
        ("PATCH", "/v1/admin/keys/key_000000000000"),
        ("POST", "/v1/admin/keys/key_000000000000/rotate"),
        ("DELETE", "/v1/admin/keys/key_000000000000"),
    ],
)
async def test_unknown_keys_are_404(api: Api, method: str, path: str) -> None:
    reply = await api.client.request(method, path, json={"rpm": 1}, headers=ADMIN)
    assert_openai_error(reply, 404, "key_not_found")


async def test_provider_tokens_are_listed_without_secrets(api: Api) -> None:
    reply = await api.client.post("/v1/admin/provider-tokens", json={"name": "rig"}, headers=ADMIN)
    token_id, token = reply.json()["id"], reply.json()["token"]
    listed = await api.client.get("/v1/admin/provider-tokens", headers=ADMIN)
    assert listed.status_code == 200 and token not in listed.text
    assert [t["id"] for t in listed.json()["tokens"]] == [token_id]
    await api.client.delete(f"/v1/admin/provider-tokens/{token_id}", headers=ADMIN)
    listed = await api.client.get("/v1/admin/provider-tokens", headers=ADMIN)
    assert listed.json()["tokens"][0]["revoked_at"] is not None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/admin/keys"),
        ("GET", "/v1/admin/keys/key_000000000000"),
        ("PATCH", "/v1/admin/keys/key_000000000000"),
        ("POST", "/v1/admin/keys/key_000000000000/rotate"),
        ("GET", "/v1/admin/provider-tokens"),
    ],
)
async def test_the_new_admin_routes_need_the_admin_key(api: Api, method: str, path: str) -> None:
    reply = await api.client.request(method, path, json={}, headers=api.auth)
    assert_openai_error(reply, 401, "invalid_admin_key")


async def test_an_expired_key_cannot_list_models_or_count_tokens(api: Api) -> None:
    _, headers = await new_key(api, expires_at="2020-01-01T00:00:00Z")
    with trio.fail_after(BOUND_S):
        models = await api.client.get(
            "/v1/models", headers={"Authorization": headers["Authorization"]}
        )
        counted = await api.client.post(
            "/v1/messages/count_tokens", json={"model": "m", "messages": HELLO}, headers=headers
        )
    assert_route_error(models, "openai", 401, "api_key_expired")
    assert_route_error(counted, "anthropic", 401, "api_key_expired")


async def test_a_restart_keeps_what_a_key_spent_today_and_this_minute(tmp_path: Path) -> None:
    # A daemon spends two keys' day and minute and stops; the next start on the same data
    # directory refuses them as the first one would have, not with a fresh day and minute.
    env = {**FAST_ENV, **DISPATCH_ENV, "DINFER_DATA_DIR": str(tmp_path / "data")}
    settings = load_settings({_env_name(k): v for k, v in env.items()})
    keys: dict[str, dict[str, str]] = {}

    async def spend(client: httpx.AsyncClient) -> None:
        for name, limits in {"daily": {"daily_tokens": 5}, "minute": {"tpm": 5}}.items():
            reply = await client.post(
                "/v1/admin/keys", json={"name": name, **limits}, headers=ADMIN
            )
            keys[name] = auth(reply.json()["key"])
            ok = await client.post("/v1/chat/completions", json=chat_body(), headers=keys[name])
            assert ok.status_code == 200, ok.text  # the fake reports 3 + 2 tokens

    async def after_restart(client: httpx.AsyncClient) -> None:
        daily = await client.post("/v1/chat/completions", json=chat_body(), headers=keys["daily"])
        why = assert_route_error(daily, "openai", 429, "rate_limit_exceeded")
        assert "tokens per UTC day" in why
        minute = await client.post("/v1/chat/completions", json=chat_body(), headers=keys["minute"])
        assert "tokens per minute" in assert_route_error(
            minute, "openai", 429, "rate_limit_exceeded"
        )
        assert minute.headers["x-ratelimit-remaining-tokens"] == "0"

    for phase in (spend, after_restart):
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            running: RunningDaemon = await nursery.start(
                partial(serve, settings, shutdown_trigger=stop.wait, seed=7)
            )
            await start_fakes(nursery, [FakeProvider(running.provider_url)])  # closed at the drain
            async with httpx.AsyncClient(base_url=running.base_url, timeout=BOUND_S) as client:
                await phase(client)
            stop.set()
