"""The cluster links (daemon/cluster/peerlink.py) against hostile peers and a hostile network.

Real daemons on loopback against a redis-server started here (tests/test_cluster.py's
fixtures); the attacker speaks raw bytes over a trio socket. An *authenticated* attacker is a
member: it wrote its own instance key into Redis (whoever can read and write Redis can), so
the tests show what a buggy or compromised member can do to the others. Every wait has a
bound.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import pytest
import trio

from daemon.cluster import peerlink, wire
from protocol import crypto
from tests import test_cluster
from tests.consumer_harness import chat_body, poll_until
from tests.fakes.provider import Complete, Hold, always, answer, content_chunk, role_chunk
from tests.test_cluster import BOUND_S, REDIS, Node, World, sees

pytestmark = [
    pytest.mark.skipif(REDIS is None, reason="needs redis-server"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),  # see test_cluster's `world`
]
world = test_cluster.world  # the fixture: a redis-server and daemons sharing it


def raw_frame(kind: bytes, request_id: bytes, data: bytes = b"") -> bytes:
    """A frame built by hand: any bytes for its names, as a hostile peer sends them."""
    header = struct.pack(
        "!IBB", 2 + len(kind) + len(request_id) + len(data), len(kind), len(request_id)
    )
    return header + kind + request_id + data


class Attacker:
    """A member of the cluster that speaks the link by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, *frames: bytes) -> None:
        with trio.fail_after(BOUND_S):
            await self.stream.send_all(b"".join(frames))

    async def frames_until(self, kind: str, request_id: str) -> list[tuple[str, str, bytes]]:
        """Every frame up to the first of this kind and id (bounded)."""
        seen: list[tuple[str, str, bytes]] = []
        with trio.fail_after(BOUND_S):
            while True:
                frames, used = peerlink.split_frames(self.buffer)
                del self.buffer[:used]
                seen.extend(frames)
                if any(k == kind and r == request_id for k, r, _ in frames):
                    return seen
                piece = await self.stream.receive_some()
                assert piece, "the daemon closed the link"
                self.buffer += piece

    async def closed_by_peer(self) -> bool:
        """Whether the daemon closes the link within the bound (what it sent is dropped)."""
        with trio.move_on_after(BOUND_S):
            try:
                while await self.stream.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass
            return True
        return False


@asynccontextmanager
async def member(world: World, target: Node, me: str = "attacker0000") -> AsyncIterator[Attacker]:
    """An authenticated link to `target`, as instance `me` (its key written to Redis here)."""
    token = os.urandom(32)
    async with coredis.Redis.from_url(world.redis.url) as redis:
        key = wire.Instance("127.0.0.1:1", token.hex(), 0.0)
        await redis.set(wire.instance_key(me), wire.encode(key), px=600_000)
    cluster = target.cluster
    host, _, port = cluster.links.address.rpartition(":")
    with trio.fail_after(BOUND_S):
        stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        nonce = os.urandom(peerlink.NONCE_BYTES)
        named = [bytes((len(n),)) + n.encode() for n in (me, cluster.instance)]
        attacker = Attacker(stream)
        await attacker.send(peerlink.MAGIC + b"".join(named) + nonce)
        with trio.fail_after(BOUND_S):
            while len(attacker.buffer) < peerlink.NONCE_BYTES + 32:
                attacker.buffer += await stream.receive_some()
        theirs = bytes(attacker.buffer[: peerlink.NONCE_BYTES])
        del attacker.buffer[: peerlink.NONCE_BYTES + 32]
        ids = (me.encode(), cluster.instance.encode())
        await attacker.send(peerlink._proof(token, b"dialer", theirs, nonce, *ids))
        with trio.fail_after(BOUND_S):
            while not attacker.buffer:
                attacker.buffer += await stream.receive_some()
        assert attacker.buffer[:1] == peerlink.OK
        del attacker.buffer[:1]
        yield attacker


def dispatch_to(node: Node, provider_id: str, public_key: str) -> bytes:
    """A valid `dispatch` body for a provider `node` holds, sealed to it."""
    entry = node.daemon.supervisor.registry.get(provider_id)
    assert entry is not None and entry.owner is None
    envelope = json.dumps({"body": chat_body()}).encode()
    sealed, _ = crypto.seal_request(envelope, crypto.decode_public_key(public_key))
    return wire.encode(wire.Dispatch(provider_id, entry.epoch, "m", sealed))


async def alive(node: Node) -> bool:
    with trio.fail_after(BOUND_S):
        response = await node.client.get("/readyz")
    return response.status_code == 200 and not node.done.is_set()


# Tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ping", "dispatch"])
async def test_a_request_id_that_is_not_utf8_does_not_kill_the_daemon(
    world: World, kind: str
) -> None:
    """255 bytes that are not UTF-8 decoded "with replacement" grew to 765 bytes: the answer
    (a pong, a `gone` for an unknown provider) no longer fit a frame's u8 and raised inside
    the link's reader or a relay task, which took the whole daemon down."""
    a = await world.node()
    fake = a.fake()
    await world.connect(fake)
    async with member(world, a) as attacker:
        body = wire.encode(
            wire.Dispatch("nobody", 1, "m", crypto.seal_request(b"{}", fake.box_key.public_key)[0])
        )
        await attacker.send(
            raw_frame(kind.encode(), b"\xff" * 255, body if kind == "dispatch" else b"")
        )
        await attacker.send(raw_frame(b"ping", b"after"))
        await attacker.closed_by_peer()
    await trio.sleep(0.2)  # the relay task (a dispatch) runs after the reader
    assert await alive(a)
    assert (await a.chat()).status_code == 200


async def test_a_request_id_of_255_bytes_is_answered(world: World) -> None:
    a = await world.node()
    async with member(world, a) as attacker:
        await attacker.send(raw_frame(b"ping", b"r" * 255))
        frames = await attacker.frames_until("pong", "r" * 255)
    assert frames == [("pong", "r" * 255, b"")]


async def test_a_second_dispatch_of_a_request_id_neither_steals_its_stream_nor_leaks_a_slot(
    world: World,
) -> None:
    """An ingress's attempt id is readable on the network (docs/cluster.md); another member
    that dispatched the same id took the stream's frames (the sink was replaced) and left
    the first relay waiting forever on its slot."""
    a, b = await world.node(), await world.node()
    release = trio.Event()
    fake = b.fake(behaviour=lambda _body: [Hold(release), *answer("Hello", " world")])
    await world.connect(fake)
    await sees(a, fake)
    public_key = crypto.encode_key(fake.box_key.public_key)
    async with trio.open_nursery() as nursery, member(world, b) as attacker:
        answers = []

        async def ask() -> None:
            answers.append(await a.chat())

        nursery.start_soon(ask)
        with trio.fail_after(BOUND_S):
            await fake.request_seen.wait()
        victim = fake.request_ids[0]
        await attacker.send(
            raw_frame(b"dispatch", victim.encode(), dispatch_to(b, fake.provider_id, public_key)),
            raw_frame(b"ping", b"sync"),
        )
        stolen = await attacker.frames_until("pong", "sync")
        release.set()
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["choices"][0]["message"]["content"] == "Hello world"
    assert [f for f in stolen if f[1] == victim] in ([], [("gone", victim, b"")])
    entry = b.daemon.supervisor.registry.get(fake.provider_id)
    assert entry is not None
    await poll_until(lambda: entry.in_flight == 0 and b.cluster.relays == {}, bound=BOUND_S)


async def test_a_dispatch_sent_twice_by_one_peer_frees_its_slot(world: World) -> None:
    b = await world.node()
    fake = b.fake()
    await world.connect(fake)
    public_key = crypto.encode_key(fake.box_key.public_key)
    async with member(world, b) as attacker:
        dispatch = raw_frame(b"dispatch", b"twice", dispatch_to(b, fake.provider_id, public_key))
        await attacker.send(dispatch, dispatch)
        frames = await attacker.frames_until("frame", "twice")
        while not any(b'"inference_complete"' in d for _, _, d in frames):
            frames += await attacker.frames_until("frame", "twice")
        entry = b.daemon.supervisor.registry.get(fake.provider_id)
        assert entry is not None
        await poll_until(lambda: entry.in_flight == 0 and b.cluster.relays == {}, bound=BOUND_S)


async def test_a_stranger_is_refused_within_the_handshake_bound(world: World) -> None:
    a = await world.node()
    host, _, port = a.cluster.links.address.rpartition(":")
    with trio.fail_after(BOUND_S):
        silent = await trio.open_tcp_stream(host, int(port))
        garbage = await trio.open_tcp_stream(host, int(port))
    async with silent, garbage:
        opened_at = trio.current_time()
        await garbage.send_all(b"GET / HTTP/1.1\r\n\r\n")
        assert await Attacker(garbage).closed_by_peer()
        assert trio.current_time() - opened_at < 0.5  # not a link: closed at once
        assert await Attacker(silent).closed_by_peer()
        waited = trio.current_time() - opened_at
        assert peerlink.HANDSHAKE_S - 0.1 < waited < peerlink.HANDSHAKE_S + 1.0
    assert not a.cluster.links._open


