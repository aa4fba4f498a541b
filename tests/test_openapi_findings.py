"""Regression tests for what schemathesis found against the daemon (tests/test_openapi_fuzz.py):
each a defect a client could trigger, pinned by the status and shape the client now gets."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator

from daemon.api.openapi import PATHS, document
from tests.consumer_harness import ADMIN, HELLO, Api, assert_openai_error, create_key

HUGE = 2**64  # past SQLite's INTEGER
ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "m", "messages": HELLO}),
    ("/v1/completions", {"model": "m", "prompt": "hi"}),
    ("/v1/responses", {"model": "m", "input": "hi"}),
    ("/v1/messages", {"model": "m", "max_tokens": 64, "messages": HELLO}),
]


@pytest.mark.parametrize("field", ["rpm", "tpm", "daily_tokens", "max_concurrency"])
async def test_a_limit_too_large_for_the_store_is_a_400_not_a_500(api: Api, field: str) -> None:
    created = await api.client.post(
        "/v1/admin/keys", json={"name": "big", field: HUGE}, headers=ADMIN
    )
    assert assert_openai_error(created, 400, "invalid_limit")["param"] == field
    key_id, _ = await create_key(api.client)
    patched = await api.client.patch(f"/v1/admin/keys/{key_id}", json={field: HUGE}, headers=ADMIN)
    assert assert_openai_error(patched, 400, "invalid_limit")["param"] == field
    largest = await api.client.patch(
        f"/v1/admin/keys/{key_id}", json={field: 2**63 - 1}, headers=ADMIN
    )
    assert largest.status_code == 200 and largest.json()[field] == 2**63 - 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/admin/keys"),
        ("PATCH", "/v1/admin/keys/{id}"),
        ("POST", "/v1/admin/provider-tokens"),
    ],
)
async def test_an_admin_body_that_is_not_utf8_is_a_400_not_a_500(
    api: Api, method: str, path: str
) -> None:
    key_id, _ = await create_key(api.client)
    response = await api.client.request(
        method,
        path.format(id=key_id),
        content=b'{"name": "\xac\x8f"}',
        headers={**ADMIN, "content-type": "application/json"},
    )
    assert_openai_error(response, 400)


def _events(text: str) -> list[dict[str, str]]:
    """The events of an SSE body as schemathesis reads them: `{"event"?, "data"}`."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        events.append({name: fields[name] for name in ("event", "data") if name in fields})
    return events


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator({**document(), **schema})  # `#/components/...` resolves here


@pytest.mark.parametrize(("path", "body"), ROUTES)
async def test_every_inference_answer_matches_the_document(
    api: Api, path: str, body: dict[str, Any]
) -> None:
    """Found by schemathesis: the document gave a stream's events the schema of a string."""
    await api.connect(api.fake())
    content = PATHS[path]["post"]["responses"]["200"]["content"]
    whole = await api.client.post(path, json=body, headers=api.auth)
    assert whole.status_code == 200, whole.text
    _validator(content["application/json"]["schema"]).validate(whole.json())
    streamed = await api.client.post(path, json={**body, "stream": True}, headers=api.auth)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed.text)
    assert events
    for event in events:
        _validator(content["text/event-stream"]["schema"]).validate(event)
