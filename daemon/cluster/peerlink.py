"""The direct links between the instances of a cluster: its data plane.

Redis holds the cluster's control state (the directory, liveness keys, cooldowns, budgets);
every message between two instances (a dispatch, a provider's frames, a cancel, a ping...)
crosses one TCP connection between them instead: through Redis each one cost two commands
(XADD, XREAD) at ~400 µs of CPU each (docs/cluster.md). An instance listens on
DINFER_CLUSTER_LISTEN and publishes, in its instance key (`wire.Instance`), the address peers
dial (DINFER_CLUSTER_ADVERTISE, else the bound one) and a random token new at each start.

**Connections.** The first of two instances that has something to send to the other dials
it; both then use that connection, in both directions (`Links.current`). If both dial at once
there are two, and each side keeps sending on the one it had first: messages one side sends
about one request always share a connection, so they arrive in order.

**Handshake** (within HANDSHAKE_S, else closed): the dialer sends `MAGIC`, its id, the id it
means to reach and a nonce; the listener answers a nonce and an HMAC of both nonces and both
ids under its own token; the dialer checks it against the token Redis holds for the id it
dialed and answers its HMAC under its token, which the listener checks the same way; the
listener's `OK` byte opens the link. A connection that fails any of it is closed, and the
tokens never reach a log. Whoever can read Redis is a member of the cluster: the same trust
as the Redis inboxes this replaces.

**Frames**, each: `u32` length of the rest, `u8` kind length, `u8` request-id length, the
kind (a `wire.Kind` value), the request id, the data (opaque: a provider frame travels as
its text, untouched).

Each connection is one task of the links' nursery (dialed ones are started by `current`,
accepted ones by `trio.serve_listeners`, both per connection, as a server's handlers are).
It runs one writer, which sends everything queued in one `send_all`, and one reader, which
hands each frame to `deliver` without waiting. `Connection.send` never waits: SessionGone when
the connection is closed, or when QUEUE frames or QUEUE_BYTES wait (the peer is not
reading: the connection is closed). When a connection ends, `lost` says so once.

`send` writes a frame itself, with one non-blocking `send` on a duplicate of the socket's
descriptor, when nothing waits for the writer (so frames never overtake each other); whatever
the kernel does not take at once goes to the writer. Measured: waking the writer task for
each frame of a paced stream cost about 20 µs of the 30 µs a relayed chunk may cost in all.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Final, assert_never

import trio

from daemon.cluster import wire
from daemon.routing.types import SessionGone

log = logging.getLogger("dinfer.cluster")

MAGIC: Final = b"dinfer-link/1\n"
OK: Final = b"\x01"
NONCE_BYTES: Final = 32
HANDSHAKE_S: Final = 2.0
# Accepted connections still in their handshake, from one address and in all: each holds a
# descriptor (and costs a Redis read) for up to HANDSHAKE_S, so a flood of connections that
# never prove anything must not take every descriptor of the process. Past either, a new
# connection is closed at once (a member's dial fails and its next message dials again).
HANDSHAKES_PER_ADDRESS: Final = 16
HANDSHAKES: Final = 256
# Frames waiting for one connection's writer; past this the peer is not reading.
QUEUE: Final = 65_536
# Bytes waiting for one connection's writer; past this too (one frame a provider sent may be
# 10 MiB: a count alone let a peer that stopped reading cost gigabytes).
QUEUE_BYTES: Final = 64 << 20
BATCH: Final = 1024  # frames per send_all at most
RECEIVE_BYTES: Final = 1 << 18
# A provider frame is at most 10 MiB (PROTOCOL.md); a dispatch carries a sealed body.
MAX_FRAME: Final = 64 << 20

HANDSHAKE_ERRORS: Final = (trio.TooSlowError, trio.BrokenResourceError, OSError, ValueError)
_LENGTH: Final = struct.Struct("!I")
_HEADER: Final = struct.Struct("!IBB")

# Where a connection's frames go: (connection, kind, request id, data). Never waits.
Deliver = Callable[["Connection", str, str, bytes], None]
# A connection ended: (connection, whether it was the one this side sent its messages on).
Lost = Callable[["Connection", bool], None]
# The instance key of an instance (None: no such instance, or Redis cannot say).
Lookup = Callable[[str], Awaitable["wire.Instance | None"]]


def encode_frame(kind: str, request_id: str, data: bytes) -> bytes:
    kind_bytes, id_bytes = kind.encode(), request_id.encode()
    size = 2 + len(kind_bytes) + len(id_bytes) + len(data)
    return b"".join(
        (_HEADER.pack(size, len(kind_bytes), len(id_bytes)), kind_bytes, id_bytes, data)
    )


class FrameError(Exception):
    """The peer sent bytes that are not a frame: the connection is closed."""


def split_frames(buffer: bytearray) -> tuple[list[tuple[str, str, bytes]], int]:
    """The whole frames at the start of `buffer`, and how many bytes they took."""
    frames: list[tuple[str, str, bytes]] = []
    at, end_of_data = 0, len(buffer)
    while end_of_data - at >= _HEADER.size:
        size, kind_len, id_len = _HEADER.unpack_from(buffer, at)
        if size > MAX_FRAME or size < 2 + kind_len + id_len:
            raise FrameError("a frame of a bad length")
        end = at + _LENGTH.size + size
        if end > end_of_data:
            break
        start = at + _HEADER.size
        kind = buffer[start : start + kind_len].decode("ascii", "replace")  # unknown: ignored
        start += kind_len
        try:
            # Strict: with replacement 255 bytes could grow to 765, which no answer can carry.
            request_id = buffer[start : start + id_len].decode()
        except UnicodeDecodeError:
            raise FrameError("a request id that is not UTF-8") from None
        frames.append((kind, request_id, bytes(buffer[start + id_len : end])))
        at = end
    return frames, at


def _proof(token: bytes, role: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"\0".join((role, *parts)), hashlib.sha256).digest()


@dataclass(frozen=True)
class Admitted:
    peer: str


@dataclass(frozen=True)
class Refused:
    reason: str  # for the log: never a token


Handshake = Admitted | Refused


class _Buffered:
    """Exact reads from a stream, for the handshake."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.pending = bytearray()

    async def exactly(self, count: int) -> bytes:
        while len(self.pending) < count:
            data = await self.stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise trio.BrokenResourceError("the peer closed the connection")
            self.pending += data
        out = bytes(self.pending[:count])
        del self.pending[:count]
        return out

    async def name(self) -> str:
        (size,) = await self.exactly(1)
        return (await self.exactly(size)).decode("ascii", "replace")


