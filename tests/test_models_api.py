"""`GET /v1/models` and `GET /v1/models/{id}`, end to end, in OpenAI's and Anthropic's shapes.

A real daemon, scripted fake providers connected over the real protocol, httpx and both
official SDKs (`openai`, `anthropic`) as consumers. What is listed is what a request could be
routed to right now, as the registry's one eligibility predicate says.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio

from protocol.messages import ModelInfo, TemplateRender
from tests.consumer_harness import (
    BOUND_S,
    UUID_RE,
    Api,
    assert_openai_error,
    chat_body,
    poll_until,
)
from tests.fakes.provider import Fail, always, role_chunk, start_fakes

ANTHROPIC = {"anthropic-version": "2023-06-01"}
QWEN = "Qwen/Qwen2.5-7B-Instruct"
LLAMA = "llama3:8b"


async def models(api: Api, path: str = "/v1/models", **headers: str) -> httpx.Response:
    with trio.fail_after(BOUND_S):
        return await api.client.get(path, headers={**api.auth, **headers})


def listed(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {entry["id"]: entry for entry in response.json()["data"]}


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    """The error has Anthropic's shape; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    assert body["error"]["message"]
    message: str = body["error"]["message"]
    return message


# OpenAI's shape -----------------------------------------------------------------------------


async def test_the_list_names_every_routable_model_with_what_a_client_needs(api: Api) -> None:
    await api.connect(
        api.fake(models=[ModelInfo(id=QWEN, context_length=8192), ModelInfo(id=LLAMA)]),
        api.fake(models=[ModelInfo(id=QWEN, context_length=32768, is_vision=True)]),
    )
    response = await models(api)
    assert UUID_RE.match(response.headers["x-request-id"])
    body = response.json()
    assert body["object"] == "list"
    assert [entry["id"] for entry in body["data"]] == [QWEN, LLAMA]  # sorted by id
    qwen, llama = body["data"]
    assert isinstance(qwen["created"], int) and qwen["created"] > 0
    assert qwen == {
        "id": QWEN,
        "object": "model",
        "created": qwen["created"],
        "owned_by": "dinfer",
        "providers": 2,
        "context_length": 32768,
        "capabilities": {"tools": True, "vision": True},
    }
    assert llama["providers"] == 1 and llama["context_length"] is None
    assert llama["capabilities"] == {"tools": True, "vision": False}


async def test_no_provider_means_an_empty_list(api: Api) -> None:
    assert (await models(api)).json() == {"object": "list", "data": []}


async def test_capabilities_follow_the_routing_gates(api: Api) -> None:
    """Tools need a new enough provider whose template renders tool turns; vision a vision
    model whose template renders images: the same gates a request meets."""
    await api.connect(
        api.fake(version="0.5.0", models=[ModelInfo(id="old", is_vision=True)]),
        api.fake(
            models=[
                ModelInfo(
                    id="no-tool-template",
                    is_vision=True,
                    template_render=TemplateRender(base=True, tools=False, vision=False),
                )
            ]
        ),
    )
    found = listed(await models(api))
    assert found["old"]["capabilities"] == {"tools": False, "vision": True}
    assert found["no-tool-template"]["capabilities"] == {"tools": False, "vision": False}


async def test_providers_nobody_can_route_to_are_not_counted(api: Api) -> None:
    await api.connect(
        api.fake(models=[ModelInfo(id="m", context_length=4096)]),
        api.fake(models=[ModelInfo(id="m", context_length=65536, template_render_ok=False)]),
        api.fake(models=[ModelInfo(id="broken", template_render_ok=False)]),
    )
    untrusted = api.fake(sign_wrongly=True, models=[ModelInfo(id="m"), ModelInfo(id="rogue")])
    (refused,) = await start_fakes(api.nursery, [untrusted])
    assert not refused.trusted.is_set()

    found = listed(await models(api))
    assert set(found) == {"m"}
    assert found["m"]["providers"] == 1
    assert found["m"]["context_length"] == 4096  # the unroutable provider's 65536 is not offered
    for absent in ("broken", "rogue"):
        response = await models(api, f"/v1/models/{absent}")
        assert_openai_error(response, 404, "model_not_found")


