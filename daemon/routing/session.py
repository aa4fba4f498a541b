"""One provider's WebSocket session: its lifecycle, its one reader and its one writer.

A session is one task (plus its reader's helpers) owned by the supervisor nursery. It admits
the connection (`registration`), then runs three things until the connection ends: the reader,
the only task that receives frames; the writer, the only one that sends, taking frames from
the `outbox` everyone else posts to without waiting; and the `attestation` task. The reader
hands each request's frames to its stream (`streams`) and gives up on a provider it no
longer hears from (`silence`). However the session ends (the provider closed, went silent or
was kicked), it retires its registry entry and ends every stream at that moment, even if its
writer is stuck in a send.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Final

import trio

from daemon.config import Settings
from daemon.routing.attestation import Attestation
from daemon.routing.outbox import OUTBOX_FRAMES, Outbox, OutboxFull
from daemon.routing.registration import (
    Refused,
    TokenLookup,
    admit,
    receive_register,
    validate,
)
from daemon.routing.registry import Registry
from daemon.routing.silence import Silence
from daemon.routing.streams import RawSink, StreamFrame, Streams
from daemon.routing.transport import Transport, TransportClosed, decode_frame
from daemon.routing.types import ProviderEntry, SessionGone
from protocol.messages import (
    AttestationResponse,
    Cancel,
    CloseCode,
    DaemonMessage,
    EncryptedPayload,
    Heartbeat,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    InferenceResponseChunk,
    ModelsUpdate,
    ProtocolError,
    ProviderMessage,
    Register,
    TrustStatus,
    encode,
)

log = logging.getLogger("dinfer.session")

# Malformed frames after registration are dropped silently up to this many, then the session
# is closed: a buggy provider gets some slack, a hostile one does not get a free CPU sink.
MAX_MALFORMED_FRAMES: Final = 8


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
        self._outbox = Outbox()
        self._streams = Streams()
        self._scope = trio.CancelScope()
        self._close_code: int = CloseCode.GOING_AWAY
        self._close_reason = "daemon shutting down"
        self._farewell: DaemonMessage | None = None  # the last frame, sent just before closing
        self._candidate = False  # claims an identity with a live session; not yet proven
        self._malformed = 0
        self._silence = Silence(settings.heartbeat_timeout_s)
        self.entry: ProviderEntry | None = None

    # Lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes, then close it with the reason it ended."""
        with self._scope:
            try:
                entry = self._admit(await receive_register(self._transport, self._settings))
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
        self._scope.cancel(reason=reason)
        self._retire()

    def _retire(self) -> None:
        """Leave the registry and fail every stream in flight, once, without waiting."""
        entry, self.entry = self.entry, None
        if entry is None:
            return
        self._outbox.close()
        self._streams.close_all()
        self._registry.remove(entry)
        log.info("provider %s disconnected: %s", entry.provider_id, self._close_reason)

    def connection_lost(self) -> None:
        """The WebSocket task ended first: the provider hung up, or the server is stopping."""
        if not self._scope.cancel_called:
            self.kick(CloseCode.GOING_AWAY, "connection closed")

    def _admit(self, register: Register) -> ProviderEntry:
        entry = validate(register, self, self._settings, self._lookup_token)
        self._candidate = not admit(self._registry, entry)
        self.entry = entry
        if self._candidate:
            log.info("provider %s connected again: challenging the newcomer", entry.provider_id)
        else:
            _log_registered(entry)
        return entry

    def _settle(self, entry: ProviderEntry, passed: bool) -> bool:
        """The first verdict: a candidate that passed replaces the live session (4001), one
        that failed is closed, and the live session never learns it was challenged."""
        if not self._candidate:
            return True
        self._candidate = False
        if passed:
            old = self._registry.promote(entry)
            if old is not None:
                old.session.kick(CloseCode.SUPERSEDED, "superseded by a newer connection")
            _log_registered(entry)
            return True
        reason = "failed its first challenge while another session holds this identity"
        self._farewell = TrustStatus(status="rejected", reason=reason)
        self.kick(CloseCode.POLICY, reason)
        return False

    async def _serve(self, entry: ProviderEntry) -> None:
        attestation = Attestation(entry, self._registry, self._settings, self.post)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            nursery.start_soon(attestation.run, partial(self._settle, entry))
            await self._read_loop(entry, attestation)
            nursery.cancel_scope.cancel(reason="the connection ended")

    async def _refuse(self, reason: str) -> None:
        log.warning("provider registration refused: %s", reason)
        self._farewell = TrustStatus(status="rejected", reason=reason)
        self._close_code, self._close_reason = CloseCode.POLICY, reason
        await self._close()

    async def _close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                if self._farewell is not None:
                    await self._transport.send(encode(self._farewell))
                await self._transport.close(self._close_code, self._close_reason[:120])
            except TransportClosed:
                pass

    # The reader -----------------------------------------------------------------------------

    async def _read_loop(self, entry: ProviderEntry, attestation: Attestation) -> None:
        with self._silence.scope:
            while True:
                self._silence.heard()
                try:
                    frame = await self._transport.receive()
                except TransportClosed:
                    # At once, not when the nursery unwinds: a stuck writer would delay it.
                    self.kick(CloseCode.GOING_AWAY, "connection closed by the provider")
                    return
                self._handle(entry, attestation, decode_frame(frame), frame)
        self.kick(*self._silence.verdict())

    def _handle(
        self,
        entry: ProviderEntry,
        attestation: Attestation,
        message: ProviderMessage | ProtocolError,
        frame: str | bytes,
    ) -> None:
        # A decoded frame was text: a binary one is a ProtocolError (transport.decode_frame).
        text = frame if isinstance(frame, str) else ""
        match message:
            case InferenceResponseChunk():  # first: nearly every frame is one
                self._streams.route(message.request_id, message, final=False, text=text)
            case InferenceComplete() | InferenceError():
                self._streams.route(message.request_id, message, final=True, text=text)
            case ProtocolError() | Register():
                self._malformed_frame(entry, message)
            case Heartbeat(status=status):
                self._registry.set_draining(entry, status == "draining")
            case ModelsUpdate():
                self._update_models(entry, message)
            case AttestationResponse():
                attestation.answer(message)
            case _:
                self._streams.route(message.request_id, message, final=False, text=text)

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

    # The writer -----------------------------------------------------------------------------

    def post(self, message: DaemonMessage) -> None:
        """Queue one frame for the writer, never waiting; SessionGone if it cannot go out."""
        try:
            self._outbox.post(message)
        except OutboxFull:
            self.kick(
                CloseCode.GOING_AWAY, f"the provider stopped reading ({OUTBOX_FRAMES} frames)"
            )
            raise SessionGone from None

    async def _write_loop(self) -> None:
        async with self._outbox.frames as frames:
            async for frame in frames:
                self._silence.writing(True)
                try:
                    await self._transport.send(frame)
                except TransportClosed:
                    self.kick(CloseCode.GOING_AWAY, "connection closed")
                    return
                self._silence.writing(False)

    # Requests (ProviderLink: what dispatch calls) -------------------------------------------

    def open_stream(self, request_id: str) -> trio.MemoryReceiveChannel[StreamFrame]:
        """The frames of one request, closed after its terminal or when the session ends."""
        return self._streams.open(request_id)

    def open_raw(self, request_id: str, sink: RawSink) -> None:
        """The frames of one request as the provider's text, for a cluster relay."""
        self._streams.open_raw(request_id, sink)

    def start(self, request_id: str, body: EncryptedPayload, model: str = "") -> None:
        self.post(InferenceRequest(request_id=request_id, encrypted_body=body))

    def cancel(self, request_id: str) -> None:
        """Stop a request: forget its stream and tell the provider to stop generating."""
        self._streams.finish(request_id)
        try:
            self.post(Cancel(request_id=request_id))
        except SessionGone:
            pass

    def finish(self, request_id: str) -> None:
        """Forget a request that ended (or was abandoned) without a cancel frame."""
        self._streams.finish(request_id)

    def fell_behind(self, request_id: str) -> bool:
        """Was this request's stream closed because its reader could not keep up?"""
        return self._streams.fell_behind(request_id)


def _log_registered(entry: ProviderEntry) -> None:
    log.info("provider %s registered (%s %s)", entry.provider_id, entry.backend, entry.version)
