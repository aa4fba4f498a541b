"""A scripted fake provider that speaks the real protocol (PROTOCOL.md) over a real WebSocket.

Tests, and the dispatch benchmark, start one with `nursery.start(fake.run)`: it registers,
answers challenges, heartbeats, and answers each inference request by playing a script of
steps (chunks, terminals, stalls, a dropped socket). It records what it saw: the decrypted
request bodies, the cancels, the trust verdicts, how the daemon closed the connection.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio
import trio_websocket
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from protocol import crypto
from protocol.messages import (
    AttestationChallenge,
    AttestationResponse,
    Cancel,
    Heartbeat,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    InferenceResponseChunk,
    ModelInfo,
    ProtocolError,
    Register,
    TrustStatus,
    Usage,
    decode_daemon_frame,
    encode,
)

# Script steps ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One SSE data line, sealed to the request's ephemeral key."""

    line: str


@dataclass(frozen=True)
class Complete:
    prompt_tokens: int = 3
    completion_tokens: int = 2


@dataclass(frozen=True)
class Fail:
    status: int = 500
    message: str = "backend crashed"
    reason: str | None = None  # error_reason, e.g. context_length_exceeded


@dataclass(frozen=True)
class Accept:
    """inference_accepted: the model is loading."""


@dataclass(frozen=True)
class Drop:
    """Close the WebSocket abruptly (the provider died)."""


@dataclass(frozen=True)
class Stall:
    """Send nothing more until cancelled."""


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Hold:
    """Send nothing more until the test sets `release` (a stream kept in flight on cue)."""

    release: trio.Event


@dataclass(frozen=True)
class Plaintext:
    """A chunk frame with a bad encryption (tests the daemon's sender-key check)."""


@dataclass(frozen=True)
class Cleartext:
    """A chunk frame carrying its line as plaintext `data`, which PROTOCOL.md §3 forbids:
    alone, beside the line properly sealed (`sealed`), or with no payload at all (`line`
    None)."""

    line: str | None
    sealed: bool = False


Step = Chunk | Complete | Fail | Accept | Drop | Stall | Wait | Hold | Plaintext | Cleartext
Script = Sequence[Step]
Behaviour = Callable[[dict[str, Any]], Script]


def role_chunk(model: str = "m") -> Chunk:
    return Chunk(_chunk_line(model, {"role": "assistant", "content": ""}))


def content_chunk(text: str, model: str = "m") -> Chunk:
    return Chunk(_chunk_line(model, {"content": text}))


def finish_chunk(model: str = "m", reason: str = "stop") -> Chunk:
    return Chunk(_chunk_line(model, {}, finish_reason=reason))


def _chunk_line(model: str, delta: dict[str, Any], finish_reason: str | None = None) -> str:
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return "data: " + json.dumps(event)


def answer(*texts: str, model: str = "m") -> Script:
    """A healthy stream: role, the texts, a finish reason, [DONE], complete."""
    return [
        role_chunk(model),
        *(content_chunk(t, model) for t in texts),
        finish_chunk(model),
        Chunk("data: [DONE]"),
        Complete(),
    ]


def always(script: Script) -> Behaviour:
    return lambda _body: script


# The fake -----------------------------------------------------------------------------------


