"""Regression tests for what schemathesis found against the daemon (tests/test_openapi_fuzz.py):
each a defect a client could trigger, pinned by the status and shape the client now gets."""

from __future__ import annotations

import pytest

from tests.consumer_harness import ADMIN, Api, assert_openai_error, create_key

HUGE = 2**64  # past SQLite's INTEGER


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
