"""The admin API, health probes and the error shape, over a real socket (httpx under trio).

Each test starts a real daemon (`tests/conftest.py`) and speaks HTTP to it; provider-side
effects (a revoked token disconnecting its providers) are observed through `FakeProvider`s.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from daemon.api.serve import RunningDaemon
from daemon.routing.types import RequestTraits
from dinfer import cli
from protocol.messages import ModelInfo, TemplateRender, TrustStatus
from tests.conftest import ADMIN_KEY, StartDaemon
from tests.fakes.provider import FakeProvider

BOUND_S = 5
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}

# Every admin route, with a body that would be valid, so only authentication can refuse it.
ADMIN_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/admin/provider-tokens", {"name": "rig"}),
    ("DELETE", "/v1/admin/provider-tokens/pt_000000000000", None),
    ("GET", "/v1/admin/provider-tokens", None),
    ("POST", "/v1/admin/keys", {"name": "app"}),
    ("GET", "/v1/admin/keys", None),
    ("GET", "/v1/admin/keys/key_000000000000", None),
    ("PATCH", "/v1/admin/keys/key_000000000000", {"rpm": 5}),
    ("POST", "/v1/admin/keys/key_000000000000/rotate", None),
    ("DELETE", "/v1/admin/keys/key_000000000000", None),
    ("GET", "/v1/admin/providers", None),
    ("GET", "/v1/admin/hedging", None),
    ("DELETE", "/v1/admin/providers/p_0/cooldowns", None),
    ("POST", "/v1/admin/providers/p_0/drain", None),
    ("DELETE", "/v1/admin/providers/p_0/drain", None),
]
ADMIN_CALL_IDS = [f"{method} {path}" for method, path, _ in ADMIN_CALLS]


@pytest.fixture
async def client(daemon: RunningDaemon) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=daemon.base_url) as http:
        yield http


def assert_openai_error(reply: httpx.Response, status: int, kind: str, code: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body.keys() == {"error"}
    assert body["error"].keys() == {"type", "message", "code", "param"}
    assert body["error"]["type"] == kind
    assert body["error"]["code"] == code
    assert body["error"]["param"] is None
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def started(nursery: trio.Nursery, fake: FakeProvider) -> FakeProvider:
    with trio.fail_after(BOUND_S):
        started_fake: FakeProvider = await nursery.start(fake.run)
    return started_fake


async def new_token(client: httpx.AsyncClient, name: str = "rig") -> tuple[str, str]:
    reply = await client.post("/v1/admin/provider-tokens", json={"name": name}, headers=AUTH)
    assert reply.status_code == 201, reply.text
    return reply.json()["id"], reply.json()["token"]


# Probes and the error shape -----------------------------------------------------------------


async def test_health_answers_200(client: httpx.AsyncClient) -> None:
    reply = await client.get("/health")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok"}


async def test_readyz_answers_200_once_serving(client: httpx.AsyncClient) -> None:
    reply = await client.get("/readyz")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ready"}


@pytest.mark.parametrize("path", ["/nope", "/v1/admin/nope", "/v1/admin/provider-tokens/x/y"])
async def test_an_unknown_route_answers_404_in_the_openai_error_shape(
    client: httpx.AsyncClient, path: str
) -> None:
    reply = await client.get(path, headers=AUTH)
    assert_openai_error(reply, 404, "not_found_error", "not_found")


async def test_a_wrong_method_answers_405_in_the_openai_error_shape(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.put("/v1/admin/provider-tokens", headers=AUTH)
    assert_openai_error(reply, 405, "invalid_request_error", "method_not_allowed")


# Authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}],
    ids=["no header", "wrong key"],
)
@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS, ids=ADMIN_CALL_IDS)
async def test_every_admin_route_without_the_admin_key_answers_401(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    reply = await client.request(method, path, json=body, headers=headers)
    assert_openai_error(reply, 401, "authentication_error", "invalid_admin_key")
    assert ADMIN_KEY not in reply.text


@pytest.mark.parametrize(
    "authorization",
    ["Bearer", f"Bearer {ADMIN_KEY}x", f"Bearer {ADMIN_KEY[:-1]}", f"Basic {ADMIN_KEY}"],
    ids=["empty key", "key with a suffix", "key prefix", "other scheme"],
)
async def test_an_almost_right_admin_key_answers_401(
    client: httpx.AsyncClient, authorization: str
) -> None:
    reply = await client.get("/v1/admin/providers", headers={"Authorization": authorization})
    assert_openai_error(reply, 401, "authentication_error", "invalid_admin_key")


async def test_a_revocation_with_the_wrong_key_revokes_nothing(
    start_daemon: StartDaemon, nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(provider_auth="token")
    async with httpx.AsyncClient(base_url=daemon.base_url) as client:
        token_id, token = await new_token(client)
        fake = await started(nursery, FakeProvider(daemon.provider_url, auth_token=token))
        reply = await client.delete(
            f"/v1/admin/provider-tokens/{token_id}", headers={"Authorization": "Bearer x"}
        )
    assert reply.status_code == 401
    assert daemon.supervisor.store.lookup_provider_token(token) == token_id
    assert daemon.supervisor.registry.get(fake.provider_id) is not None
    assert not fake.closed.is_set()


@pytest.mark.parametrize("headers", [{}, AUTH], ids=["no header", "any bearer"])
@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS, ids=ADMIN_CALL_IDS)
async def test_without_an_admin_key_configured_every_admin_call_answers_403(
    start_daemon: StartDaemon,
    headers: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    daemon = await start_daemon(admin_key="")
    assert daemon.supervisor.settings.admin_key is None
    async with httpx.AsyncClient(base_url=daemon.base_url) as client:
        reply = await client.request(method, path, json=body, headers=headers)
    assert_openai_error(reply, 403, "permission_error", "admin_disabled")


# Provider tokens ----------------------------------------------------------------------------


async def test_issuing_a_provider_token_returns_its_id_and_secret_once(
    client: httpx.AsyncClient, daemon: RunningDaemon
) -> None:
    reply = await client.post("/v1/admin/provider-tokens", json={"name": "rig-1"}, headers=AUTH)
    assert reply.status_code == 201
    body = reply.json()
    assert {"id", "token"} <= body.keys()
    assert body["id"].startswith("pt_") and body["token"].startswith("dpt_")
    assert daemon.supervisor.store.lookup_provider_token(body["token"]) == body["id"]
    second_id, second_token = await new_token(client)
    assert (second_id, second_token) != (body["id"], body["token"])


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{}", id="no name"),
        pytest.param(b'{"name": ""}', id="empty name"),
        pytest.param(b'{"name": "   "}', id="blank name"),
        pytest.param(b'{"name": 7}', id="name not a string"),
        pytest.param(b'["rig"]', id="not an object"),
        pytest.param(b"{name", id="not JSON"),
        pytest.param(b'{"name": "' + b"x" * 201 + b'"}', id="name too long"),
    ],
)
async def test_issuing_a_provider_token_without_a_good_name_answers_400(
    client: httpx.AsyncClient, content: bytes
) -> None:
    reply = await client.post(
        "/v1/admin/provider-tokens",
        content=content,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert_openai_error(reply, 400, "invalid_request_error", "invalid_name")


async def test_revoking_a_provider_token_disconnects_only_its_providers(
    start_daemon: StartDaemon, nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(provider_auth="token")
    registry = daemon.supervisor.registry
    async with httpx.AsyncClient(base_url=daemon.base_url) as client:
        revoked_id, revoked = await new_token(client, "old rig")
        _, kept = await new_token(client, "new rig")
        doomed = [FakeProvider(daemon.provider_url, auth_token=revoked) for _ in range(2)]
        survivor = FakeProvider(daemon.provider_url, auth_token=kept)
        for fake in [*doomed, survivor]:
            await started(nursery, fake)
        assert len(registry.providers()) == 3

        reply = await client.delete(f"/v1/admin/provider-tokens/{revoked_id}", headers=AUTH)
        assert reply.status_code == 200
        assert reply.json() == {"id": revoked_id, "revoked": True, "disconnected": 2}
        with trio.fail_after(BOUND_S):
            for fake in doomed:
                await fake.closed.wait()
        assert [fake.close_code for fake in doomed] == [1008, 1008]
        assert [fake.close_reason for fake in doomed] == ["provider token revoked"] * 2
        assert [e.provider_id for e in registry.providers()] == [survivor.provider_id]
        assert not survivor.closed.is_set()

        # The revoked token no longer registers; revoking it again is a 404.
        again = await started(nursery, FakeProvider(daemon.provider_url, auth_token=revoked))
        assert again.verdicts == [
            TrustStatus(status="rejected", reason="auth_token is unknown or revoked")
        ]
        with trio.fail_after(BOUND_S):
            await again.closed.wait()
        assert again.close_code == 1008
        reply = await client.delete(f"/v1/admin/provider-tokens/{revoked_id}", headers=AUTH)
        assert_openai_error(reply, 404, "not_found_error", "token_not_found")


async def test_revoking_an_unknown_provider_token_answers_404(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.delete("/v1/admin/provider-tokens/pt_unknown", headers=AUTH)
    assert_openai_error(reply, 404, "not_found_error", "token_not_found")


# API keys -----------------------------------------------------------------------------------


async def test_api_keys_are_issued_and_revoked(
    client: httpx.AsyncClient, daemon: RunningDaemon
) -> None:
    store = daemon.supervisor.store
    reply = await client.post("/v1/admin/keys", json={"name": "app"}, headers=AUTH)
    assert reply.status_code == 201
    key_id, key = reply.json()["id"], reply.json()["key"]
    assert key.startswith("dk_") and store.lookup_api_key(key) == key_id

    reply = await client.delete(f"/v1/admin/keys/{key_id}", headers=AUTH)
    assert reply.status_code == 200
    assert reply.json() == {"id": key_id, "revoked": True}
    assert store.lookup_api_key(key) is None
    reply = await client.delete(f"/v1/admin/keys/{key_id}", headers=AUTH)
    assert_openai_error(reply, 404, "not_found_error", "key_not_found")


# The provider view --------------------------------------------------------------------------


async def test_the_provider_view_with_no_providers_is_empty(client: httpx.AsyncClient) -> None:
    reply = await client.get("/v1/admin/providers", headers=AUTH)
    assert reply.status_code == 200
    assert reply.json() == {"providers": []}


async def test_the_provider_view_describes_each_provider(
    client: httpx.AsyncClient, daemon: RunningDaemon, nursery: trio.Nursery
) -> None:
    registry = daemon.supervisor.registry
    models = [
        ModelInfo(id="m", template_render_ok=True, is_vision=True),
        ModelInfo(id="n", template_render_ok=False),
        ModelInfo(id="o", template_render=TemplateRender(tools=False)),
        ModelInfo(
            id="p",
            template_render_ok=False,
            template_render=TemplateRender(base=True, tools=False, vision=True),
            context_length=8192,
        ),
        ModelInfo(id="q", template_render=TemplateRender()),
    ]
    before = time.time()
    fake = FakeProvider(
        daemon.provider_url, models=models, version="0.6.9", backend="vllm", max_concurrency=3
    )
    await started(nursery, fake)
    entry = registry.get(fake.provider_id)
    assert entry is not None
    lease = registry.reserve(RequestTraits(model="m"))
    assert lease is not None and lease.entry is entry
    registry.record_ttft(entry, RequestTraits(model="m"), 0.25)
    registry.record_ttft(entry, RequestTraits(model="m", prompt_tokens=5000), 1.5)
    registry.record_success(entry, "m", "base", decode_tps=40.0)
    registry.record_failure(entry, "m", "base", 500)
    registry.record_failure(entry, "m", "base", 500)
    reply = await client.get("/v1/admin/providers", headers=AUTH)
    after = time.time()

    assert reply.status_code == 200
    (view,) = reply.json()["providers"]
    cooldown = daemon.supervisor.settings.breaker_cooldown_s
    (until,) = [c.pop("until") for c in view["cooldowns"]]
    (left,) = [c.pop("seconds_left") for c in view["cooldowns"]]
    assert view.pop("cooldowns") == [{"model": "m", "shape": "base"}]
    assert cooldown - 5 <= left <= cooldown
    assert before + cooldown - 1 <= until <= after + cooldown + 1
    last_challenge_at = view.pop("last_challenge_at")
    assert before <= last_challenge_at <= after
    assert view == {
        "provider_id": fake.provider_id,
        "version": "0.6.9",
        "backend": "vllm",
        # The render verdicts exactly as the node sent them: absent stays absent.
        "models": [
            {"id": "m", "template_render_ok": True, "is_vision": True},
            {"id": "n", "template_render_ok": False, "is_vision": False},
            {"id": "o", "template_render": {"tools": False}, "is_vision": False},
            {
                "id": "p",
                "template_render_ok": False,
                "template_render": {"base": True, "tools": False, "vision": True},
                "context_length": 8192,
                "is_vision": False,
            },
            {"id": "q", "template_render": {}, "is_vision": False},
        ],
        "in_flight": 1,
        "in_flight_by_model": {"m": 1},
        "max_concurrency": 3,
        "trusted": True,
        "draining": False,
        "drained": False,
        # Entering the cooldown forgot the strikes that caused it.
        "strikes": [],
        "decode_tps": {"m": 40.0},
        "speed": [
            {
                "model": "m",
                "prompt": "<1k",
                "samples": 1,
                "ttft_p50_ms": 250.0,
                "ttft_p95_ms": 250.0,
                "decode_tps": 40.0,
            },
            {
                "model": "m",
                "prompt": "4k-16k",
                "samples": 1,
                "ttft_p50_ms": 1500.0,
                "ttft_p95_ms": 1500.0,
                "decode_tps": 40.0,
            },
        ],
    }


async def test_the_provider_view_shows_an_untrusted_provider(
    client: httpx.AsyncClient, daemon: RunningDaemon, nursery: trio.Nursery
) -> None:
    fake = await started(nursery, FakeProvider(daemon.provider_url, sign_wrongly=True))
    reply = await client.get("/v1/admin/providers", headers=AUTH)
    (view,) = reply.json()["providers"]
    assert view["provider_id"] == fake.provider_id
    assert view["trusted"] is False
    assert view["last_challenge_at"] is not None
    assert view["cooldowns"] == []
    assert view["in_flight"] == 0


async def test_the_hedging_view_shows_the_policy_budget_counters_and_learned_points(
    client: httpx.AsyncClient, daemon: RunningDaemon, nursery: trio.Nursery
) -> None:
    fake = await started(nursery, FakeProvider(daemon.provider_url))
    registry = daemon.supervisor.registry
    entry = registry.get(fake.provider_id)
    assert entry is not None
    short, long = RequestTraits(model="m"), RequestTraits(model="m", prompt_tokens=2000)
    for ms in range(1, 41):  # 40 samples, 1 to 40 ms: a smooth body, no cliff
        registry.record_ttft(entry, short, ms / 1000)
    for _ in range(3):  # too few to learn from
        registry.record_ttft(entry, long, 0.5)
    daemon.supervisor.hedger.counters.started = 2

    reply = await client.get("/v1/admin/hedging", headers=AUTH)

    assert reply.status_code == 200
    view = reply.json()
    assert view["budget"].pop("dispatches") == view["budget"].pop("backups") == 0
    assert view == {
        "mode": "learned",
        "percentile": 95.0,
        "floor_ms": 50.0,
        "budget": {"share": 0.05, "window_s": 60.0, "available": False},
        "counters": {
            "started": 2,
            "won": 0,
            "skipped_overload": 0,
            "skipped_budget": 0,
            "skipped_no_provider": 0,
        },
        "models": [
            # p95 of 1..40 ms is 38 ms, under the 50 ms floor.
            {"model": "m", "prompt": "<1k", "samples": 40, "ttft_p50_ms": 20.0,
             "hedge_at_ms": 50.0, "source": "fleet"},
            # Too few samples: half the deadline of a 1,024-token prompt (5 s + 1.024 s).
            {"model": "m", "prompt": "1k-4k", "samples": 3, "ttft_p50_ms": 500.0,
             "hedge_at_ms": 3012.0, "source": "ratio"},
        ],
    }  # fmt: skip


async def test_a_token_the_cli_creates_is_accepted_by_the_running_daemon(
    start_daemon: StartDaemon, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    # `dinfer tokens create` writes the store from another process: the running daemon must
    # take the new token at the provider's first registration, without a restart.
    daemon = await start_daemon(provider_auth="token")
    data_dir = str(daemon.supervisor.settings.data_dir)
    argv = ["tokens", "create", "--name", "rig", "--data-dir", data_dir, "--json"]
    assert await trio.to_thread.run_sync(cli.main, argv) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    fake = await started(nursery, FakeProvider(daemon.provider_url, auth_token=token))
    assert fake.trusted.is_set(), fake.verdicts
    assert daemon.supervisor.registry.get(fake.provider_id) is not None