def _named(name: str) -> bytes:
    raw = name.encode()
    return bytes((len(raw),)) + raw


class _Handshakes:
    """The accepted connections in their handshake, per address: at most
    HANDSHAKES_PER_ADDRESS from one, HANDSHAKES in all."""

    def __init__(self) -> None:
        self._by_address: dict[str, int] = {}
        self._total = 0
        self._refusing = False  # logged once per flood, not once per connection

    def enter(self, address: str) -> bool:
        waiting = self._by_address.get(address, 0)
        if waiting >= HANDSHAKES_PER_ADDRESS or self._total >= HANDSHAKES:
            if not self._refusing:
                self._refusing = True
                log.warning(
                    "cluster link: too many connections in their handshake (%d from %s, %d in"
                    " all): closing new ones at once",
                    waiting,
                    address,
                    self._total,
                )
            return False
        self._by_address[address] = waiting + 1
        self._total += 1
        return True

    def leave(self, address: str) -> None:
        self._total -= 1
        left = self._by_address.pop(address) - 1
        if left:
            self._by_address[address] = left
        self._refusing = False


def _address_of(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"  # already reset by the peer: its handshake fails at once


class Connection:
    """One connection to another instance, from its first byte (dialing or accepted)."""

    def __init__(self, links: Links, peer: str) -> None:
        self.peer = peer  # "" for an accepted connection until its handshake names it
        self.open = False  # authenticated
        self.failed = False  # never opened: the peer could not be reached or did not prove itself
        self.scope = trio.CancelScope()
        self._links = links
        self._send, self._queue = trio.open_memory_channel[bytes](QUEUE)
        self._backlog = 0  # frames handed to the writer and not yet sent
        self._backlog_bytes = 0
        self._direct: socket.socket | None = None  # while open: `send` may write itself

    def send(self, kind: str, request_id: str, data: bytes = b"") -> None:
        """Send or queue one frame, never waiting; SessionGone if it cannot go out."""
        frame = encode_frame(kind, request_id, data)
        if self._backlog == 0 and self._direct is not None:
            try:
                sent = self._direct.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close("the connection broke while sending")
                raise SessionGone from None
            if sent == len(frame):
                return
            frame = frame[sent:]
        if self._backlog and self._backlog_bytes + len(frame) > QUEUE_BYTES:
            self.close(f"the peer took none of {QUEUE_BYTES} bytes")
            raise SessionGone
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            self.close(f"the peer took no frame for {QUEUE} frames")
            raise SessionGone from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise SessionGone from None
        self._backlog += 1
        self._backlog_bytes += len(frame)

    def close(self, reason: str) -> None:
        self._send.close()
        self._direct = None
        self.scope.cancel(reason=reason)

    async def serve(
        self, stream: trio.abc.Stream, handshake: Callable[[_Buffered], Awaitable[Handshake]]
    ) -> None:
        """Authenticate, then carry frames until either side closes."""
        buffered = _Buffered(stream)
        ending = "closed"
        try:
            with self.scope:
                async with stream:
                    try:
                        with trio.fail_after(HANDSHAKE_S):
                            outcome = await handshake(buffered)
                    except HANDSHAKE_ERRORS as exc:
                        outcome = Refused(f"handshake failed ({type(exc).__name__})")
                    match outcome:
                        case Refused(reason=reason):
                            log.warning("cluster link %s refused: %s", self.peer or "?", reason)
                            self.failed = True
                            return
                        case Admitted(peer=peer):
                            self.peer = peer
                        case _ as never:
                            assert_never(never)
                    self.open = True
                    self._links.opened(self)
                    ending = await self._carry(stream, buffered.pending)
        finally:
            self._send.close()
            self._links.ended(self)
        if self.open:
            log.info("cluster link to %s ended: %s", self.peer, ending)

    async def _carry(self, stream: trio.abc.Stream, pending: bytearray) -> str:
        direct: socket.socket | None = None
        if isinstance(stream, trio.SocketStream):
            # A duplicate descriptor of the same (non-blocking) socket: `send` writes on it
            # (why: the module's docstring). Without a spare descriptor (EMFILE), the writer
            # alone sends.
            try:
                direct = socket.socket(fileno=os.dup(stream.socket.fileno()))
            except OSError as exc:
                log.warning("cluster link to %s: no direct sends (%s)", self.peer, exc.strerror)
            else:
                direct.setblocking(False)
                self._direct = direct
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, stream, nursery.cancel_scope)
                try:
                    ending = await self._read(stream, pending)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    ending = f"connection lost ({type(exc).__name__})"
                except FrameError as exc:
                    ending = str(exc)
                nursery.cancel_scope.cancel(reason=ending)
        finally:
            self._direct = None
            if direct is not None:
                direct.close()
        return ending

    async def _write(self, stream: trio.abc.Stream, carrying: trio.CancelScope) -> None:
        try:
            async for first in self._queue:
                batch = [first]
                while len(batch) < BATCH:
                    try:
                        batch.append(self._queue.receive_nowait())
                    except trio.WouldBlock:
                        break
                data = first if len(batch) == 1 else b"".join(batch)
                await stream.send_all(data)
                self._backlog -= len(batch)
                self._backlog_bytes -= len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            carrying.cancel(reason="the connection broke while sending")

    async def _read(self, stream: trio.abc.Stream, buffer: bytearray) -> str:
        deliver = self._links.deliver
        while True:
            if buffer:
                frames, used = split_frames(buffer)
                if used:
                    del buffer[:used]
                for kind, request_id, data in frames:
                    deliver(self, kind, request_id, data)
            received = await stream.receive_some(RECEIVE_BYTES)
            if not received:
                return "the peer closed it"
            buffer += received


