"""A cluster on loopback: a redis-server started here and three real daemons sharing it.

Each daemon runs in its own cancel scope, so a test can kill one (its tasks stop at once: no
more heartbeats, no more answers, exactly what its peers see of a crash). Scripted fake
providers connect to one daemon each; consumers ask another. Every wait has a bound.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from daemon.api.serve import RunningDaemon, serve
from daemon.cluster import node as cluster_node
from daemon.cluster import peerlink, wire
from daemon.cluster.node import Cluster
from daemon.config import load_settings
from protocol.messages import MULTI_SSE, ModelInfo
from tests.conftest import FAST_ENV
from tests.consumer_harness import chat_body, create_key, poll_until
from tests.fakes.provider import (
    Chunk,
    Complete,
    Fail,
    FakeProvider,
    Hold,
    Stall,
    always,
    answer,
    content_chunk,
    finish_chunk,
    role_chunk,
    start_fakes,
)

ROOT = Path(__file__).resolve().parent.parent
REDIS = shutil.which("redis-server")
pytestmark = [
    pytest.mark.skipif(REDIS is None, reason="needs redis-server"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),  # see the `world` fixture
]
BOUND_S = 10.0
ENV = {
    **FAST_ENV,
    "DINFER_METRICS_LISTEN": "off",
    "DINFER_TTFT_BASE_S": "4",
    "DINFER_PREAMBLE_TIMEOUT_S": "2",
    "DINFER_INFERENCE_TIMEOUT_S": "6",
    "DINFER_HEDGE_MODE": "off",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Redis:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS is not None
        self.process = subprocess.Popen(  # noqa: ASYNC220 - starts at once, never waits
            [
                REDIS,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with trio.fail_after(BOUND_S):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                    await stream.aclose()
                    return
                except OSError:
                    await trio.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@dataclass
class Node:
    daemon: RunningDaemon
    scope: trio.CancelScope
    client: httpx.AsyncClient
    done: trio.Event
    key: str = ""

    @property
    def cluster(self) -> Cluster:
        cluster = self.daemon.supervisor.cluster
        assert cluster is not None
        return cluster

    def fake(self, **kwargs: Any) -> FakeProvider:
        return FakeProvider(self.daemon.provider_url, **kwargs)

    async def chat(self, **extra: Any) -> httpx.Response:
        with trio.fail_after(BOUND_S):
            return await self.client.post(
                "/v1/chat/completions",
                json=chat_body(**extra),
                headers={"Authorization": f"Bearer {self.key}"},
            )

    def kill(self) -> None:
        self.scope.cancel(reason="the test kills this daemon")

    def crash(self) -> None:
        """Die as a killed process does: its links close without a word (no `cancel` for
        its requests, which a daemon being cancelled would still send), then it stops."""
        for peer in list(self.cluster.peers):
            self.cluster.links.close(peer, "the test crashes this daemon")
        self.kill()


@dataclass
class World:
    redis: Redis
    nursery: trio.Nursery
    tmp: Path
    nodes: list[Node] = field(default_factory=list)

    async def node(self, **overrides: str) -> Node:
        env = {**ENV, **overrides, "DINFER_DATA_DIR": str(self.tmp / f"d{len(self.nodes)}")}
        env["DINFER_REDIS_URL"] = self.redis.url
        settings = load_settings(env)
        done = trio.Event()
        daemon, scope = await self.nursery.start(_host, settings, done)
        client = httpx.AsyncClient(base_url=daemon.base_url, timeout=BOUND_S)
        node = Node(daemon, scope, client, done)
        _, node.key = await create_key(client)
        self.nodes.append(node)
        return node

    async def connect(self, *fakes: FakeProvider) -> None:
        started = await start_fakes(self.nursery, fakes)
        assert all(fake.trusted.is_set() for fake in started)


async def _host(settings: Any, done: trio.Event, *, task_status: trio.TaskStatus[Any]) -> None:
    try:
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(
                partial(serve, settings, shutdown_trigger=trio.sleep_forever, seed=7)
            )
            task_status.started((daemon, nursery.cancel_scope))
    finally:
        done.set()


@pytest.fixture
async def world(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[World]:
    redis = Redis(_free_port(), tmp_path)
    await redis.start()
    w = World(redis, nursery, tmp_path)
    try:
        yield w
    finally:
        for node in w.nodes:
            await node.client.aclose()
            node.kill()
        with trio.fail_after(BOUND_S):
            for node in w.nodes:
                await node.done.wait()
        redis.kill()
        w.nodes.clear()
        # coredis leaves the anyio streams of a connection that never opened (Redis was down)
        # to the garbage collector, which warns: its internals, not a leak of ours.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def remote_of(node: Node, provider_id: str) -> bool:
    entry = node.daemon.supervisor.registry.get(provider_id)
    return entry is not None and entry.owner is not None and entry.unreachable is None


async def sees(node: Node, *fakes: FakeProvider) -> None:
    await poll_until(lambda: all(remote_of(node, f.provider_id) for f in fakes), bound=BOUND_S)


# Tests ----------------------------------------------------------------------------------------


BATCHED = [  # several SSE lines sealed in one frame: the multi_sse extension
    Chunk("\n".join([role_chunk().line, content_chunk("Hel").line, content_chunk("lo").line])),
    Chunk("\n".join([content_chunk(" world").line, finish_chunk().line, "data: [DONE]"])),
    Complete(),
]


@pytest.mark.parametrize("multi_sse", [False, True], ids=["plain", "multi_sse"])
async def test_a_remote_stream_is_byte_identical_to_a_local_one(
    world: World, multi_sse: bool
) -> None:
    a, b = await world.node(), await world.node()
    if multi_sse:
        fake = b.fake(behaviour=always(BATCHED), extensions=[MULTI_SSE])
    else:
        fake = b.fake(behaviour=always(answer("Hello", " there", " world")))
    await world.connect(fake)
    await sees(a, fake)
    local = await b.chat(stream=True)
    remote = await a.chat(stream=True)
    assert local.status_code == remote.status_code == 200
    assert remote.content == local.content
    assert len(fake.received) == 2


async def test_a_local_provider_with_a_free_slot_serves_without_a_hop(world: World) -> None:
    a, b = await world.node(), await world.node()
    release = trio.Event()
    held = [Hold(release), *answer("late")]
    local = a.fake(behaviour=lambda _body: held if len(local.received) <= 3 else answer("hi"))
    remote = b.fake()
    await world.connect(local, remote)
    await sees(a, remote)
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # three of the local provider's four slots taken
            nursery.start_soon(a.chat)
        await poll_until(lambda: len(local.received) == 3)
        assert (await a.chat()).status_code == 200  # the idle remote one looks cheaper
        release.set()
    assert len(local.received) == 4 and remote.received == []


async def test_an_owner_killed_before_content_fails_over_invisibly(world: World) -> None:
    a, b, c = await world.node(), await world.node(), await world.node()
    stuck = b.fake(behaviour=always([Stall()]))
    healthy = c.fake()
    await world.connect(stuck)
    await sees(a, stuck)
    async with trio.open_nursery() as nursery:
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await a.chat())

        nursery.start_soon(ask)
        with trio.fail_after(BOUND_S):
            await stuck.request_seen.wait()
        await world.connect(healthy)
        await sees(a, healthy)
        killed_at = trio.current_time()
        b.kill()
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["choices"][0]["message"]["content"] == "Hello world"
    assert trio.current_time() - killed_at < 2.0
    assert len(healthy.received) == 1


async def test_an_owner_killed_after_content_ends_the_stream_in_band(world: World) -> None:
    a, b = await world.node(), await world.node()
    fake = b.fake(behaviour=always([role_chunk(), content_chunk("Hel"), Stall()]))
    await world.connect(fake)
    await sees(a, fake)
    text = ""
    with trio.fail_after(BOUND_S):
        async with a.client.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body(stream=True),
            headers={"Authorization": f"Bearer {a.key}"},
        ) as response:
            assert response.status_code == 200
            async for piece in response.aiter_text():
                text += piece
                if "Hel" in text and not b.scope.cancel_called:
                    b.kill()
    assert '"error"' in text
    assert text.rstrip().endswith("data: [DONE]")


async def test_an_ingress_killed_mid_stream_cancels_the_provider(world: World) -> None:
    a, b = await world.node(), await world.node()
    fake = b.fake(behaviour=always([role_chunk(), content_chunk("Hel"), Stall()]))
    await world.connect(fake)
    await sees(a, fake)
    async with trio.open_nursery() as nursery:

        async def ask() -> None:
            try:
                await a.chat(stream=True)
            except httpx.HTTPError:
                pass  # the daemon it asked is gone

        nursery.start_soon(ask)
        with trio.fail_after(BOUND_S):
            await fake.request_seen.wait()
        a.crash()
        with trio.fail_after(4):
            await fake.cancel_seen.wait()
        nursery.cancel_scope.cancel(reason="the test is over")
    assert fake.cancels == fake.request_ids
    assert b.cluster.relays == {}
    sup = b.daemon.supervisor
    await poll_until(lambda: b.cluster.orphaned == 1)
    rows: list[Any] = []
    with trio.fail_after(BOUND_S):
        while not rows:  # the orphan's row is written by a task of its own
            await sup.ledger.flush()
            with sqlite3.connect(sup.store.path) as db:
                rows = db.execute("SELECT outcome, provider_id, route FROM usage").fetchall()
            await trio.sleep(0.01)
    assert rows == [("orphaned", fake.provider_id, "cluster")]


async def test_a_hedge_across_owners_cancels_the_loser_on_the_wire(world: World) -> None:
    hedged = {"DINFER_HEDGE_MODE": "fixed", "DINFER_SPECULATIVE_RATIO": "0.05"}
    a, b, c = await world.node(**hedged), await world.node(), await world.node()
    slow = b.fake(behaviour=always([Stall()]))
    await world.connect(slow)
    await sees(a, slow)
    fast = c.fake()
    async with trio.open_nursery() as nursery:
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await a.chat())

        nursery.start_soon(ask)
        with trio.fail_after(BOUND_S):
            await slow.request_seen.wait()
        await world.connect(fast)
        await sees(a, fast)
    assert answers[0].status_code == 200, answers[0].text
    with trio.fail_after(BOUND_S):
        await slow.cancel_seen.wait()
    assert slow.cancels == slow.request_ids


async def test_a_breaker_entered_via_one_instance_holds_on_another_and_after_a_move(
    world: World,
) -> None:
    a, b, c = await world.node(), await world.node(), await world.node()
    broken = b.fake(behaviour=always([Fail(500)]))
    await world.connect(broken)
    await sees(a, broken)
    await sees(c, broken)
    key = (broken.provider_id, "m", "base")
    for _ in range(2):  # DINFER_BREAKER_THRESHOLD
        assert (await a.chat()).status_code == 502
    struck_at = trio.current_time()
    await poll_until(
        lambda: c.daemon.supervisor.registry.breaker.in_cooldown(key, trio.current_time())
    )
    assert trio.current_time() - struck_at < 0.1
    assert b.daemon.supervisor.registry.breaker.in_cooldown(key, trio.current_time())
    assert (await c.chat()).status_code == 503
    # The provider moves to c: its cooldown moves with it.
    await broken_closed(broken)
    moved = c.fake(box_key=broken.box_key, identity=broken.identity)
    await world.connect(moved)
    breaker = c.daemon.supervisor.registry.breaker
    await poll_until(lambda: breaker.in_cooldown(key, trio.current_time()), bound=0.1)
    await poll_until(lambda: remote_of(a, moved.provider_id))
    await poll_until(
        lambda: a.daemon.supervisor.registry.get(moved.provider_id).owner == c.cluster.instance
    )
    assert a.daemon.supervisor.registry.breaker.in_cooldown(key, trio.current_time())
    assert (await a.chat()).status_code == 503
    assert moved.received == []


async def broken_closed(fake: FakeProvider) -> None:
    fake._nursery.cancel_scope.cancel(reason="the provider leaves")
    with trio.fail_after(BOUND_S):
        await fake.closed.wait()


async def test_supersede_across_instances_closes_the_older_session_with_4001(
    world: World,
) -> None:
    a, b = await world.node(), await world.node()
    first = a.fake()
    await world.connect(first)
    await sees(b, first)
    second = b.fake(box_key=first.box_key, identity=first.identity)
    await world.connect(second)
    with trio.fail_after(BOUND_S):
        await first.closed.wait()
    assert first.close_code == 4001
    await poll_until(lambda: remote_of(a, second.provider_id))
    response = await a.chat()
    assert response.status_code == 200
    assert len(second.received) == 1 and first.received == []


async def test_redis_killed_and_restarted(world: World) -> None:
    """Redis down: no new remote attempt (503 at once, with the reason), local providers
    serve on, and a remote stream already in flight finishes over its intact link."""
    a, b = await world.node(), await world.node()
    release = trio.Event()
    held = [role_chunk("r"), content_chunk("Hel", "r"), Hold(release)]
    rest = [content_chunk("lo", "r"), finish_chunk("r"), Chunk("data: [DONE]"), Complete()]
    local = a.fake(models=[ModelInfo(id="m")])
    remote = b.fake(models=[ModelInfo(id="r")], behaviour=always([*held, *rest]))
    await world.connect(local, remote)
    await sees(a, remote)
    async with trio.open_nursery() as nursery:
        in_flight: list[httpx.Response] = []

        async def ask() -> None:
            in_flight.append(await a.chat(model="r"))

        nursery.start_soon(ask)
        with trio.fail_after(BOUND_S):
            await remote.request_seen.wait()
        world.redis.kill()
        await poll_until(lambda: not a.cluster.up)
        assert (await a.chat()).status_code == 200  # its own providers serve on
        started = trio.current_time()
        refused = await a.chat(model="r")
        assert refused.status_code == 503
        assert "Redis" in refused.text
        assert trio.current_time() - started < 1.0
        release.set()
    assert in_flight[0].status_code == 200, in_flight[0].text
    assert in_flight[0].json()["choices"][0]["message"]["content"] == "Hello"
    await world.redis.start()
    await sees(a, remote)
    response = await a.chat(model="r")
    assert response.status_code == 200, response.text
    assert len(remote.received) == 2


async def _handshake(address: str, me: str, target: str, token: bytes) -> bytes:
    """Dial a link as instance `me` proving `token`: what the listener says at the end
    (OK, or b"" when it closed the connection)."""
    host, _, port = address.rpartition(":")
    with trio.fail_after(BOUND_S):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            nonce = os.urandom(peerlink.NONCE_BYTES)
            named = [bytes((len(n),)) + n.encode() for n in (me, target)]
            await stream.send_all(peerlink.MAGIC + b"".join(named) + nonce)
            answer = b""
            while len(answer) < peerlink.NONCE_BYTES + 32:
                piece = await stream.receive_some()
                if not piece:
                    return b""
                answer += piece
            theirs = answer[: peerlink.NONCE_BYTES]
            proof = peerlink._proof(token, b"dialer", theirs, nonce, me.encode(), target.encode())
            await stream.send_all(proof)
            try:
                return await stream.receive_some()
            except trio.BrokenResourceError:
                return b""


async def test_a_link_refuses_a_wrong_token_and_logs_no_token(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    import coredis

    a = await world.node()
    token = os.urandom(32)
    me = wire.Instance("127.0.0.1:1", token.hex(), 0.0)
    async with coredis.Redis.from_url(world.redis.url) as redis:
        await redis.set(wire.instance_key("intruder"), wire.encode(me), px=60_000)
    caplog.set_level("INFO", logger="dinfer.cluster")
    address = a.cluster.links.address
    assert await _handshake(address, "intruder", a.cluster.instance, os.urandom(32)) == b""
    assert await _handshake(address, "stranger", a.cluster.instance, token) == b""  # no key
    assert "did not prove its identity" in caplog.text
    assert await _handshake(address, "intruder", a.cluster.instance, token) == peerlink.OK
    for secret in (token, a.cluster.links.token):
        assert secret.hex() not in caplog.text


async def test_a_link_dropped_mid_stream_ends_the_stream_in_band_and_cancels(
    world: World,
) -> None:
    a, b = await world.node(), await world.node()
    fake = b.fake(behaviour=always([role_chunk(), content_chunk("Hel"), Stall()]))
    await world.connect(fake)
    await sees(a, fake)
    text, dropped = "", False
    with trio.fail_after(BOUND_S):
        async with a.client.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body(stream=True),
            headers={"Authorization": f"Bearer {a.key}"},
        ) as response:
            assert response.status_code == 200
            async for piece in response.aiter_text():
                text += piece
                if "Hel" in text and not dropped:
                    dropped = True
                    a.cluster.links.close(b.cluster.instance, "the test drops the link")
    assert '"error"' in text
    assert text.rstrip().endswith("data: [DONE]")
    with trio.fail_after(BOUND_S):
        await fake.cancel_seen.wait()  # the owner lost the link: it stops the provider
    assert fake.cancels == fake.request_ids
    await poll_until(lambda: b.cluster.relays == {} and b.cluster.orphaned == 1)
    # The next remote attempt dials a new link.
    fake.behaviour = always(answer("Hello", " world"))
    response = await a.chat()
    assert response.status_code == 200, response.text


class _Spaced(FakeProvider):
    """A provider that writes its chunk frames by hand, spaced and in its own key order: a
    daemon that re-encoded them would relay other bytes."""

    sent: list[str]

    async def _play(self, ws: Any, request_id: str, sealer: Any, step: Any) -> bool:
        if not isinstance(step, Chunk):
            return await super()._play(ws, request_id, sealer, step)
        payload = msgspec.json.encode(sealer.seal(step.line.encode())).decode()
        frame = (
            f'{{ "request_id" : "{request_id}",  "encrypted_data" : {payload} ,'
            ' "type" : "inference_response_chunk" }'
        )
        self.sent.append(frame)
        await ws.send_message(frame)
        return True


async def test_a_remote_frame_is_relayed_verbatim(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await world.node(), await world.node()
    fake = _Spaced(b.daemon.provider_url, behaviour=always(answer("Hello", " world")))
    fake.sent = []
    await world.connect(fake)
    await sees(a, fake)
    relayed: list[bytes] = []
    decode = cluster_node.decode_provider_frame

    def spy(data: bytes) -> Any:  # the ingress decodes each relayed frame once, here
        if b"inference_response_chunk" in data:
            relayed.append(data)
        return decode(data)

    monkeypatch.setattr(cluster_node, "decode_provider_frame", spy)
    response = await a.chat(stream=True)
    assert response.status_code == 200
    assert "Hello" in response.text and " world" in response.text
    assert relayed == [frame.encode() for frame in fake.sent]
    assert len(relayed) == 5  # role, two contents, finish, [DONE]


def test_without_a_redis_url_nothing_imports_redis() -> None:
    code = "import sys, daemon.api.serve, dinfer.cli; print('coredis' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"


async def test_serve_workers_runs_two_instances_on_one_port(world: World) -> None:
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DINFER_")},
        **ENV,
        "PYTHONPATH": str(ROOT),
        "DINFER_LISTEN": f"127.0.0.1:{port}",
        "DINFER_DATA_DIR": str(world.tmp / "workers"),
        "DINFER_REDIS_URL": world.redis.url,
    }
    command = [sys.executable, "-m", "dinfer", "serve", "--workers", "2"]
    process = await trio.lowlevel.open_process(command, env=env, cwd=ROOT)  # to signal it
    try:
        instances: set[str] = set()
        with trio.fail_after(40):  # two daemons start on a loaded 2-core machine
            while len(instances) < 2:
                instances = await _instances(world.redis.url)
                await trio.sleep(0.1)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                while (await _ready(client)) != 200:  # noqa: ASYNC110 - polled, bounded
                    await trio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _ready(client: httpx.AsyncClient) -> int:
    try:
        return (await client.get("/readyz")).status_code
    except httpx.HTTPError:
        return 0


async def _instances(url: str) -> set[str]:
    import coredis

    async with coredis.Redis.from_url(url) as redis:
        return {key.decode() async for key in redis.scan_iter(match="dinfer:instance:*")}


async def test_the_hedging_budget_is_the_clusters(world: World) -> None:
    a, b = await world.node(), await world.node()
    fake = b.fake()
    await world.connect(fake)
    for _ in range(20):  # DINFER_HEDGE_BUDGET 5%: one backup per 20 dispatches
        assert (await b.chat()).status_code == 200
    budget = a.daemon.supervisor.hedger.budget
    assert budget.dispatches == 0
    # Within one refresh (1 s) a sees b's window: the budget is the cluster's sum.
    await poll_until(lambda: budget.elsewhere[0] == 20, bound=3)
    assert budget.allows(trio.current_time())