async def test_a_provider_cooling_down_for_plain_requests_still_serves_tools(api: Api) -> None:
    """The breaker keys by shape: the model stays listed while tool requests can route."""
    sick = api.fake(always([role_chunk(), Fail(500)]))
    await api.connect(sick)
    for _ in range(2):
        with trio.fail_after(BOUND_S):
            await api.client.post("/v1/chat/completions", json=chat_body(), headers=api.auth)
    with trio.fail_after(BOUND_S):
        plain = await api.client.post("/v1/chat/completions", json=chat_body(), headers=api.auth)
    assert "cooling down" in assert_openai_error(plain, 503)["message"]
    found = listed(await models(api))
    assert found["m"]["capabilities"] == {"tools": True, "vision": False}


async def test_a_model_leaves_the_list_when_its_provider_leaves(api: Api) -> None:
    (fake,) = await api.connect(api.fake(models=[ModelInfo(id="m"), ModelInfo(id="n")]))
    await api.connect(api.fake(models=[ModelInfo(id="m")]))
    assert set(listed(await models(api))) == {"m", "n"}
    entry = api.daemon.supervisor.registry.get(fake.provider_id)
    assert entry is not None
    entry.session.kick(1000, "test: the provider goes away")
    await poll_until(lambda: api.daemon.supervisor.registry.get(fake.provider_id) is None)
    found = listed(await models(api))
    assert set(found) == {"m"} and found["m"]["providers"] == 1


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/v1/models/{QWEN}", QWEN),
        ("/v1/models/Qwen%2FQwen2.5-7B-Instruct", QWEN),
        (f"/v1/models/{LLAMA}", LLAMA),
    ],
    ids=["slash", "percent-encoded-slash", "colon"],
)
async def test_one_model_by_an_id_with_slashes_or_colons(
    api: Api, path: str, expected: str
) -> None:
    await api.connect(
        api.fake(models=[ModelInfo(id=QWEN, context_length=8192), ModelInfo(id=LLAMA)])
    )
    response = await models(api, path)
    assert response.status_code == 200, response.text
    model = response.json()
    assert model["id"] == expected
    assert model == listed(await models(api))[expected]


@pytest.mark.parametrize("path", ["/v1/models/nope", "/v1/models/", "/v1/models/Qwen"])
async def test_an_unknown_id_is_404_model_not_found(api: Api, path: str) -> None:
    await api.connect(api.fake(models=[ModelInfo(id=QWEN)]))
    error = assert_openai_error(await models(api, path), 404, "model_not_found")
    assert path.removeprefix("/v1/models/") in error["message"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer dk_wrong"}, {"x-api-key": "dk_wrong"}],
    ids=["none", "bearer", "x-api-key"],
)
@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/m"])
async def test_a_missing_or_unknown_key_is_401(
    api: Api, headers: dict[str, str], path: str
) -> None:
    await api.connect(api.fake())
    with trio.fail_after(BOUND_S):
        response = await api.client.get(path, headers=headers)
    error = assert_openai_error(response, 401, "invalid_api_key")
    assert error["type"] == "authentication_error"


async def test_an_x_api_key_is_a_consumer_key_too(api: Api) -> None:
    await api.connect(api.fake())
    with trio.fail_after(BOUND_S):
        response = await api.client.get("/v1/models", headers={"x-api-key": api.key})
    assert set(listed(response)) == {"m"}


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/m"])
async def test_post_is_405(api: Api, path: str) -> None:
    with trio.fail_after(BOUND_S):
        response = await api.client.post(path, json={"model": "m"}, headers=api.auth)
    assert_openai_error(response, 405, "method_not_allowed")


# Anthropic's shape --------------------------------------------------------------------------


