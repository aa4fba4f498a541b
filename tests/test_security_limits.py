"""Security suite: hostile bodies, sizes, the queue, held boilerplate and hostile
connections (tests/attacks.py); none pins a request, a slot, a queue entry or a task."""

from __future__ import annotations

import httpx
import pytest
import trio

from tests.attacks import (
    Target,
    attack_bodies,
    attack_connections,
    attack_held_boilerplate,
    attack_queue,
    attack_sizes,
)
from tests.security_fixtures import assert_no_leak, assert_refused, task_count


async def test_an_admin_body_nested_too_deeply_is_400_not_500(target: Target) -> None:
    """Regression: quart's JSON (the stdlib's) raised RecursionError on 100,000 nested
    arrays, which is no ValueError, so `get_json(silent=True)` let it out as a 500."""
    async with httpx.AsyncClient(base_url=target.daemon.base_url, timeout=10) as client:
        response = await client.post(
            "/v1/admin/keys", content=b"[" * 100_000 + b"]" * 100_000, headers=target.admin
        )
    assert response.status_code == 400, response.text


async def test_an_admin_body_that_is_not_utf8_is_400_not_500(target: Target) -> None:
    """Regression: quart's get_json decodes the body as UTF-8 outside its ValueError guard,
    so a non-UTF-8 admin body was a UnicodeDecodeError and a 500."""
    async with httpx.AsyncClient(base_url=target.daemon.base_url, timeout=10) as client:
        response = await client.post(
            "/v1/admin/provider-tokens", content=b'{"name": "\xff"}', headers=target.admin
        )
    assert response.status_code == 400, response.text


# httpx's body generator, cut short when a route answers (404) without reading a big body.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_hostile_json_on_every_body_route_is_a_4xx_never_a_500(target: Target) -> None:
    baseline = task_count()
    assert_refused(await attack_bodies(target))
    await assert_no_leak(target, baseline)


async def test_size_limits_hold_and_an_oversized_provider_frame_ends_only_its_session(
    target: Target,
) -> None:
    baseline = task_count()
    assert_refused(await attack_sizes(target))
    await assert_no_leak(target, baseline)


async def test_the_queue_bound_pins_nothing(target: Target) -> None:
    baseline = task_count()
    with trio.fail_after(30):
        assert_refused(await attack_queue(target))
    await assert_no_leak(target, baseline)


async def test_held_boilerplate_pins_nothing(target: Target) -> None:
    baseline = task_count()
    with trio.fail_after(40):
        assert_refused(await attack_held_boilerplate(target))
    await assert_no_leak(target, baseline)


async def test_idle_slow_and_non_reading_clients_pin_nothing(target: Target) -> None:
    baseline = task_count()
    with trio.fail_after(40):
        assert_refused(await attack_connections(target))
    await assert_no_leak(target, baseline)
