"""One provider's WebSocket session: registration, challenges, the reader, in-flight streams.

A session is one task (plus its reader's helpers) owned by the supervisor nursery. The reader
is the only task that receives frames and the writer the only one that sends: everyone else
posts frames to a bounded outbox without waiting. Hypercorn shields its socket writes from
cancellation, so a provider that stops reading would otherwise hold any task that writes to
it; with the outbox, it holds only the writer, and a full outbox ends the session. Every
in-flight request has a bounded stream the reader routes frames into; when the session ends,
each stream is closed, which its dispatch reads as 502 `provider disconnected`. The session
retires its registry entry the moment it ends, even if its writer is stuck.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio
from trio_util import periodic

from daemon.config import Settings
from daemon.routing.registry import Registry
from daemon.routing.types import ProviderEntry, SessionGone
from protocol import crypto
from protocol.messages import (
    PROTOCOL_VERSION,
    AttestationChallenge,
    AttestationResponse,
    Cancel,
    CloseCode,
    DaemonMessage,
    EncryptedPayload,
    Heartbeat,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    ModelInfo,
    ModelsUpdate,
    ProtocolError,
    ProviderMessage,
    Register,
    TrustStatus,
    decode_provider_frame,
    encode,
)

log = logging.getLogger("dinfer.session")

# Malformed frames after registration are dropped silently up to this many, then the session
# is closed: a buggy provider gets some slack, a hostile one does not get a free CPU sink.
MAX_MALFORMED_FRAMES: Final = 8
# Frames buffered per in-flight request before the reader gives up on that request rather
# than stall every other request on this provider.
STREAM_BUFFER: Final = 1024
# Frames waiting for the writer: past this the provider is not reading and the session ends.
OUTBOX_FRAMES: Final = 256

StreamFrame = ProviderMessage
TokenLookup = Callable[[str], str | None]


class Transport(Protocol):
    """A WebSocket as the session needs it (the app adapts quart-trio's)."""

    async def receive(self) -> str | bytes: ...

    async def send(self, text: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class TransportClosed(Exception):
    """The WebSocket is gone: raised by transports in place of their own errors."""


class Refused(Exception):
    """A registration the daemon will not accept; the text is sent to the provider."""


@dataclass
class _Challenge:
    nonce: str
    timestamp: str
    answered: trio.Event = field(default_factory=trio.Event)
    passed: bool = False


class ProviderSession:
    def __init__(
        self,
        transport: Transport,
        registry: Registry,
        settings: Settings,
        lookup_token: TokenLookup,
    ) -> None:
        self._transport = transport
        self._registry = registry
        self._settings = settings
        self._lookup_token = lookup_token
        self._outbox, self._outbox_reader = trio.open_memory_channel[str](OUTBOX_FRAMES)
        self._scope = trio.CancelScope()
        self._close_code: int = CloseCode.GOING_AWAY
        self._close_reason = "daemon shutting down"
        self._streams: dict[str, trio.MemorySendChannel[StreamFrame]] = {}
        self._challenge: _Challenge | None = None
        self._malformed = 0
        self._fell_behind: set[str] = set()
        self.entry: ProviderEntry | None = None

    # Lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes, then close it with the reason it ended."""
        with self._scope:
            try:
                entry = self._admit(await self._receive_register())
            except Refused as refusal:
                await self._refuse(str(refusal))
                return
            except TransportClosed:
                return  # hung up before registering: nothing to clean up
            try:
                await self._serve(entry)
            finally:
                self._retire()
        await self._close()

    def kick(self, code: int, reason: str) -> None:
        """End the session with this close code (superseded, token revoked, stale...)."""
        self._close_code, self._close_reason = code, reason
        self._scope.cancel()
        self._retire()

    def _retire(self) -> None:
        """Leave the registry and fail every stream in flight, once, without waiting."""
        entry, self.entry = self.entry, None
        if entry is None:
            return
        self._outbox.close()
        self._close_streams()
        self._registry.remove(entry)
        log.info("provider %s disconnected: %s", entry.provider_id, self._close_reason)

    def connection_lost(self) -> None:
        """The WebSocket task ended first: the provider hung up, or the server is stopping."""
        if not self._scope.cancel_called:
            self._close_reason = "connection closed"

    async def _serve(self, entry: ProviderEntry) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            nursery.start_soon(self._challenge_loop, entry)
            await self._read_loop(entry)
            nursery.cancel_scope.cancel()

    async def _close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self._transport.close(self._close_code, self._close_reason[:120])
            except TransportClosed:
                pass

    # Registration ---------------------------------------------------------------------------

    async def _receive_register(self) -> Register:
        with trio.move_on_after(self._settings.register_timeout_s):
            message = self._decode(await self._transport.receive())
            if isinstance(message, ProtocolError):
                raise Refused(message.reason)
            if not isinstance(message, Register):
                kind = message.__struct_config__.tag
                raise Refused(f"expected a register frame first, got '{kind}'")
            return message
        raise Refused(f"no register frame within {self._settings.register_timeout_s:g} s")

    def _admit(self, register: Register) -> ProviderEntry:
        entry = self._validate(register)
        old = self._registry.add(entry)
        if old is not None:
            old.session.kick(CloseCode.SUPERSEDED, "superseded by a newer connection")
        self.entry = entry
        log.info("provider %s registered (%s %s)", entry.provider_id, entry.backend, entry.version)
        return entry

    def _validate(self, register: Register) -> ProviderEntry:
        if register.protocol != PROTOCOL_VERSION:
            raise Refused(
                f"unsupported protocol version {register.protocol} "
                f"(this daemon speaks {PROTOCOL_VERSION})"
            )
        try:
            public_key = crypto.decode_peer_public_key(register.public_key)
            identity = crypto.decode_identity_key(register.identity_key)
        except crypto.CryptoError as exc:
            raise Refused(str(exc)) from None
        return ProviderEntry(
            provider_id=crypto.provider_id(identity),
            session=self,
            version=register.version,
            backend=register.backend,
            public_key=public_key,
            identity_key=identity,
            models=_unique_models(register),
            max_concurrency=register.max_concurrency or 4,
            advertised_prefill_tps=register.prefill_tps,
            advertised_decode_tps=register.decode_tps,
            token_id=self._check_token(register.auth_token),
        )

    def _check_token(self, token: str | None) -> str | None:
        if self._settings.provider_auth == "open":
            return None
        if not token:
            raise Refused("auth_token is required: ask the daemon's admin for a provider token")
        token_id = self._lookup_token(token)
        if token_id is None:
            raise Refused("auth_token is unknown or revoked")
        return token_id

    async def _refuse(self, reason: str) -> None:
        log.warning("provider registration refused: %s", reason)
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self._transport.send(encode(TrustStatus(status="rejected", reason=reason)))
            except TransportClosed:
                pass
        self._close_code, self._close_reason = CloseCode.POLICY, reason
        await self._close()

    # Reading --------------------------------------------------------------------------------

    async def _read_loop(self, entry: ProviderEntry) -> None:
        silence = self._settings.heartbeat_timeout_s
        # One scope whose deadline every frame pushes back: cheaper than a scope per frame.
        with trio.CancelScope() as quiet:
            while True:
                quiet.deadline = trio.current_time() + silence
                try:
                    frame = await self._transport.receive()
                except TransportClosed:
                    self._close_reason = "connection closed by the provider"
                    return
                self._handle(entry, self._decode(frame))
        self.kick(CloseCode.STALE, f"no frame for {silence:g} s")

    def _decode(self, frame: str | bytes) -> ProviderMessage | ProtocolError:
        if isinstance(frame, bytes):
            return ProtocolError("binary frames are not part of the protocol")
        return decode_provider_frame(frame)

    def _handle(self, entry: ProviderEntry, message: ProviderMessage | ProtocolError) -> None:
        match message:
            case InferenceComplete() | InferenceError():
                self._route(message.request_id, message, final=True)
            case ProtocolError() | Register():
                self._malformed_frame(entry, message)
            case Heartbeat(status=status):
                self._registry.set_draining(entry, status == "draining")
            case ModelsUpdate():
                self._update_models(entry, message)
            case AttestationResponse():
                self._answer(entry, message)
            case _:
                self._route(message.request_id, message, final=False)

    def _route(self, request_id: str, message: StreamFrame, *, final: bool) -> None:
        stream = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
        if stream is None:
            return  # finished, cancelled or never ours: PROTOCOL.md §6 says drop it
        try:
            stream.send_nowait(message)
        except trio.WouldBlock:
            log.warning("request %s fell %d frames behind; dropping it", request_id, STREAM_BUFFER)
            self._streams.pop(request_id, None)
            self._fell_behind.add(request_id)
            final = True
        if final:
            stream.close()

    def _malformed_frame(self, entry: ProviderEntry, message: ProtocolError | Register) -> None:
        self._malformed += 1
        reason = message.reason if isinstance(message, ProtocolError) else "register sent twice"
        log.info("provider %s sent a bad frame: %s", entry.provider_id, reason)
        if self._malformed > MAX_MALFORMED_FRAMES:
            self.kick(CloseCode.POLICY, f"more than {MAX_MALFORMED_FRAMES} malformed frames")

    def _update_models(self, entry: ProviderEntry, update: ModelsUpdate) -> None:
        ids = [info.id for info in update.models]
        if len(set(ids)) != len(ids):
            self._malformed_frame(entry, ProtocolError("models_update repeats a model id"))
            return
        self._registry.update_models(entry, update.models)

    # Challenges -----------------------------------------------------------------------------

    async def _challenge_loop(self, entry: ProviderEntry) -> None:
        # aclosing: a cancelled loop must close the generator itself, not leave it to the GC.
        async with aclosing(periodic(self._settings.challenge_interval_s)) as ticks:
            try:
                async for _ in ticks:
                    await self._run_challenge(entry)
            except SessionGone:
                pass  # the session is ending: whoever ended it said why

    async def _run_challenge(self, entry: ProviderEntry) -> None:
        challenge = _Challenge(crypto.new_challenge_nonce(), crypto.challenge_timestamp())
        self._challenge = challenge
        self.post(AttestationChallenge(nonce=challenge.nonce, timestamp=challenge.timestamp))
        with trio.move_on_after(self._settings.challenge_answer_s):
            await challenge.answered.wait()
        self._challenge = None
        self.post(self._verdict(entry, challenge.passed))

    def _verdict(self, entry: ProviderEntry, passed: bool) -> TrustStatus:
        if passed:
            self._registry.challenge_passed(entry)
        elif self._registry.challenge_failed(entry):
            log.warning("provider %s untrusted after failed challenges", entry.provider_id)
        if entry.trusted:
            return TrustStatus(status="trusted")
        reason = entry.banned_reason or f"{entry.challenge_failures} failed challenge(s)"
        return TrustStatus(status="untrusted", reason=reason)

    def _answer(self, entry: ProviderEntry, response: AttestationResponse) -> None:
        challenge = self._challenge
        if challenge is None or challenge.nonce != response.nonce or challenge.answered.is_set():
            return  # unknown or replayed nonce: ignored (PROTOCOL.md §4)
        challenge.passed = crypto.verify_challenge(
            entry.identity_key, challenge.nonce, challenge.timestamp, response.signature
        )
        challenge.answered.set()

    # Requests (called by dispatch) ----------------------------------------------------------

    def post(self, message: DaemonMessage) -> None:
        """Queue one frame for the writer, never waiting; SessionGone if it cannot go out."""
        try:
            self._outbox.send_nowait(encode(message))
        except trio.WouldBlock:
            self.kick(
                CloseCode.GOING_AWAY, f"the provider stopped reading ({OUTBOX_FRAMES} frames)"
            )
            raise SessionGone from None
        except trio.ClosedResourceError:
            raise SessionGone from None

    async def _write_loop(self) -> None:
        async with self._outbox_reader:
            async for frame in self._outbox_reader:
                try:
                    await self._transport.send(frame)
                except TransportClosed:
                    self.kick(CloseCode.GOING_AWAY, "connection closed")
                    return

    def open_stream(self, request_id: str) -> trio.MemoryReceiveChannel[StreamFrame]:
        """The frames of one request, closed after its terminal or when the session ends."""
        send, receive = trio.open_memory_channel[StreamFrame](STREAM_BUFFER)
        self._streams[request_id] = send
        return receive

    def start(self, request_id: str, body: EncryptedPayload) -> None:
        self.post(InferenceRequest(request_id=request_id, encrypted_body=body))

    def cancel(self, request_id: str) -> None:
        """Stop a request: forget its stream and tell the provider to stop generating."""
        self.finish(request_id)
        try:
            self.post(Cancel(request_id=request_id))
        except SessionGone:
            pass

    def finish(self, request_id: str) -> None:
        """Forget a request that ended (or was abandoned) without a cancel frame."""
        self._fell_behind.discard(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.close()

    def fell_behind(self, request_id: str) -> bool:
        """Was this request's stream closed because its reader could not keep up?"""
        return request_id in self._fell_behind

    def _close_streams(self) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.close()


def _unique_models(register: Register) -> dict[str, ModelInfo]:
    models = {info.id: info for info in register.models}
    if len(models) != len(register.models):
        raise Refused("register repeats a model id")
    return models