async def test_with_anthropic_version_the_list_has_anthropic_s_shape(api: Api) -> None:
    await api.connect(
        api.fake(models=[ModelInfo(id=QWEN, context_length=8192), ModelInfo(id=LLAMA)])
    )
    response = await models(api, **ANTHROPIC)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"data", "has_more", "first_id", "last_id"}
    assert (body["has_more"], body["first_id"], body["last_id"]) == (False, QWEN, LLAMA)
    qwen, llama = body["data"]
    created = datetime.fromisoformat(qwen["created_at"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and created.year >= 2024
    assert qwen == {
        "type": "model",
        "id": QWEN,
        "display_name": QWEN,
        "created_at": qwen["created_at"],
        "lifecycle": "active",
        "max_input_tokens": 8192,
    }
    assert llama["id"] == LLAMA and llama["max_input_tokens"] is None


async def test_anthropic_pages_follow_the_cursors(api: Api) -> None:
    ids = ["a", "b", "c", "d", "e"]
    await api.connect(api.fake(models=[ModelInfo(id=i) for i in ids]))

    async def page(query: str) -> dict[str, Any]:
        response = await models(api, f"/v1/models?{query}", **ANTHROPIC)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def summary(body: dict[str, Any]) -> tuple[list[str], bool, str | None, str | None]:
        names = [entry["id"] for entry in body["data"]]
        return names, body["has_more"], body["first_id"], body["last_id"]

    assert summary(await page("limit=2")) == (["a", "b"], True, "a", "b")
    assert summary(await page("limit=2&after_id=b")) == (["c", "d"], True, "c", "d")
    assert summary(await page("limit=2&after_id=d")) == (["e"], False, "e", "e")
    assert summary(await page("limit=2&before_id=e")) == (["c", "d"], True, "c", "d")
    assert summary(await page("limit=2&before_id=c")) == (["a", "b"], False, "a", "b")
    assert summary(await page("after_id=bb")) == (["c", "d", "e"], False, "c", "e")
    assert summary(await page("after_id=e")) == ([], False, None, None)


@pytest.mark.parametrize("limit", ["0", "1001", "x", "-1", "²", "9" * 5000])
async def test_a_bad_limit_is_400_in_anthropic_s_shape(api: Api, limit: str) -> None:
    response = await models(api, f"/v1/models?limit={limit}", **ANTHROPIC)
    assert "limit" in assert_anthropic_error(response, 400, "invalid_request_error")


async def test_one_model_in_anthropic_s_shape(api: Api) -> None:
    await api.connect(api.fake(models=[ModelInfo(id=QWEN, context_length=8192)]))
    response = await models(api, f"/v1/models/{QWEN}", **ANTHROPIC)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "type": "model",
        "id": QWEN,
        "display_name": QWEN,
        "created_at": response.json()["created_at"],
        "lifecycle": "active",
        "max_input_tokens": 8192,
    }
    missing = await models(api, "/v1/models/nope", **ANTHROPIC)
    assert "nope" in assert_anthropic_error(missing, 404, "not_found_error")


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/m"])
async def test_an_anthropic_client_without_a_key_gets_anthropic_s_401(api: Api, path: str) -> None:
    with trio.fail_after(BOUND_S):
        response = await api.client.get(path, headers={"x-api-key": "dk_wrong", **ANTHROPIC})
    assert "x-api-key" in assert_anthropic_error(response, 401, "authentication_error")


# The official SDKs ----------------------------------------------------------------------------


async def test_the_openai_sdk_lists_and_retrieves_models(api: Api) -> None:
    await api.connect(
        api.fake(models=[ModelInfo(id=QWEN, context_length=8192), ModelInfo(id=LLAMA)])
    )
    async with openai.AsyncOpenAI(
        base_url=api.daemon.base_url + "/v1", api_key=api.key, max_retries=0, timeout=BOUND_S
    ) as client:
        with trio.fail_after(BOUND_S):
            page = await client.models.list()
            assert [model.id for model in page.data] == [QWEN, LLAMA]
            assert {model.owned_by for model in page.data} == {"dinfer"}
            qwen = await client.models.retrieve(QWEN)
            assert qwen.id == QWEN and qwen.model_extra is not None
            assert qwen.model_extra["context_length"] == 8192
            assert (await client.models.retrieve(LLAMA)).id == LLAMA
            with pytest.raises(openai.NotFoundError) as missing:
                await client.models.retrieve("nope")
            assert missing.value.code == "model_not_found"


async def test_the_anthropic_sdk_lists_models(api: Api) -> None:
    await api.connect(
        api.fake(models=[ModelInfo(id=QWEN, context_length=8192), ModelInfo(id=LLAMA)])
    )
    async with anthropic.AsyncAnthropic(
        base_url=api.daemon.base_url, api_key=api.key, max_retries=0, timeout=BOUND_S
    ) as client:
        with trio.fail_after(BOUND_S):
            page = await client.models.list()
            assert [model.id for model in page.data] == [QWEN, LLAMA]
            assert page.has_more is False
            assert page.data[0].display_name == QWEN
            assert page.data[0].created_at.tzinfo is not None
            assert (await client.models.retrieve(LLAMA)).id == LLAMA
            with pytest.raises(anthropic.NotFoundError):
                await client.models.retrieve("nope")
    async with anthropic.AsyncAnthropic(
        base_url=api.daemon.base_url, api_key="dk_wrong", max_retries=0, timeout=BOUND_S
    ) as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.models.list()
