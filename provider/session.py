"""One WebSocket session with the daemon, from `register` to the reason it ended.

Tasks of a session, all in the session's nursery:
- the reader (frames from the daemon: challenges, trust verdicts, requests, cancels);
- the writer, the only task that writes to the socket: others queue frames on a bounded
  channel, because a write cancelled halfway would corrupt the WebSocket stream, while a
  channel send is cancelled atomically;
- the heartbeat (every 5 s), the pinger (WebSocket ping liveness), the model advertiser
  (`models_update` when the list changes), the drain watcher;
- one task per request, each in its own cancel scope kept by request id in `Slots`.
The first task that knows the session is over records a `SessionEnd` and cancels the rest;
requests still in flight die with it (the daemon fails them with 502 `provider disconnected`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Final

import trio
from trio_util import periodic
from trio_websocket import ConnectionClosed, WebSocketConnection

from protocol import crypto
from protocol.messages import (
    MULTI_SSE,
    PROTOCOL_VERSION,
    AttestationChallenge,
    AttestationResponse,
    Cancel,
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
    decode_daemon_frame,
    encode,
)
from provider.ending import EndKind, SessionEnd, from_close
from provider.failures import RequestFailure
from provider.keys import NodeKeys
from provider.link import CLOSE_TIMEOUT, LinkError, connected, send_frames
from provider.request import ChunkBatch, serve_request
from provider.slots import Slots
from provider.state import NodeState

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL: Final = 5.0
PING_INTERVAL: Final = 15.0
PING_TIMEOUT: Final = 20.0
# Time allowed to flush queued frames (a drain's last terminals) once the session is over.
FLUSH_TIMEOUT: Final = 5.0
# Frames queued for the writer; a full queue makes request tasks wait, which slows the
# backend stream to the pace the daemon reads at.
OUTBOX_FRAMES: Final = 16
DRAINED_CLOSE_CODE: Final = 1001


@dataclass(frozen=True)
class SessionSettings:
    """What a session registers with; fixed for the session's life."""

    coordinator: str
    keys: NodeKeys
    version: str
    capacity: int
    token: str | None = None


async def run_session(settings: SessionSettings, state: NodeState) -> SessionEnd:
    """Connect, register and serve until the connection ends; never raises for network faults."""
    try:
        return await connected(settings.coordinator, lambda ws: _Session(ws, settings, state).run())
    except LinkError as exc:
        return SessionEnd(EndKind.UNREACHABLE, str(exc))