async def test_a_flood_of_silent_connections_is_bounded(world: World) -> None:
    """Each connection that never speaks holds a descriptor (and, once it names itself, a
    Redis read) for the handshake's 2 s: unbounded, a flood from one host took every
    descriptor of the process. From one address only a few wait at a time; the rest are
    closed at once."""
    a = await world.node()
    host, _, port = a.cluster.links.address.rpartition(":")
    flood = []
    with trio.fail_after(BOUND_S):
        for _ in range(peerlink.HANDSHAKES_PER_ADDRESS + 40):
            flood.append(await trio.open_tcp_stream(host, int(port)))
    opened_at = trio.current_time()
    closed = 0
    async with trio.open_nursery() as nursery:

        async def watch(stream: trio.SocketStream) -> None:
            nonlocal closed
            with trio.move_on_after(1.0):
                try:
                    while await stream.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass
                closed += 1

        for stream in flood:
            nursery.start_soon(watch, stream)
    assert trio.current_time() - opened_at < 1.5
    assert closed >= 40  # closed at once, not after the handshake's 2 s
    for stream in flood:
        await stream.aclose()
    assert await alive(a)


async def test_a_peer_that_stops_reading_costs_a_bounded_memory(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's queue was bounded by frames only (65536, each up to a provider frame's
    10 MiB): an ingress that stops reading made the owner hold whatever its providers sent.
    Past QUEUE_BYTES the link closes and the relay is orphaned (the provider cancelled)."""
    monkeypatch.setattr(peerlink, "QUEUE_BYTES", 1 << 20)
    b = await world.node()
    big = content_chunk("x" * (256 << 10))
    fake = b.fake(behaviour=always([role_chunk(), *[big] * 100, Complete()]))
    await world.connect(fake)
    public_key = crypto.encode_key(fake.box_key.public_key)
    async with member(world, b) as attacker:
        body = dispatch_to(b, fake.provider_id, public_key)
        await attacker.send(raw_frame(b"dispatch", b"unread", body))  # and never reads
        await poll_until(lambda: b.cluster.orphaned == 1, bound=BOUND_S)
        with trio.fail_after(BOUND_S):
            await fake.cancel_seen.wait()
    assert fake.cancels == ["unread"]


async def test_a_link_opened_without_a_spare_descriptor_still_carries_requests(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct path's duplicate descriptor is an optimisation: at the process's descriptor
    limit (EMFILE) `os.dup` raised out of the link's task and took the daemon down."""

    def no_descriptor(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(peerlink.os, "dup", no_descriptor)
    a, b = await world.node(), await world.node()
    fake = b.fake()
    await world.connect(fake)
    await sees(a, fake)
    response = await a.chat()
    assert response.status_code == 200, response.text
    assert await alive(a) and await alive(b)


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack("!IBB", 0xFFFF_FFFF, 0, 0),  # 4 GiB
        struct.pack("!IBB", 1, 0, 0),  # shorter than its own names
        struct.pack("!IBB", 2 + 200 + 10, 200, 10) + b"ping",  # then the peer hangs up
        raw_frame(b"\xfe\xff-not-a-kind", b"r", b"x") + raw_frame(b"", b"", b""),
    ],
    ids=["huge", "negative-ish", "truncated", "garbage-kinds"],
)
async def test_a_member_sending_garbage_frames_loses_only_its_link(
    world: World, garbage: bytes
) -> None:
    a = await world.node()
    async with member(world, a) as attacker:
        await attacker.send(garbage)
        if b"kind" in garbage:
            await attacker.send(raw_frame(b"ping", b"still"))  # ignored kinds keep the link
            assert ("pong", "still", b"") in await attacker.frames_until("pong", "still")
        else:
            await attacker.stream.send_eof()
            assert await attacker.closed_by_peer()
    assert await alive(a)
    assert not a.cluster.links._open or all(c.peer != "attacker0000" for c in a.cluster.links._open)


async def test_a_captured_handshake_replayed_is_refused(world: World) -> None:
    a = await world.node()
    token = os.urandom(32)
    async with coredis.Redis.from_url(world.redis.url) as redis:
        key = wire.Instance("127.0.0.1:1", token.hex(), 0.0)
        await redis.set(wire.instance_key("member000000"), wire.encode(key), px=600_000)
    host, _, port = a.cluster.links.address.rpartition(":")
    ids = (b"member000000", a.cluster.instance.encode())
    opening = peerlink.MAGIC + b"".join(bytes((len(n),)) + n for n in ids) + os.urandom(32)
    captured = []
    for replay in (False, True):
        with trio.fail_after(BOUND_S):
            stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            attacker = Attacker(stream)
            await attacker.send(opening)
            with trio.fail_after(BOUND_S):
                while len(attacker.buffer) < 64:
                    attacker.buffer += await stream.receive_some()
            nonce = bytes(attacker.buffer[:32])
            if not replay:  # the member's own answer, as an eavesdropper records it
                captured.append(peerlink._proof(token, b"dialer", nonce, opening[-32:], *ids))
            await attacker.send(captured[0])
            with trio.fail_after(BOUND_S):
                answer = await stream.receive_some()
            assert answer == (peerlink.OK if not replay else b"")
