"""Rebalancing and deploy drains on loopback: a redis-server started here, real daemons, and
fake providers behind a stand-in balancer (round robin over the daemons not draining, as a
load balancer reading /readyz would be) that reconnect at once after a 1001.

Rebalancing converges with 3 daemons and every provider on one, never cutting a stream; a
drained daemon's providers land on the others while a relayed stream completes; two drains
told at once take turns. Every wait has a bound.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import trio

from daemon.api.serve import serve
from daemon.cluster.drain import LOCK_KEY
from daemon.config import load_settings
from protocol.messages import ModelInfo
from tests import test_cluster
from tests.consumer_harness import chat_body, create_key, poll_until
from tests.fakes.provider import (
    Chunk,
    Complete,
    FakeProvider,
    Hold,
    Script,
    always,
    answer,
    content_chunk,
    finish_chunk,
    role_chunk,
)
from tests.test_cluster import BOUND_S, ENV, Node, World, pytestmark  # noqa: F401

world = test_cluster.world  # the fixture: a redis-server and the daemons on it
EVERY = "0.1"  # DINFER_REBALANCE_EVERY_S: ten rounds a second, so a test takes seconds


async def start(world: World, **overrides: str) -> tuple[Node, trio.Event]:
    """A daemon of the world that drains when the returned event is set."""
    env = {**ENV, "DINFER_REBALANCE_EVERY_S": "0", **overrides}
    env["DINFER_DATA_DIR"] = str(world.tmp / f"d{len(world.nodes)}")
    env["DINFER_REDIS_URL"] = world.redis.url
    drain = trio.Event()
    done = trio.Event()
    daemon, scope = await world.nursery.start(_host, load_settings(env), done, drain)
    client = httpx.AsyncClient(base_url=daemon.base_url, timeout=BOUND_S)
    node = Node(daemon, scope, client, done)
    _, node.key = await create_key(client)
    world.nodes.append(node)
    return node, drain


async def _host(
    settings: Any, done: trio.Event, drain: trio.Event, *, task_status: trio.TaskStatus[Any]
) -> None:
    try:
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(
                partial(serve, settings, shutdown_trigger=drain.wait, seed=7)
            )
            task_status.started((daemon, nursery.cancel_scope))
    finally:
        done.set()


@dataclass
class Balancer:
    nodes: list[Node]
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def pick(self) -> Node:
        up = [n for n in self.nodes if not n.daemon.supervisor.draining and not n.done.is_set()]
        return up[next(self._turn) % len(up)]


@dataclass
class Roamer:
    """One provider identity: connects to `first`, after each 1001 to the balancer's pick."""

    balancer: Balancer
    first: Node
    script: Script = field(default_factory=lambda: answer("Hello", " world"))
    model: str = "m"
    fake: FakeProvider | None = None
    homes: list[Node] = field(default_factory=list)
    # (the close code, the time) of each session's end
    ends: list[tuple[int | None, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._keys = FakeProvider("")

    @property
    def provider_id(self) -> str:
        return self._keys.provider_id

    @property
    def home(self) -> Node | None:
        """The daemon holding its socket now."""
        for node in self.balancer.nodes:
            entry = node.daemon.supervisor.registry.get(self.provider_id)
            if entry is not None and entry.owner is None and entry.last_challenge_pass is not None:
                return node
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        target = self.first
        while True:
            self.fake = FakeProvider(
                target.daemon.provider_url,
                behaviour=always(self.script),
                models=[ModelInfo(id=self.model)],
                box_key=self._keys.box_key,
                identity=self._keys.identity,
            )
            self.homes.append(target)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.fake.run)
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
            self.ends.append((self.fake.close_code, trio.current_time()))
            if self.fake.close_code != 1001:
                return
            target = self.balancer.pick()


async def roam(world: World, roamers: list[Roamer]) -> None:
    for roamer in roamers:
        await world.nursery.start(roamer.run)
    await poll_until(lambda: all(r.home is r.first for r in roamers), bound=BOUND_S)


def held_script(release: trio.Event) -> Script:
    return [
        role_chunk(),
        content_chunk("first"),
        Hold(release),
        content_chunk(" second"),
        finish_chunk(),
        Chunk("data: [DONE]"),
        Complete(),
    ]


async def stream_until_first(node: Node, model: str, into: list[str], seen: trio.Event) -> None:
    body = chat_body(stream=True, model=model)
    auth = {"Authorization": f"Bearer {node.key}"}
    with trio.fail_after(BOUND_S * 3):
        async with node.client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
            assert r.status_code == 200
            async for piece in r.aiter_text():
                into.append(piece)
                if "first" in "".join(into):
                    seen.set()


def counts(nodes: list[Node], roamers: list[Roamer]) -> list[int]:
    homes = [r.home for r in roamers]
    return [sum(1 for h in homes if h is n) for n in nodes]


# Tests ----------------------------------------------------------------------------------------


async def test_rebalancing_spreads_providers_all_connected_to_one_and_then_stops(
    world: World,
) -> None:
    nodes = [(await start(world, DINFER_REBALANCE_EVERY_S=EVERY))[0] for _ in range(3)]
    balancer = Balancer(nodes)
    roamers = [Roamer(balancer, nodes[0]) for _ in range(9)]
    await roam(world, roamers)
    began = trio.current_time()
    # A share of 3 and a slack of 1: nobody above 4, all nine connected somewhere.
    await poll_until(
        lambda: sum(c := counts(nodes, roamers)) == 9 and max(c) <= 4, bound=BOUND_S * 2
    )
    took = trio.current_time() - began
    settled = counts(nodes, roamers)
    moved = [n.daemon.supervisor.rebalancer.moved for n in nodes]  # type: ignore[union-attr]
    rounds = [n.daemon.supervisor.rebalancer.rounds for n in nodes]  # type: ignore[union-attr]
    # Stable: twenty more rounds on every instance move nobody.
    await poll_until(
        lambda: all(
            n.daemon.supervisor.rebalancer.rounds >= r + 20  # type: ignore[union-attr]
            for n, r in zip(nodes, rounds, strict=True)
        ),
        bound=BOUND_S,
    )
    assert [n.daemon.supervisor.rebalancer.moved for n in nodes] == moved  # type: ignore[union-attr]
    assert counts(nodes, roamers) == settled
    assert moved[1] == moved[2] == 0 and moved[0] >= 5
    assert all(code == 1001 for r in roamers for code, _ in r.ends)
    print(f"converged in {took:.2f} s with {sum(moved)} moves: {settled}")
    # And the moved providers serve: a consumer on the third daemon is answered.
    assert (await nodes[2].chat()).status_code == 200


async def test_a_busy_provider_is_never_cut_mid_stream(world: World) -> None:
    a, _ = await start(world, DINFER_REBALANCE_EVERY_S=EVERY)
    b, _ = await start(world, DINFER_REBALANCE_EVERY_S=EVERY)
    balancer = Balancer([a, b])
    release = trio.Event()
    busy = Roamer(balancer, a, script=held_script(release), model="busy")
    await roam(world, [busy])  # the oldest here: the first the rebalancer would pick
    idle = [Roamer(balancer, a) for _ in range(4)]
    await roam(world, idle)
    text: list[str] = []
    seen = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream_until_first, b, "busy", text, seen)  # relayed by a
        with trio.fail_after(BOUND_S):
            await seen.wait()
        # Five on a, a share of 3 and a slack of 1: one must go, and it is an idle one.
        await poll_until(lambda: counts([a, b], [busy, *idle])[0] <= 4, bound=BOUND_S)
        assert busy.home is a and busy.ends == []
        release.set()
    body = "".join(text)
    assert "first" in body and "second" in body and body.rstrip().endswith("data: [DONE]")
    assert sum(len(r.ends) for r in idle) >= 1


