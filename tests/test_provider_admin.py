"""An operator's hands on a provider: drain it, undrain it, clear its cooldowns; and
`dinfer providers`, which asks the running daemon.

A real daemon, scripted fake providers and real HTTP; each test names what the operator
sees: where requests go, what the provider view says, what the command prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from dinfer import cli
from tests.conftest import ADMIN_KEY
from tests.consumer_harness import (
    ADMIN,
    BOUND_S,
    Api,
    assert_openai_error,
    chat_body,
    dispatches,
    in_turn,
    poll_until,
    sse_events,
    streamed_text,
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
)


async def view_of(api: Api, fake: FakeProvider) -> dict[str, Any]:
    reply = await api.client.get("/v1/admin/providers", headers=ADMIN)
    assert reply.status_code == 200
    (view,) = [p for p in reply.json()["providers"] if p["provider_id"] == fake.provider_id]
    return view


async def admin_call(api: Api, method: str, path: str) -> httpx.Response:
    with trio.fail_after(BOUND_S):
        return await api.client.request(method, path, headers=ADMIN)


async def test_a_drained_provider_gets_no_new_requests_but_finishes_its_own(
    api: Api, nursery: trio.Nursery
) -> None:
    release = trio.Event()
    held = api.fake(in_turn([role_chunk(), content_chunk("held"), Hold(release), Complete()]))
    (held,) = await api.connect(held)
    answers: list[httpx.Response] = []

    async def in_flight() -> None:
        body = chat_body(stream=True)
        answers.append(await api.client.post("/v1/chat/completions", json=body, headers=api.auth))

    nursery.start_soon(in_flight)
    with trio.fail_after(BOUND_S):
        await held.request_seen.wait()
    (other,) = await api.connect(api.fake(always(answer("from the other"))))

    drained = await admin_call(api, "POST", f"/v1/admin/providers/{held.provider_id}/drain")
    assert drained.status_code == 200
    assert drained.json() == {
        "provider_id": held.provider_id,
        "drained": True,
        "in_flight": 1,
        "applied": "local",
    }
    view = await view_of(api, held)
    assert view["drained"] is True and view["in_flight_by_model"] == {"m": 1}
    for _ in range(3):
        response = await api.chat()
        assert response.headers["x-provider-id"] == other.provider_id
    assert dispatches(held) == 1

    release.set()
    await poll_until(lambda: bool(answers))
    (finished,) = answers
    assert finished.status_code == 200
    assert streamed_text(sse_events(finished.text)) == "held"


async def test_a_drained_only_provider_is_503_and_undraining_serves_again(api: Api) -> None:
    (fake,) = await api.connect(api.fake())
    await admin_call(api, "POST", f"/v1/admin/providers/{fake.provider_id}/drain")
    error = assert_openai_error(await api.chat(), 503)
    assert "drained by the operator" in error["message"]

    undrained = await admin_call(api, "DELETE", f"/v1/admin/providers/{fake.provider_id}/drain")
    assert undrained.json()["drained"] is False
    assert (await api.chat()).headers["x-provider-id"] == fake.provider_id


async def test_a_reconnect_undrains(api: Api) -> None:
    (first,) = await api.connect(api.fake())
    await admin_call(api, "POST", f"/v1/admin/providers/{first.provider_id}/drain")
    registry = api.daemon.supervisor.registry
    old = registry.get(first.provider_id)

    # The same identity connects again (a restarted node): a new session, routable again.
    (again,) = await api.connect(api.fake(identity=first.identity, box_key=first.box_key))
    await poll_until(lambda: registry.get(first.provider_id) not in (None, old))
    assert (await view_of(api, again))["drained"] is False
    assert (await api.chat()).headers["x-provider-id"] == first.provider_id


async def test_clearing_cooldowns_serves_a_cooled_provider_at_once(api: Api) -> None:
    behave = in_turn([role_chunk(), Fail(500)], [role_chunk(), Fail(500)], answer("healed"))
    (fake,) = await api.connect(api.fake(behave))
    for _ in range(2):
        assert_openai_error(await api.chat(), 502)
    assert_openai_error(await api.chat(), 503)  # cooling down
    view = await view_of(api, fake)
    (cooldown,) = view["cooldowns"]
    assert (cooldown["model"], cooldown["shape"]) == ("m", "base")
    assert 0 < cooldown["seconds_left"] <= api.daemon.supervisor.settings.breaker_cooldown_s

    cleared = await admin_call(api, "DELETE", f"/v1/admin/providers/{fake.provider_id}/cooldowns")
    assert cleared.json() == {"provider_id": fake.provider_id, "cleared": 1, "applied": "local"}

    response = await api.chat()
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "healed"
    assert (await view_of(api, fake))["cooldowns"] == []


async def test_a_strike_short_of_a_cooldown_is_in_the_view(api: Api) -> None:
    behave = in_turn([role_chunk(), Fail(500)], answer("fine"))
    (fake,) = await api.connect(api.fake(behave))
    assert_openai_error(await api.chat(), 502)
    view = await view_of(api, fake)
    assert view["strikes"] == [{"model": "m", "shape": "base", "strikes": 1}]
    assert view["cooldowns"] == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v1/admin/providers/nobody/cooldowns"),
        ("POST", "/v1/admin/providers/nobody/drain"),
        ("DELETE", "/v1/admin/providers/nobody/drain"),
    ],
)
async def test_an_unknown_provider_is_404(api: Api, method: str, path: str) -> None:
    reply = await admin_call(api, method, path)
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "provider_not_found"


# dinfer providers ---------------------------------------------------------------------------


@pytest.fixture
def clean_env() -> Iterator[None]:
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("DINFER_")]:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_cli(*argv: str, **env: str) -> int:
    os.environ.update(env)
    return cli.main(list(argv))


async def test_dinfer_providers_prints_a_table_and_json(
    api: Api, clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (fake,) = await api.connect(api.fake(version="0.7.1"))
    env = {"DINFER_LISTEN": api.daemon.base_url.removeprefix("http://"),
           "DINFER_ADMIN_KEY": ADMIN_KEY}  # fmt: skip

    assert await trio.to_thread.run_sync(lambda: run_cli("providers", **env)) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["PROVIDER", "VERSION", "STATE", "IN", "FLIGHT", "MODELS", "TTFT",
                              "p50", "COOLDOWNS"]  # fmt: skip
    assert row.split()[:5] == [fake.provider_id, "0.7.1", "serving", "0/4", "m"]

    assert await trio.to_thread.run_sync(lambda: run_cli("providers", "--json", **env)) == 0
    (view,) = json.loads(capsys.readouterr().out)["providers"]
    assert view["provider_id"] == fake.provider_id and view["drained"] is False


async def test_dinfer_providers_says_when_the_key_is_missing_or_the_daemon_is_down(
    api: Api, clean_env: None
) -> None:
    listen = api.daemon.base_url.removeprefix("http://")
    with pytest.raises(SystemExit, match="DINFER_ADMIN_KEY or DINFER_ADMIN_KEY_FILE"):
        await trio.to_thread.run_sync(lambda: run_cli("providers", DINFER_LISTEN=listen))
    with pytest.raises(SystemExit, match="refused the admin key"):
        await trio.to_thread.run_sync(
            lambda: run_cli("providers", DINFER_LISTEN=listen, DINFER_ADMIN_KEY="wrong")
        )
    with pytest.raises(SystemExit, match=r"no daemon answers at http://127.0.0.1:9 .*running"):
        await trio.to_thread.run_sync(
            lambda: run_cli("providers", DINFER_LISTEN="127.0.0.1:9", DINFER_ADMIN_KEY="k")
        )
