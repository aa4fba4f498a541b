"""Security suite: every route needs its credential (tests/attacks.py, `attack_credentials`).

The route table is read from the code, so a route added later is attacked too.
"""

from __future__ import annotations

import json

import httpx

from tests.attacks import Target, attack_credentials, chat, route_table
from tests.security_fixtures import assert_refused


async def test_the_route_table_is_read_from_the_code(target: Target) -> None:
    table = {(route.path, route.admin) for route in route_table(target.daemon)}
    assert ("/v1/chat/completions", False) in table
    assert ("/v1/models/attack-sample-id", False) in table
    assert ("/v1/admin/keys/attack-sample-id", True) in table
    assert not {path for path, _ in table} & {"/health", "/readyz", "/ws/provider"}
    admin = [r for r in route_table(target.daemon) if r.path == "/v1/admin/keys/attack-sample-id"]
    assert any("DELETE" in route.methods for route in admin)


async def test_quart_serves_no_static_files(target: Target) -> None:
    """Regression: quart's default `/static/<path:filename>` route served files from
    daemon/api/static with no credential; the daemon has no static files."""
    assert not [r for r in route_table(target.daemon) if r.path.startswith("/static")]


async def test_every_route_refuses_a_missing_wrong_revoked_or_misplaced_credential(
    target: Target,
) -> None:
    assert_refused(await attack_credentials(target))


async def test_an_unauthenticated_body_over_the_limit_is_401_and_never_buffered(
    target: Target,
) -> None:
    """Regression: the key was checked after the whole body was read, so a client without a
    key could make the daemon buffer up to DINFER_MAX_BODY_BYTES per request."""
    limit = target.sup.settings.max_body_bytes
    big = json.dumps(chat()).encode() + b" " * limit
    async with httpx.AsyncClient(base_url=target.daemon.base_url, timeout=10) as client:
        response = await client.post("/v1/chat/completions", content=big)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