async def test_a_drained_instance_moves_its_providers_while_a_relayed_stream_completes(
    world: World,
) -> None:
    (a, drain_a), (b, _), (c, _) = [await start(world) for _ in range(3)]
    balancer = Balancer([a, b, c])
    release = trio.Event()
    busy = Roamer(balancer, a, script=held_script(release), model="busy")
    idle = [Roamer(balancer, a) for _ in range(4)]
    await roam(world, [busy, *idle])
    text: list[str] = []
    seen = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream_until_first, b, "busy", text, seen)
        with trio.fail_after(BOUND_S):
            await seen.wait()
        drain_a.set()
        # The idle ones land on b and c at once; b learns that a's busy one takes no more.
        await poll_until(lambda: all(r.home in (b, c) for r in idle), bound=BOUND_S)
        await poll_until(lambda: b.daemon.supervisor.registry.get(busy.provider_id).held)  # type: ignore[union-attr]
        assert busy.home is a and busy.ends == [] and not a.done.is_set()
        released_at = trio.current_time()
        release.set()
    body = "".join(text)
    assert "first" in body and "second" in body and body.rstrip().endswith("data: [DONE]")
    await poll_until(lambda: busy.home in (b, c), bound=BOUND_S)
    with trio.fail_after(BOUND_S):
        await a.done.wait()
    assert trio.current_time() - released_at < 5  # the grace is 30 s: it ended when moved
    assert all(code == 1001 for r in [busy, *idle] for code, _ in r.ends)
    assert (await c.chat(model="busy", stream=False)).status_code == 200


async def test_two_drains_at_once_take_turns(world: World) -> None:
    (a, drain_a), (b, drain_b), (c, _) = [await start(world) for _ in range(3)]
    balancer = Balancer([a, b, c])
    release = trio.Event()
    busy = Roamer(balancer, a, script=held_script(release), model="busy")
    on_a = [Roamer(balancer, a) for _ in range(2)]
    on_b = [Roamer(balancer, b) for _ in range(3)]
    await roam(world, [busy, *on_a, *on_b])
    text: list[str] = []
    seen = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream_until_first, c, "busy", text, seen)
        with trio.fail_after(BOUND_S):
            await seen.wait()
        drain_a.set()
        await poll_until(lambda: all(r.home in (b, c) for r in on_a), bound=BOUND_S)
        at_b = [r for r in [*on_a, *on_b] if r.home is b]
        ended = {id(r): len(r.ends) for r in at_b}
        drain_b.set()  # a holds the drain lock until its busy provider has moved
        await poll_until(lambda: b.daemon.supervisor.draining)
        lock = await _get(world, LOCK_KEY)
        assert lock == a.cluster.instance
        await trio.sleep(1.0)  # asserting that nothing happens takes a while: 4 lock retries
        assert all(r.home is b and len(r.ends) == ended[id(r)] for r in at_b)
        release.set()
    with trio.fail_after(BOUND_S):
        await a.done.wait()
    a_done = trio.current_time()
    everyone = [busy, *on_a, *on_b]
    await poll_until(lambda: all(r.home is c for r in everyone), bound=BOUND_S)
    with trio.fail_after(BOUND_S):
        await b.done.wait()
    # b's turn came after a's: none of its providers was sent away before a was done.
    assert min(r.ends[ended[id(r)]][1] for r in at_b) >= a_done - 0.5
    assert "second" in "".join(text)
    assert await _get(world, LOCK_KEY) is None


async def _get(world: World, key: str) -> str | None:
    import coredis

    async with coredis.Redis.from_url(world.redis.url) as redis:
        value = await redis.get(key)
    return None if value is None else value.decode()