class _Session:
    def __init__(self, ws: WebSocketConnection, settings: SessionSettings, state: NodeState):
        self._ws = ws
        self._settings = settings
        self._state = state
        self._slots = Slots(settings.capacity)
        self._opened = trio.current_time()
        self._end: SessionEnd | None = None
        self._rejection: str | None = None
        self._multi_sse = False  # the daemon acknowledged the multi_sse extension
        self._outbox, self._frames = trio.open_memory_channel[str | ChunkBatch](OUTBOX_FRAMES)

    async def run(self) -> SessionEnd:
        async with trio.open_nursery() as outer:
            outer.start_soon(self._write)
            await self._serve_until_end()
            # Every sender has stopped: let the writer flush what they queued (the last
            # terminals of a drain), but not wait forever on a daemon that stopped reading.
            await self._outbox.aclose()
            outer.cancel_scope.deadline = trio.current_time() + FLUSH_TIMEOUT
        assert self._end is not None, "the session only ends through _finish"
        if self._end.kind is EndKind.DRAINED:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._ws.aclose(DRAINED_CLOSE_CODE, "provider shutting down")
        return self._end

    async def _serve_until_end(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            advertised = self._state.models.value
            await self._send(self._register(advertised))
            nursery.start_soon(self._read)
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._ping)
            nursery.start_soon(self._advertise, advertised)
            nursery.start_soon(self._drain)

    def _finish(self, end: SessionEnd) -> None:
        if self._end is None:
            self._end = end
            self._nursery.cancel_scope.cancel(reason=end.describe())

    def _uptime(self) -> float:
        return trio.current_time() - self._opened

    # --- writing ---------------------------------------------------------------------------

    async def _send(self, message: ProviderMessage) -> None:
        await self._outbox.send(encode(message))

    async def _queue_for_request(self, message: ProviderMessage) -> None:
        """Queue a request's frame, without a task switch while the outbox has room.

        A request relaying a fast stream then queues all the chunks one backend read gave
        before the writer runs, and the writer sends them in one write (`_write`). Only a
        full outbox waits: the backpressure is the same.
        """
        frame = encode(message)
        try:
            self._outbox.send_nowait(frame)
        except trio.WouldBlock:
            await self._outbox.send(frame)

    async def _write(self) -> None:
        async for item in self._frames:
            try:
                await send_frames(self._ws, [_frame_of(item), *self._queued()])
            except ConnectionClosed:
                pass  # the reader sees the same close and reports why

    def _queued(self) -> list[str]:
        """Every frame already waiting in the outbox (at most OUTBOX_FRAMES)."""
        frames = []
        while True:
            try:
                frames.append(_frame_of(self._frames.receive_nowait()))
            except (trio.WouldBlock, trio.EndOfChannel):
                return frames

    def _register(self, models: tuple[ModelInfo, ...]) -> Register:
        keys = self._settings.keys
        return Register(
            protocol=PROTOCOL_VERSION,
            version=self._settings.version,
            backend=self._state.backend_kind,
            public_key=keys.public_key,
            identity_key=keys.identity_key,
            auth_token=self._settings.token,
            models=list(models),
            max_concurrency=self._settings.capacity,
            extensions=[MULTI_SSE],
        )

    # --- reading ---------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            try:
                frame = await self._ws.get_message()
            except ConnectionClosed as exc:
                self._finish(from_close(exc.reason, self._rejection, self._uptime()))
                return
            await self._dispatch(decode_daemon_frame(frame))

    async def _dispatch(self, message: object) -> None:
        match message:
            case AttestationChallenge(nonce=nonce, timestamp=timestamp):
                signature = crypto.sign_challenge(self._settings.keys.identity, nonce, timestamp)
                await self._send(AttestationResponse(nonce=nonce, signature=signature))
            case TrustStatus():
                self._on_trust(message)
            case InferenceRequest():
                await self._on_request(message)
            case Cancel(request_id=request_id):
                if self._slots.cancel(request_id, "cancelled by the daemon"):
                    log.info("request %s cancelled by the daemon", request_id)
            case ProtocolError(reason=reason):
                log.warning("ignoring a frame the daemon sent: %s", reason)

    def _on_trust(self, status: TrustStatus) -> None:
        self._multi_sse = MULTI_SSE in (status.extensions or ())
        reason = f" ({status.reason})" if status.reason else ""
        match status.status:
            case "trusted":
                log.info("trusted by the daemon: serving requests")
            case "rejected":
                self._rejection = status.reason or "no reason given"
                log.error("the daemon rejected this node%s", reason)
            case other:
                log.warning("the daemon reports this node %s%s", other, reason)

    # --- requests --------------------------------------------------------------------------

    async def _on_request(self, request: InferenceRequest) -> None:
        request_id = request.request_id
        if request_id in self._slots:
            log.warning("ignoring request %s: already in flight", request_id)
        elif self._state.draining.value:
            await self._refuse(request_id, "provider is draining", "draining")
        elif self._slots.full:
            limit = f"provider at its concurrency limit ({self._slots.capacity})"
            await self._refuse(request_id, limit, "at_capacity")
        else:
            self._nursery.start_soon(self._serve, request, self._slots.claim(request_id))

    async def _refuse(self, request_id: str, message: str, reason: str) -> None:
        await self._send(RequestFailure(503, message, reason).frame(request_id))

    async def _serve(self, request: InferenceRequest, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await serve_request(
                    request,
                    box=self._settings.keys.box,
                    backend=self._state.backend,
                    send=self._send_for_request,
                    context_length=self._state.context_length,
                    tokenizer=self._state.tokenizer,
                    multi_sse=self._multi_sse,
                )
        finally:
            self._slots.release(request.request_id)
            self._slots.task_done()

    async def _send_for_request(self, message: ProviderMessage | ChunkBatch) -> None:
        if isinstance(message, ChunkBatch):
            await self._outbox.send(message)
            return
        if isinstance(message, InferenceComplete | InferenceError):
            # Free the slot before the terminal leaves: the daemon may send the next request
            # the moment it reads it, and that one must not be refused as over the limit.
            self._slots.release(message.request_id)
        await self._queue_for_request(message)

    # --- background duties -----------------------------------------------------------------

    async def _heartbeat(self) -> None:
        # aclosing: a cancel that lands in the loop body must still finish the generator.
        async with aclosing(periodic(HEARTBEAT_INTERVAL)) as beats:
            async for _ in beats:
                await self._send(self._heartbeat_frame())

    def _heartbeat_frame(self) -> Heartbeat:
        status = "draining" if self._state.draining.value else "ok"
        return Heartbeat(active_requests=self._slots.in_use, status=status)

    async def _ping(self) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            with trio.move_on_after(PING_TIMEOUT) as waited:
                try:
                    await self._ws.ping()
                except ConnectionClosed:
                    return  # the reader reports why
            if waited.cancelled_caught:
                detail = f"no answer to a WebSocket ping within {PING_TIMEOUT:g} s"
                self._finish(SessionEnd(EndKind.UNRESPONSIVE, detail, self._uptime()))
                return

    async def _advertise(self, advertised: tuple[ModelInfo, ...]) -> None:
        while True:
            models = await self._state.models.wait_value(_differs_from(advertised))
            log.info("advertising models: %s", ", ".join(m.id for m in models) or "(none)")
            await self._send(ModelsUpdate(models=list(models)))
            advertised = models

    async def _drain(self) -> None:
        await self._state.draining.wait_value(True)
        log.info("draining: %d request(s) in flight", self._slots.in_use)
        await self._send(self._heartbeat_frame())
        # Wait for the tasks, not just the slots: a task frees its slot just before it queues
        # its terminal, and that terminal must be queued before the session winds down.
        running = self._slots.running
        with trio.move_on_at(self._state.drain_deadline):
            await running.wait_value(0)
        if running.value:
            log.warning("drain grace over: abandoning %d request(s)", running.value)
        self._finish(SessionEnd(EndKind.DRAINED, "stopped taking requests", self._uptime()))


def _differs_from(models: tuple[ModelInfo, ...]) -> Callable[[tuple[ModelInfo, ...]], bool]:
    return lambda candidate: candidate != models


def _frame_of(item: str | ChunkBatch) -> str:
    """An outbox item as its frame: a request's ChunkBatch is sealed as it leaves, holding
    every line added to it so far."""
    return item if isinstance(item, str) else encode(item.frame())
