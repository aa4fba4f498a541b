"""A key's limits across a cluster: two daemons on one store and one redis-server (what
`dinfer serve --workers 2` runs), a key with limits spent on one is refused on the other
within the staleness bound (daemon/cluster/limits.py), in the route's own error shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemon.api.serve import RunningDaemon, serve
from daemon.config import load_settings
from tests.consumer_harness import ADMIN, chat_body
from tests.fakes.provider import FakeProvider, start_fakes
from tests.test_cluster import ENV, REDIS, Redis, _free_port
from tests.test_key_policy_api import assert_route_error

pytestmark = [
    pytest.mark.skipif(REDIS is None, reason="needs redis-server"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),  # see test_cluster's `world`
]
BOUND_S = 10.0
# Two ticks of daemon/cluster/limits.py plus round trips on a loaded 2-core machine.
STALE_S = 0.5


async def _worker(settings: Any, *, task_status: trio.TaskStatus[Any]) -> None:
    async with trio.open_nursery() as nursery:
        run = partial(serve, settings, shutdown_trigger=trio.sleep_forever, seed=7, worker=True)
        daemon = await nursery.start(run)
        task_status.started((daemon, nursery.cancel_scope))


@pytest.fixture
async def pair(cluster: tuple[list[httpx.AsyncClient], Redis]) -> list[httpx.AsyncClient]:
    return cluster[0]


@pytest.fixture
async def cluster(
    nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[tuple[list[httpx.AsyncClient], Redis]]:
    """Two daemons on one store, the first with a provider (the second routes to it)."""
    redis = Redis(_free_port(), tmp_path)
    await redis.start()
    env = {**ENV, "DINFER_DATA_DIR": str(tmp_path / "data"), "DINFER_REDIS_URL": redis.url}
    scopes: list[trio.CancelScope] = []
    clients: list[httpx.AsyncClient] = []
    try:
        for _ in range(2):
            daemon: RunningDaemon
            daemon, scope = await nursery.start(_worker, load_settings(env))
            scopes.append(scope)
            clients.append(httpx.AsyncClient(base_url=daemon.base_url, timeout=BOUND_S))
            if len(clients) == 1:
                started = await start_fakes(nursery, [FakeProvider(daemon.provider_url)])
                assert started[0].trusted.is_set()
        yield clients, redis
    finally:
        for client in clients:
            await client.aclose()
        for scope in scopes:
            scope.cancel(reason="the test is over")
        redis.kill()


async def _key(client: httpx.AsyncClient, **limits: Any) -> dict[str, str]:
    reply = await client.post("/v1/admin/keys", json={"name": "app", **limits}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    return {"Authorization": f"Bearer {reply.json()['key']}"}


async def _chat(client: httpx.AsyncClient, auth: dict[str, str]) -> httpx.Response:
    with trio.fail_after(BOUND_S):
        return await client.post("/v1/chat/completions", json=chat_body(), headers=auth)


async def test_a_keys_rpm_spent_on_one_daemon_is_refused_on_the_other(
    pair: list[httpx.AsyncClient],
) -> None:
    a, b = pair
    auth = await _key(a, rpm=2)
    with trio.fail_after(BOUND_S):  # b routes to a's provider once it is in b's directory
        while (await _chat(b, await _key(a))).status_code != 200:  # noqa: ASYNC110 - bounded
            await trio.sleep(0.05)
    for _ in range(2):
        assert (await _chat(a, auth)).status_code == 200
    spent = trio.current_time()
    served_by_b = 0
    with trio.fail_after(BOUND_S):
        while (reply := await _chat(b, auth)).status_code != 429:
            assert reply.status_code == 200  # b had not heard yet: served from its own bucket
            served_by_b += 1
    assert trio.current_time() - spent < STALE_S
    assert served_by_b <= 2  # at most b's own bucket, admitted before a's spending reached it
    message = assert_route_error(reply, "openai", 429, "rate_limit_exceeded")
    assert "2 requests per minute" in message
    # The cluster's bucket refills at 2 a minute: 30 s for each request past the limit.
    assert 1 <= int(reply.headers["retry-after"]) <= 30 * (1 + served_by_b)
    assert reply.headers["x-ratelimit-remaining-requests"] == "0"


async def test_a_redis_restart_does_not_hand_a_spent_key_a_fresh_bucket(
    cluster: tuple[list[httpx.AsyncClient], Redis],
) -> None:
    """Redis restarted empty: every share is gone at once, not 3 s old. What a peer spent
    still counts until its share is SHARE_TTL_S old (the peer writes it again within 1 s)."""
    (a, b), redis = cluster
    auth = await _key(a, rpm=2)
    for _ in range(2):
        assert (await _chat(a, auth)).status_code == 200
    await trio.sleep(STALE_S)  # b hears of a's spending before its first try...
    assert (await _chat(b, auth)).status_code == 429  # ...so its own bucket is full
    redis.kill()
    await redis.start()
    statuses = []
    with trio.move_on_after(1.5):  # a writes its share again within 1 s of the restart
        while True:
            statuses.append((await _chat(b, auth)).status_code)
            await trio.sleep(0.02)
    assert statuses and set(statuses) == {429}, statuses