@dataclass
class FakeProvider:
    url: str
    behaviour: Behaviour = field(default_factory=lambda: always(answer("Hello", " world")))
    models: list[ModelInfo] = field(default_factory=lambda: [ModelInfo(id="m")])
    version: str = "0.7.0"
    ssl_context: ssl.SSLContext | None = None  # for a wss:// URL (a daemon behind a proxy)
    backend: str = "fake"
    auth_token: str | None = None
    max_concurrency: int = 4
    answer_challenges: bool = True
    sign_wrongly: bool = False
    heartbeat_every: float | None = None
    extensions: list[str] | None = None  # asked for in `register` (docs/protocol-extensions.md)
    box_key: PrivateKey = field(default_factory=crypto.generate_box_key)
    identity: SigningKey = field(default_factory=crypto.generate_identity_key)

    received: list[dict[str, Any]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    verdicts: list[TrustStatus] = field(default_factory=list)
    challenges: int = 0
    close_code: int | None = None
    close_reason: str | None = None
    trusted: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)
    request_seen: trio.Event = field(default_factory=trio.Event)
    cancel_seen: trio.Event = field(default_factory=trio.Event)

    @property
    def provider_id(self) -> str:
        return crypto.provider_id(self.identity.verify_key)

    def register_frame(self) -> Register:
        return Register(
            protocol=1,
            version=self.version,
            backend=self.backend,
            public_key=crypto.encode_key(self.box_key.public_key),
            identity_key=crypto.encode_key(self.identity.verify_key),
            models=self.models,
            auth_token=self.auth_token,
            max_concurrency=self.max_concurrency,
            extensions=self.extensions,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[FakeProvider] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect and serve; `started` once the first verdict arrives (or the socket closes)."""
        try:
            async with open_provider_socket(self.url, ssl_context=self.ssl_context) as ws:
                await ws.send_message(encode(self.register_frame()))
                async with trio.open_nursery() as nursery:
                    self._ws, self._nursery = ws, nursery
                    self._streams: dict[str, trio.CancelScope] = {}
                    if self.heartbeat_every is not None:
                        nursery.start_soon(self._heartbeat, ws)
                    await self._read(ws, task_status)
                    nursery.cancel_scope.cancel()
        # Nurseries wrap the close in an exception group (strict_exception_groups).
        except* trio_websocket.ConnectionClosed as closed:
            self._closed(_first_leaf(closed).reason)
        except* (trio_websocket.HandshakeError, OSError):
            self._closed(None)
        finally:
            self.closed.set()
            if not self.trusted.is_set():
                self._started(task_status)

    def _started(self, task_status: trio.TaskStatus[FakeProvider]) -> None:
        try:
            task_status.started(self)
        except RuntimeError:
            pass  # already started

    def _closed(self, reason: Any) -> None:
        if reason is not None:
            self.close_code, self.close_reason = reason.code, reason.reason

    async def _read(self, ws: trio_websocket.WebSocketConnection, task_status: Any) -> None:
        while True:
            message = decode_daemon_frame(await ws.get_message())
            match message:
                case AttestationChallenge():
                    self.challenges += 1
                    if self.answer_challenges:
                        await ws.send_message(encode(self._sign(message)))
                case TrustStatus():
                    self.verdicts.append(message)
                    if message.status == "trusted" and not self.trusted.is_set():
                        self.trusted.set()
                        self._started(task_status)
                    elif message.status != "trusted":
                        self._started(task_status)
                case InferenceRequest():
                    self._nursery.start_soon(self._serve_request, ws, message)
                case Cancel():
                    self.cancels.append(message.request_id)
                    self.cancel_seen.set()
                    scope = self._streams.pop(message.request_id, None)
                    if scope is not None:
                        scope.cancel()
                case ProtocolError():
                    raise AssertionError(f"the daemon sent a bad frame: {message.reason}")

    def _sign(self, challenge: AttestationChallenge) -> AttestationResponse:
        nonce = challenge.nonce + ("x" if self.sign_wrongly else "")
        signature = crypto.sign_challenge(self.identity, nonce, challenge.timestamp)
        return AttestationResponse(nonce=challenge.nonce, signature=signature)

    async def _heartbeat(self, ws: trio_websocket.WebSocketConnection) -> None:
        assert self.heartbeat_every is not None
        while True:
            await ws.send_message(encode(Heartbeat(active_requests=len(self._streams))))
            await trio.sleep(self.heartbeat_every)

    async def _serve_request(
        self, ws: trio_websocket.WebSocketConnection, request: InferenceRequest
    ) -> None:
        plaintext, sealer = crypto.open_request(request.encrypted_body, self.box_key)
        envelope = json.loads(plaintext)
        self.received.append(envelope)
        self.request_ids.append(request.request_id)
        self.request_seen.set()
        with trio.CancelScope() as scope:
            self._streams[request.request_id] = scope
            for step in self.behaviour(envelope["body"]):
                if not await self._play(ws, request.request_id, sealer, step):
                    break
        self._streams.pop(request.request_id, None)

    async def _play(self, ws: Any, request_id: str, sealer: crypto.ChunkSealer, step: Step) -> bool:
        match step:
            case Chunk(line=line):
                payload = sealer.seal(line.encode())
                await ws.send_message(
                    encode(InferenceResponseChunk(request_id=request_id, encrypted_data=payload))
                )
            case Complete(prompt_tokens=p, completion_tokens=c):
                usage = Usage(prompt_tokens=p, completion_tokens=c)
                await ws.send_message(encode(InferenceComplete(request_id=request_id, usage=usage)))
            case Fail(status=status, message=text, reason=reason):
                error = InferenceError(
                    request_id=request_id, error=text, status_code=status, error_reason=reason
                )
                await ws.send_message(encode(error))
            case Accept():
                await ws.send_message(encode(InferenceAccepted(request_id=request_id)))
            case Wait(seconds=seconds):
                await trio.sleep(seconds)
            case Stall():
                await trio.sleep_forever()
            case Hold(release=release):
                await release.wait()
            case Plaintext():
                forged = crypto.seal_request(b"data: {}", self.box_key.public_key)[0]
                await ws.send_message(
                    encode(InferenceResponseChunk(request_id=request_id, encrypted_data=forged))
                )
            case Cleartext(line=line, sealed=sealed):
                await ws.send_message(cleartext_frame(request_id, line, sealer if sealed else None))
            case Drop():
                await ws.aclose(code=1011, reason="fake provider died")
                return False
        return True


def cleartext_frame(request_id: str, line: str | None, sealer: crypto.ChunkSealer | None) -> str:
    """A chunk frame written by hand, as a node breaking the encryption contract would."""
    frame: dict[str, Any] = {"type": "inference_response_chunk", "request_id": request_id}
    if line is not None:
        frame["data"] = line
    if sealer is not None and line is not None:
        frame["encrypted_data"] = msgspec.to_builtins(sealer.seal(line.encode()))
    return json.dumps(frame)


def _first_leaf(group: BaseExceptionGroup[Any]) -> Any:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


@asynccontextmanager
async def open_provider_socket(
    url: str, *, max_message_size: int = 1024 * 1024, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """`open_websocket_url`, but the TCP stream is always closed on exit.

    trio-websocket 0.12's client never closes its socket when the server closes the
    connection first (it waits for the server's TCP close, then returns early from
    `aclose`), which leaks the socket: a ResourceWarning, an error under
    `filterwarnings = error`. Owning the stream here closes it.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80)
    async with await _open_stream(host, port, ssl_context if secure else None) as stream:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, host, parts.path, max_message_size=max_message_size
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(5):
                    await ws.aclose()


async def _open_stream(
    host: str, port: int, context: ssl.SSLContext | None
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream(host, port)
    if context is None:
        return tcp
    tls = trio.SSLStream(tcp, context, server_hostname=host)
    await tls.do_handshake()
    return tls


async def start_fakes(nursery: trio.Nursery, fakes: Sequence[FakeProvider]) -> list[FakeProvider]:
    """Start each fake and wait until it is trusted (or refused)."""
    return [await nursery.start(fake.run) for fake in fakes]
