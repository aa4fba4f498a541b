"""What a cluster shares besides providers: queue limits, operators' orders, breaker successes.

Real daemons on loopback against a redis-server started here (tests/test_cluster.py's
fixtures), scripted fake providers speaking the real protocol. Every wait has a bound.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import httpx
import pytest
import trio

from protocol.messages import ModelInfo
from tests import test_cluster
from tests.consumer_harness import ADMIN, assert_openai_error, chat_body, poll_until
from tests.fakes.provider import Fail, Script, Stall, always, answer
from tests.test_cluster import BOUND_S, REDIS, Node, World, sees
from tests.test_messages_api import assert_anthropic_error

pytestmark = [
    pytest.mark.skipif(REDIS is None, reason="needs redis-server"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),  # see test_cluster's `world`
]
world = test_cluster.world  # the fixture: a redis-server and daemons sharing it
QUEUED = {"DINFER_QUEUE_MAX": "2", "DINFER_QUEUE_TIMEOUT_S": "30"}


async def admin(node: Node, method: str, path: str) -> httpx.Response:
    with trio.fail_after(BOUND_S):
        return await node.client.request(method, path, headers=ADMIN)


def breaker_of(node: Node) -> Any:
    return node.daemon.supervisor.registry.breaker


# Queue limits -------------------------------------------------------------------------------


async def test_a_queue_filled_through_one_instance_is_full_on_another(world: World) -> None:
    a, b = await world.node(**QUEUED), await world.node(**QUEUED)
    busy = b.fake(behaviour=always([Stall()]), max_concurrency=1)
    await world.connect(busy)
    await sees(a, busy)
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # one holds the provider's only slot, two wait at a
            nursery.start_soon(a.chat)
        queue = a.daemon.supervisor.queue
        await poll_until(lambda: queue.waiting("m") == 2)
        filled_at = trio.current_time()
        assert b.cluster.queues is not None
        depths = b.cluster.queues.depths
        await poll_until(lambda: depths.totals() == {"m": 2})
        heard_after = trio.current_time() - filled_at
        # The owner of the provider refuses at once, in each route's own shape.
        full = assert_openai_error(await b.chat(), 429, "queue_full")
        assert "full (2 waiting in the cluster)" in full["message"]
        with trio.fail_after(BOUND_S):
            messages = await b.client.post(
                "/v1/messages",
                json={**chat_body(), "max_tokens": 16},
                headers={"Authorization": f"Bearer {b.key}"},
            )
        assert_anthropic_error(messages, 429, "rate_limit_error")
        assert messages.headers["retry-after"]
        assert b.daemon.supervisor.queue.waiting("m") == 0
        nursery.cancel_scope.cancel(reason="the test is over")
    # The waiters left a's queue: b hears it and admits to its queue again.
    await poll_until(lambda: depths.totals() == {})
    assert heard_after < 0.5  # COALESCE_S (20 ms) and one batch; generous for a loaded machine


async def test_each_models_queue_is_limited_on_its_own(world: World) -> None:
    a, b = await world.node(**QUEUED), await world.node(**QUEUED)
    busy = a.fake(behaviour=always([Stall()]), max_concurrency=1, models=[ModelInfo(id="m")])
    other = b.fake(behaviour=always([Stall()]), max_concurrency=1, models=[ModelInfo(id="n")])
    await world.connect(busy, other)
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(a.chat)
        await poll_until(lambda: a.daemon.supervisor.queue.waiting("m") == 2)
        shared = b.cluster.queues
        assert shared is not None
        await poll_until(lambda: shared.depths.totals() == {"m": 2})
        # Another model's queue is its own.
        for _ in range(2):  # one takes n's slot, one waits: m's waiters do not count for n
            nursery.start_soon(partial(b.chat, model="n"))
        await poll_until(lambda: b.daemon.supervisor.queue.waiting("n") == 1)
        nursery.cancel_scope.cancel(reason="the test is over")


# Operators' orders ----------------------------------------------------------------------------


async def test_a_drain_of_a_remote_provider_is_applied_by_its_owner(world: World) -> None:
    a, b, c = await world.node(), await world.node(), await world.node()
    fake = b.fake()
    await world.connect(fake)
    await sees(a, fake)
    await sees(c, fake)
    path = f"/v1/admin/providers/{fake.provider_id}/drain"
    drained = await admin(a, "POST", path)
    assert drained.status_code == 200, drained.text
    assert drained.json() == {
        "provider_id": fake.provider_id,
        "drained": True,
        "in_flight": 0,
        "applied": "forwarded",
        "owner": b.cluster.instance,
    }
    owner_entry = b.daemon.supervisor.registry.get(fake.provider_id)
    assert owner_entry is not None and owner_entry.held
    asked_at = trio.current_time()
    third = c.daemon.supervisor.registry
    await poll_until(lambda: third.get(fake.provider_id).held)  # type: ignore[union-attr]
    assert trio.current_time() - asked_at < 0.5  # one publish (10 ms) and one read
    assert (await c.chat()).status_code == 503
    assert (await a.chat()).status_code == 503
    undrained = await admin(c, "DELETE", path)
    assert undrained.json()["applied"] == "forwarded" and not undrained.json()["drained"]
    await poll_until(lambda: not a.daemon.supervisor.registry.get(fake.provider_id).held)  # type: ignore[union-attr]
    assert (await a.chat()).status_code == 200
    # The owner's own admin applies it locally.
    local = await admin(b, "POST", path)
    assert local.json()["applied"] == "local" and "owner" not in local.json()


async def test_a_cooldown_reset_of_a_remote_provider_is_applied_by_its_owner(
    world: World,
) -> None:
    a, b = await world.node(), await world.node()
    failing = True

    def behaviour(_body: dict[str, Any]) -> Script:
        return [Fail(500)] if failing else answer("Hello", " world")

    fake = b.fake(behaviour=behaviour)
    await world.connect(fake)
    await sees(a, fake)
    key = (fake.provider_id, "m", "base")
    for _ in range(2):  # DINFER_BREAKER_THRESHOLD
        assert (await a.chat()).status_code == 502
    await poll_until(lambda: breaker_of(a).in_cooldown(key, trio.current_time()))
    assert breaker_of(b).in_cooldown(key, trio.current_time())
    failing = False
    cleared = await admin(a, "DELETE", f"/v1/admin/providers/{fake.provider_id}/cooldowns")
    assert cleared.status_code == 200, cleared.text
    assert cleared.json() == {
        "provider_id": fake.provider_id,
        "cleared": 1,
        "applied": "forwarded",
        "owner": b.cluster.instance,
    }
    assert not breaker_of(b).in_cooldown(key, trio.current_time())
    assert not breaker_of(a).in_cooldown(key, trio.current_time())
    assert (await a.chat()).status_code == 200
    # Its cooldowns kept in Redis for its next owner are gone too.
    with trio.fail_after(BOUND_S):
        while await _cooldowns_kept(world, fake.provider_id):  # noqa: ASYNC110 - bounded
            await trio.sleep(0.01)


async def _cooldowns_kept(world: World, provider_id: str) -> bool:
    import coredis

    async with coredis.Redis.from_url(world.redis.url) as redis:
        return bool(await redis.exists([f"dinfer:cool:{provider_id}"]))


async def test_an_order_for_an_unreachable_owner_is_a_503(world: World) -> None:
    a, b = await world.node(), await world.node()
    fake = b.fake()
    await world.connect(fake)
    await sees(a, fake)
    world.redis.kill()
    await poll_until(lambda: not a.cluster.up)
    reply = await admin(a, "POST", f"/v1/admin/providers/{fake.provider_id}/drain")
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "owner_unreachable"
    assert b.cluster.instance in error["message"]
    assert not b.daemon.supervisor.registry.get(fake.provider_id).held  # type: ignore[union-attr]


# Breaker successes ----------------------------------------------------------------------------


async def test_a_success_at_an_ingress_resets_the_owners_strikes(world: World) -> None:
    a, b = await world.node(), await world.node()
    failing = True

    def behaviour(_body: dict[str, Any]) -> Script:
        return [Fail(500)] if failing else answer("Hello", " world")

    fake = b.fake(behaviour=behaviour)
    await world.connect(fake)
    await sees(a, fake)
    strikes = lambda: breaker_of(b).strikes(fake.provider_id, trio.current_time())  # noqa: E731
    assert (await a.chat()).status_code == 502
    await poll_until(lambda: strikes() == [("m", "base", 1)])
    failing = False
    assert (await a.chat()).status_code == 200
    succeeded_at = trio.current_time()
    await poll_until(lambda: strikes() == [])
    assert trio.current_time() - succeeded_at < 0.5  # FLUSH_S (50 ms) and one batch
    # So one more failure does not open the breaker: it counts from zero, as a local one.
    failing = True
    assert (await a.chat()).status_code == 502
    await poll_until(lambda: strikes() == [("m", "base", 1)])
    assert not breaker_of(b).in_cooldown((fake.provider_id, "m", "base"), trio.current_time())


async def test_a_dispatch_racing_a_hold_is_answered_busy_by_the_owner_without_a_strike(
    world: World,
) -> None:
    # The owner holds its provider (a deploy drain, an operator's drain) and the ingress has not
    # seen it yet: the owner answers busy, as the provider would; nothing reaches the provider,
    # nobody strikes it.
    a, b = await world.node(), await world.node()
    fake = b.fake()
    await world.connect(fake)
    await sees(a, fake)
    entry = b.daemon.supervisor.registry.get(fake.provider_id)
    assert entry is not None
    entry.held = True  # not published: a still routes to it
    reply = await a.chat()
    assert reply.status_code == 503, reply.text
    assert fake.received == []
    assert breaker_of(b).strikes(fake.provider_id, trio.current_time()) == []