class Links:
    """This instance's listener and its connections to the others."""

    def __init__(self, instance: str, lookup: Lookup, deliver: Deliver, lost: Lost) -> None:
        self.instance = instance
        self.token = secrets.token_bytes(32)
        self.address = ""  # what peers dial, once `run` has bound
        self.deliver = deliver
        self._lookup = lookup
        self._lost = lost
        self._current: dict[str, Connection] = {}  # the one each peer's messages go on
        self._open: set[Connection] = set()
        self._handshakes = _Handshakes()
        self._nursery: trio.Nursery | None = None

    async def run(
        self,
        listen: tuple[str, int],
        advertise: tuple[str, int] | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        host, port = listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound_host, bound_port = listeners[0].socket.getsockname()[:2]
        shown_host, shown_port = advertise or (bound_host, bound_port)
        shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
        self.address = f"{shown_host}:{shown_port}"
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(trio.serve_listeners, self._accepted, listeners)
            log.info("cluster link listening on %s:%d", bound_host, bound_port)
            task_status.started()

    def current(self, peer: str) -> Connection:
        """The connection this instance sends `peer` everything on, dialed if there is none
        (frames queue while it dials; if it fails they are lost with it: `lost`)."""
        conn = self._current.get(peer)
        # A closed one stays until its task ends (and says so: `lost`), refusing frames: every
        # message this side sent the peer went on the current one, and ends with it.
        if conn is None:
            assert self._nursery is not None, "the links are not running"
            conn = self._current[peer] = Connection(self, peer)
            self._nursery.start_soon(self._dial, conn)
        return conn

    def close(self, peer: str, reason: str) -> None:
        """Close every connection to `peer` (it stopped answering)."""
        for conn in [c for c in self._open if c.peer == peer]:
            conn.close(reason)
        dialing = self._current.get(peer)
        if dialing is not None:
            dialing.close(reason)

    def opened(self, conn: Connection) -> None:
        self._open.add(conn)
        self._current.setdefault(conn.peer, conn)

    def ended(self, conn: Connection) -> None:
        self._open.discard(conn)
        was_current = self._current.get(conn.peer) is conn
        if was_current:
            del self._current[conn.peer]
            for other in self._open:
                if other.peer == conn.peer:
                    self._current[conn.peer] = other
                    break
        if conn.peer:
            self._lost(conn, was_current)

    # The handshake --------------------------------------------------------------------------

    async def _dial(self, conn: Connection) -> None:
        try:
            with trio.fail_after(HANDSHAKE_S):
                found = await self._lookup(conn.peer)
                if found is None:
                    raise OSError("no such instance")
                host, _, port = found.address.rpartition(":")
                stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        except (OSError, ValueError, trio.TooSlowError) as exc:
            log.warning("cluster link to %s: cannot connect (%s)", conn.peer, type(exc).__name__)
            conn.failed = True
            conn.close("cannot connect")
            self.ended(conn)
            return
        await conn.serve(stream, partial(self._as_dialer, peer=conn.peer, found=found))

    async def _accepted(self, stream: trio.SocketStream) -> None:
        address = _address_of(stream)
        if not self._handshakes.enter(address):
            await stream.aclose()  # a flood (HANDSHAKES): closed before it costs anything
            return
        settled = False

        async def handshake(link: _Buffered) -> Handshake:
            nonlocal settled
            try:
                return await self._as_listener(link)
            finally:
                settled = True
                self._handshakes.leave(address)

        try:
            await Connection(self, "").serve(stream, handshake)
        finally:
            if not settled:
                self._handshakes.leave(address)

    async def _as_dialer(self, link: _Buffered, peer: str, found: wire.Instance) -> Handshake:
        mine = secrets.token_bytes(NONCE_BYTES)
        me, them = self.instance.encode(), peer.encode()
        await link.stream.send_all(MAGIC + _named(self.instance) + _named(peer) + mine)
        theirs = await link.exactly(NONCE_BYTES)
        proof = await link.exactly(32)
        expected = _proof(bytes.fromhex(found.token), b"listener", mine, theirs, me, them)
        if not hmac.compare_digest(proof, expected):
            return Refused("the peer did not prove its identity")
        await link.stream.send_all(_proof(self.token, b"dialer", theirs, mine, me, them))
        if await link.exactly(1) != OK:
            return Refused("the peer did not accept us")
        return Admitted(peer)

    async def _as_listener(self, link: _Buffered) -> Handshake:
        if await link.exactly(len(MAGIC)) != MAGIC:
            return Refused("not a cluster link")
        peer, target = await link.name(), await link.name()
        theirs = await link.exactly(NONCE_BYTES)
        if target != self.instance:
            return Refused("dialed another instance")  # an address reused since
        found = await self._lookup(peer)
        if found is None:
            return Refused(f"instance {peer[:12]!r} is not in the cluster")
        mine = secrets.token_bytes(NONCE_BYTES)
        me, them = self.instance.encode(), peer.encode()
        proof = _proof(self.token, b"listener", theirs, mine, them, me)
        await link.stream.send_all(mine + proof)
        answer = await link.exactly(32)
        expected = _proof(bytes.fromhex(found.token), b"dialer", mine, theirs, them, me)
        if not hmac.compare_digest(answer, expected):
            return Refused(f"instance {peer[:12]!r} did not prove its identity")
        await link.stream.send_all(OK)
        return Admitted(peer)
