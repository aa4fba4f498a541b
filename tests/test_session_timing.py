"""A provider session's clocks, on a virtual clock: challenges, trust, staleness, registration.

The daemon's side runs the real ProviderSession; the test plays the provider over an in-memory
transport and checks each frame and close at the exact virtual second PROTOCOL.md §4 names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from nacl.signing import SigningKey

from daemon.config import Settings, load_settings
from daemon.nursery.attempt import FELL_BEHIND, ProviderStream
from daemon.nursery.supervisor import build_registry
from daemon.routing.registry import Registry
from daemon.routing.session import ProviderSession
from daemon.routing.silence import STALLED_WRITE_S
from daemon.routing.streams import STREAM_BUFFER
from daemon.routing.transport import TransportClosed
from daemon.routing.types import ProviderEntry, RequestTraits
from protocol import crypto
from protocol.messages import (
    AttestationChallenge,
    AttestationResponse,
    Cancel,
    DaemonMessage,
    Heartbeat,
    InferenceAccepted,
    InferenceRequest,
    ModelInfo,
    ProtocolError,
    ProviderMessage,
    Register,
    TrustStatus,
    decode_daemon_frame,
    encode,
)

# Frames in flight each way before a sender waits: far more than any test leaves unread.
CHANNEL_BOUND = 16
BASE = RequestTraits(model="m")


@dataclass(frozen=True)
class Closed:
    code: int
    reason: str
    at: float


class FakeTransport:
    """The daemon's end of an in-memory WebSocket; the test is the provider at the other end."""

    def __init__(self) -> None:
        self._to_daemon, self._from_provider = trio.open_memory_channel[str](CHANNEL_BOUND)
        self._to_provider, self._from_daemon = trio.open_memory_channel[str](CHANNEL_BOUND)
        self._writes_flow = trio.Event()
        self._writes_flow.set()
        self.closed: Closed | None = None

    def stick_writes(self) -> None:
        """From now on the daemon's sends block, as a socket write does when the provider
        stops reading; shielded, as Hypercorn's are, so cancelling the writer cannot help."""
        self._writes_flow = trio.Event()

    def release_writes(self) -> None:
        self._writes_flow.set()

    # The daemon's side (session.Transport)

    async def receive(self) -> str:
        try:
            return await self._from_provider.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportClosed from None

    async def send(self, text: str) -> None:
        with trio.CancelScope(shield=True):
            await self._writes_flow.wait()
        try:
            await self._to_provider.send(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportClosed from None

    async def close(self, code: int, reason: str) -> None:
        self.closed = Closed(code, reason, trio.current_time())
        await self._to_provider.aclose()

    # The provider's side

    async def provider_send(self, message: ProviderMessage) -> None:
        await self._to_daemon.send(encode(message))

    async def provider_receive(self) -> DaemonMessage:
        """The next frame from the daemon; EndOfChannel once it closed the connection."""
        message = decode_daemon_frame(await self._from_daemon.receive())
        assert not isinstance(message, ProtocolError), message.reason
        return message

    async def hang_up(self) -> None:
        await self._to_daemon.aclose()


class Provider:
    """The provider's keys and the frames it sends."""

    def __init__(self, transport: FakeTransport, identity: SigningKey | None = None) -> None:
        self.transport = transport
        self.identity = identity or crypto.generate_identity_key()
        self.provider_id = crypto.provider_id(self.identity.verify_key)

    async def register(self) -> None:
        await self.transport.provider_send(
            Register(
                protocol=1,
                version="0.7.0",
                backend="llama.cpp",
                public_key=crypto.encode_key(crypto.generate_box_key().public_key),
                identity_key=crypto.encode_key(self.identity.verify_key),
                models=[ModelInfo(id="m")],
            )
        )

    async def challenge(self) -> AttestationChallenge:
        message = await self.transport.provider_receive()
        assert isinstance(message, AttestationChallenge), message
        return message

    async def answer(
        self, challenge: AttestationChallenge, key: SigningKey | None = None, nonce: str = ""
    ) -> None:
        """Sign `challenge` (with another key or over another nonce, to misbehave)."""
        nonce = nonce or challenge.nonce
        signature = crypto.sign_challenge(key or self.identity, nonce, challenge.timestamp)
        await self.transport.provider_send(AttestationResponse(nonce=nonce, signature=signature))

    async def verdict(self) -> TrustStatus:
        message = await self.transport.provider_receive()
        assert isinstance(message, TrustStatus), message
        return message

    async def attest(self) -> None:
        """Answer the next challenge correctly and see it pass."""
        await self.answer(await self.challenge())
        assert await self.verdict() == TrustStatus(status="trusted")


@dataclass
class Connection:
    registry: Registry
    settings: Settings
    transport: FakeTransport
    provider: Provider
    finished: trio.Event  # set when the session's task has returned

    @property
    def entry(self) -> ProviderEntry | None:
        return self.registry.get(self.provider.provider_id)

    def routable(self) -> bool:
        entry = self.entry
        return entry is not None and self.registry.refusal(entry, BASE) is None

    def again(self) -> AbstractAsyncContextManager[Connection]:
        """A second connection to the same daemon claiming this provider's identity."""
        return _serve(self.registry, self.settings, self.provider.identity)


@asynccontextmanager
async def connection(**env: str) -> AsyncIterator[Connection]:
    """A ProviderSession served in a nursery; on exit the provider hangs up and it ends."""
    settings = load_settings({"DINFER_PROVIDER_AUTH": "open", **env})
    registry = build_registry(settings)
    async with _serve(registry, settings) as conn:
        yield conn
    assert registry.connected() == []  # candidates too: no session outlives its connection


@asynccontextmanager
async def _serve(
    registry: Registry, settings: Settings, identity: SigningKey | None = None
) -> AsyncIterator[Connection]:
    transport = FakeTransport()
    session = ProviderSession(transport, registry, settings, lambda token: None)
    finished = trio.Event()

    async def run() -> None:
        await session.run()
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        try:
            yield Connection(registry, settings, transport, Provider(transport, identity), finished)
        finally:  # even when a test fails: a writer stuck for good would hang the nursery
            await transport.hang_up()
            transport.release_writes()


# Challenges -------------------------------------------------------------------------------

# Silence limit far beyond each test's span, so only the challenge clocks act.
QUIET = {"DINFER_HEARTBEAT_TIMEOUT_S": "100000"}


async def test_challenges_start_at_register_then_repeat_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(**QUIET) as c:
        await trio.sleep(2)
        await c.provider.register()
        for expected in (2, 302, 602, 902):
            challenge = await c.provider.challenge()
            assert trio.current_time() == expected
            await trio.sleep(1)
            await c.provider.answer(challenge)
            assert await c.provider.verdict() == TrustStatus(status="trusted")
            assert trio.current_time() == expected + 1


async def test_routable_only_after_the_first_challenge_passes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(**QUIET) as c:
        await c.provider.register()
        challenge = await c.provider.challenge()
        assert c.entry is not None
        assert not c.routable()
        await trio.sleep(5)
        await c.provider.answer(challenge)
        assert await c.provider.verdict() == TrustStatus(status="trusted")
        assert trio.current_time() == 5
        assert c.routable()


async def test_a_missing_answer_fails_after_exactly_the_answer_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(**QUIET) as c:
        await c.provider.register()
        await c.provider.challenge()
        verdict = await c.provider.verdict()
        assert trio.current_time() == 30  # DINFER_CHALLENGE_ANSWER_S default
        assert verdict == TrustStatus(status="untrusted", reason="1 failed challenge(s)")
        assert not c.routable()


async def test_three_consecutive_failures_make_a_provider_untrusted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(**QUIET) as c:
        await c.provider.register()
        await c.provider.attest()
        for failures, at in ((1, 330), (2, 630)):
            await c.provider.challenge()
            assert await c.provider.verdict() == TrustStatus(status="trusted")
            assert trio.current_time() == at
            assert c.entry is not None and c.entry.challenge_failures == failures
            assert c.routable()
        await c.provider.challenge()
        verdict = await c.provider.verdict()
        assert trio.current_time() == 930
        assert verdict == TrustStatus(status="untrusted", reason="3 failed challenge(s)")
        assert not c.routable()


async def test_a_pass_resets_the_count_of_consecutive_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(**QUIET) as c:
        await c.provider.register()
        await c.provider.attest()
        for _ in range(2):
            await c.provider.challenge()
            assert await c.provider.verdict() == TrustStatus(status="trusted")
        await c.provider.attest()
        await c.provider.challenge()
        assert await c.provider.verdict() == TrustStatus(status="trusted")
        assert trio.current_time() == 1230
        assert c.entry is not None and c.entry.challenge_failures == 1
        assert c.routable()


async def test_a_wrong_signature_fails_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with connection(**QUIET) as c:
        await c.provider.register()
        challenge = await c.provider.challenge()
        await trio.sleep(4)
        await c.provider.answer(challenge, key=crypto.generate_identity_key())
        verdict = await c.provider.verdict()
        assert trio.current_time() == 4
        assert verdict == TrustStatus(status="untrusted", reason="1 failed challenge(s)")
        assert not c.routable()


async def test_an_unknown_nonce_is_ignored(autojump_clock: trio.testing.MockClock) -> None:
    async with connection(**QUIET) as c:
        await c.provider.register()
        challenge = await c.provider.challenge()
        # Well signed, but over a nonce the daemon never sent: neither a pass nor a failure.
        await c.provider.answer(challenge, nonce=crypto.new_challenge_nonce())
        await trio.sleep(10)
        await c.provider.answer(challenge)
        assert await c.provider.verdict() == TrustStatus(status="trusted")
        assert trio.current_time() == 10
        assert c.entry is not None and c.entry.challenge_failures == 0


async def test_a_replayed_answer_is_ignored(autojump_clock: trio.testing.MockClock) -> None:
    async with connection(**QUIET) as c:
        await c.provider.register()
        first = await c.provider.challenge()
        await c.provider.answer(first)
        assert await c.provider.verdict() == TrustStatus(status="trusted")
        await c.provider.challenge()
        await c.provider.answer(first)  # yesterday's signature on yesterday's nonce
        assert await c.provider.verdict() == TrustStatus(status="trusted")
        assert trio.current_time() == 330  # the answer window ran out: a failure
        assert c.entry is not None and c.entry.challenge_failures == 1


async def test_a_pass_older_than_sixteen_minutes_is_not_routable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No challenge between the pass at 0 and the check at 960: only the pass's age changes.
    async with connection(DINFER_CHALLENGE_INTERVAL_S="2000", **QUIET) as c:
        await c.provider.register()
        await c.provider.attest()
        await trio.sleep_until(959)
        assert c.routable()
        await trio.sleep_until(960)  # DINFER_CHALLENGE_MAX_AGE_S default
        assert not c.routable()
        assert c.entry is not None and c.entry.trusted


# Superseding -------------------------------------------------------------------------------


async def test_a_reconnect_supersedes_the_live_session_at_the_moment_its_challenge_passes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(**QUIET) as live:
        await live.provider.register()
        await live.provider.attest()
        old = live.entry
        async with live.again() as newcomer:
            await newcomer.provider.register()
            challenge = await newcomer.provider.challenge()
            await trio.sleep(5)
            assert live.entry is old and live.routable()
            await newcomer.provider.answer(challenge)
            assert await newcomer.provider.verdict() == TrustStatus(status="trusted")
            assert trio.current_time() == 5
            with pytest.raises(trio.EndOfChannel):
                await live.transport.provider_receive()
            assert live.transport.closed == Closed(4001, "superseded by a newer connection", 5)
            assert live.entry is not old and newcomer.routable()


async def test_a_newcomer_that_never_answers_is_closed_when_its_window_ends_unnoticed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(**QUIET) as live:
        await live.provider.register()
        await live.provider.attest()
        old = live.entry
        async with live.again() as impostor:
            await impostor.provider.register()
            await impostor.provider.challenge()
            rejection = await impostor.provider.verdict()
            assert trio.current_time() == 30  # DINFER_CHALLENGE_ANSWER_S default
            assert rejection.status == "rejected"
            with pytest.raises(trio.EndOfChannel):
                await impostor.transport.provider_receive()
            assert impostor.transport.closed is not None
            assert impostor.transport.closed.code == 1008
            assert live.entry is old and live.routable()
        assert old is not None and old.challenge_failures == 0
        assert live.transport.closed is None


# Staleness and registration -----------------------------------------------------------------


async def test_a_silent_provider_is_closed_stale_at_exactly_the_heartbeat_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection() as c:
        await c.provider.register()
        await c.provider.attest()
        await trio.sleep(50)
        await c.transport.provider_send(Heartbeat(active_requests=0))
        assert c.entry is not None
        with pytest.raises(trio.EndOfChannel):  # nothing more: the daemon closed the socket
            await c.transport.provider_receive()
        assert c.transport.closed == Closed(4002, "no frame for 90 s", 140)
        assert c.entry is None


async def test_no_register_frame_is_rejected_at_exactly_the_register_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection() as c:
        rejection = await c.provider.verdict()
        assert trio.current_time() == 10  # DINFER_REGISTER_TIMEOUT_S default
        assert rejection == TrustStatus(status="rejected", reason="no register frame within 10 s")
        await trio.testing.wait_all_tasks_blocked()
        assert c.transport.closed == Closed(1008, "no register frame within 10 s", 10)
        assert c.registry.providers() == []


# Noticing a close ---------------------------------------------------------------------------

PAYLOAD = crypto.seal_request(b"{}", crypto.generate_box_key().public_key)[0]


def session_of(conn: Connection) -> ProviderSession:
    assert conn.entry is not None and isinstance(conn.entry.session, ProviderSession)
    return conn.entry.session


async def test_a_hang_up_before_register_ends_the_session_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection() as c:
        await trio.sleep(1)
        await c.transport.hang_up()
        await c.finished.wait()
        assert trio.current_time() == 1  # not at the 10 s register timeout
        assert c.registry.connected() == []


async def test_a_close_while_a_write_is_stuck_fails_the_requests_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(**QUIET) as c:
        await c.provider.register()
        await c.provider.attest()
        session = session_of(c)
        stream = session.open_stream("r")
        c.transport.stick_writes()
        session.start("r", PAYLOAD)  # the writer blocks sending it
        await trio.sleep(3)
        await c.transport.hang_up()
        # Bounded: with the writer stuck for good, nothing else would ever end the wait.
        with trio.fail_after(STALLED_WRITE_S), pytest.raises(trio.EndOfChannel):
            await stream.receive()  # dispatch reads this as 502 provider disconnected
        assert trio.current_time() == 3
        assert c.entry is None and c.registry.connected() == []


async def test_a_provider_silent_behind_a_stuck_write_is_dropped_after_the_stall_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # What a provider that closed on a frame it would not take looks like from behind
    # Hypercorn: the write never finishes, and its close frame waits behind the write.
    async with connection(**QUIET) as c:
        await c.provider.register()
        await c.provider.attest()
        session = session_of(c)
        stream = session.open_stream("r")
        await trio.sleep(2)
        c.transport.stick_writes()
        session.start("r", PAYLOAD)
        with trio.fail_after(2 * STALLED_WRITE_S), pytest.raises(trio.EndOfChannel):
            await stream.receive()
        assert trio.current_time() == 2 + STALLED_WRITE_S
        assert c.entry is None and c.registry.connected() == []


async def test_a_provider_heard_from_during_a_slow_write_is_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(**QUIET) as c:
        await c.provider.register()
        await c.provider.attest()
        session = session_of(c)
        c.transport.stick_writes()
        session.start("r", PAYLOAD)
        for _ in range(10):  # a heartbeat every 5 s (PROTOCOL.md §4) while the frame crawls
            await trio.sleep(5)
            await c.transport.provider_send(Heartbeat(active_requests=1))
        await trio.sleep(STALLED_WRITE_S - 1)
        assert trio.current_time() == 50 + STALLED_WRITE_S - 1
        assert c.routable()
        c.transport.release_writes()
        assert isinstance(await c.transport.provider_receive(), InferenceRequest)


# Backpressure -----------------------------------------------------------------------------


async def test_a_stream_the_daemon_cannot_keep_up_with_is_dropped_without_blaming_the_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(**QUIET) as conn:
        await conn.provider.register()
        await conn.provider.attest()
        lease = conn.registry.reserve(BASE)
        assert lease is not None
        stream = ProviderStream(lease, conn.registry)
        assert stream.start(b"{}") is None
        request = await conn.transport.provider_receive()
        assert isinstance(request, InferenceRequest)
        # The provider sends more frames than the request's buffer holds, nobody reading.
        for _ in range(STREAM_BUFFER + 1):
            await conn.transport.provider_send(InferenceAccepted(request_id=request.request_id))
        await trio.testing.wait_all_tasks_blocked()

        events = [await stream.next_event() for _ in range(STREAM_BUFFER + 1)]

        assert events[-1] == FELL_BEHIND
        assert FELL_BEHIND.status == 503  # capacity: not a breaker strike
        stream.close()
        # The provider is still generating: it must be told to stop.
        assert await conn.transport.provider_receive() == Cancel(request_id=request.request_id)
        assert lease.released
