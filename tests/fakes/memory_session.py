"""An in-memory provider session: the dispatch's side of `ProviderSession`, with no socket.

`MemorySession` stands where a real session stands in a `ProviderEntry`. It holds a provider
box key: on `start` it opens the sealed body with `protocol.crypto.open_request`, then
plays the request's script (the step types of `tests.fakes.provider`) in a task of the nursery
it was given, sealing chunks with the request's `ChunkSealer` and pushing the real
`protocol.messages` frames into the request's stream, as the session's reader would. Timing
tests run it on a MockClock; it records what a provider would have seen, at what virtual time:
each request (decrypted envelope, ephemeral key, start time), each `cancel` frame, each
`finish`, each `kick`.

Frame routing mirrors the real session: a terminal closes the request's stream, frames for a
request that ended or was cancelled are dropped, and a `cancel` reaches the provider (and is
recorded) only while the request is live. A terminal step ends the script (a provider sends
exactly one); `Drop` closes this request's stream without a
terminal, which the dispatch reads as a disconnect.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from daemon.routing.types import ProviderEntry, SessionGone
from protocol import crypto
from protocol.messages import (
    EncryptedPayload,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceResponseChunk,
    ModelInfo,
    ProviderMessage,
    Usage,
)
from tests.fakes.provider import (
    Accept,
    Behaviour,
    Chunk,
    Cleartext,
    Complete,
    Drop,
    Fail,
    Hold,
    Plaintext,
    Script,
    Stall,
    Step,
    Wait,
    always,
    answer,
)

# The real session's per-request buffer (daemon.routing.streams.STREAM_BUFFER) is far larger than
# any script here; a full buffer drops the request there too.
STREAM_BUFFER: Final = 1024


@dataclass
class Request:
    """One inference request as the provider saw it."""

    request_id: str
    envelope: dict[str, Any]
    ephemeral_key: str
    started_at: float
    cancelled_at: float | None = None
    finished_at: float | None = None


def in_turn(*scripts: Script) -> Behaviour:
    """The first request plays the first script, the next the next; the last one repeats."""
    counter = itertools.count()
    return lambda _body: scripts[min(next(counter), len(scripts) - 1)]


@dataclass(eq=False)
class MemorySession:
    """A scripted provider behind the session interface dispatch uses."""

    nursery: trio.Nursery
    behaviour: Behaviour = field(default_factory=lambda: always(answer("Hello", " world")))
    box_key: PrivateKey = field(default_factory=crypto.generate_box_key)
    identity: SigningKey = field(default_factory=crypto.generate_identity_key)
    requests: list[Request] = field(default_factory=list)
    kicks: list[tuple[int, str]] = field(default_factory=list)
    gone: bool = False
    _streams: dict[str, trio.MemorySendChannel[ProviderMessage]] = field(default_factory=dict)
    _scripts: dict[str, trio.CancelScope] = field(default_factory=dict)

    @property
    def provider_id(self) -> str:
        return crypto.provider_id(self.identity.verify_key)

    def entry(
        self,
        *,
        version: str = "0.7.0",
        models: Iterable[str] = ("m",),
        max_concurrency: int = 4,
        decode_tps: float | None = None,
    ) -> ProviderEntry:
        """A trusted, freshly attested registry entry for this session."""
        return ProviderEntry(
            provider_id=self.provider_id,
            session=self,
            version=version,
            backend="memory",
            public_key=self.box_key.public_key,
            identity_key=self.identity.verify_key,
            models={model: ModelInfo(id=model) for model in models},
            max_concurrency=max_concurrency,
            advertised_decode_tps=decode_tps,
            trusted=True,
            last_challenge_pass=trio.current_time(),
        )

    # What tests read ---------------------------------------------------------------------------

    @property
    def dispatch_times(self) -> list[float]:
        return [r.started_at for r in self.requests]

    @property
    def cancel_times(self) -> list[float]:
        return [r.cancelled_at for r in self.requests if r.cancelled_at is not None]

    @property
    def running(self) -> set[str]:
        """Requests whose script is still playing (a stall nobody cancelled is a leak)."""
        return set(self._scripts)

    @property
    def open_streams(self) -> set[str]:
        return set(self._streams)

    # The session interface ---------------------------------------------------------------------

    def open_stream(self, request_id: str) -> trio.MemoryReceiveChannel[ProviderMessage]:
        send, receive = trio.open_memory_channel[ProviderMessage](STREAM_BUFFER)
        self._streams[request_id] = send
        return receive

    def start(self, request_id: str, payload: EncryptedPayload, model: str = "") -> None:
        if self.gone:
            raise SessionGone
        plaintext, sealer = crypto.open_request(payload, self.box_key)
        envelope = json.loads(plaintext)
        request = Request(request_id, envelope, payload.ephemeral_public_key, trio.current_time())
        self.requests.append(request)
        script = self.behaviour(envelope["body"])
        scope = trio.CancelScope()
        self._scripts[request_id] = scope
        self.nursery.start_soon(self._play_script, request_id, sealer, script, scope)

    def cancel(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # ended already: the real session sends no frame either
        stream.close()
        for request in self._request(request_id):
            request.cancelled_at = trio.current_time()
        self._stop_script(request_id)

    def finish(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.close()
        for request in self._request(request_id):
            request.finished_at = trio.current_time()

    def fell_behind(self, request_id: str) -> bool:
        return False  # the in-memory streams are unbounded enough for every script

    def kick(self, code: int, reason: str) -> None:
        """End the session: every stream closes (a disconnect), nothing more can be sent."""
        self.kicks.append((code, reason))
        self.gone = True
        for request_id in list(self._streams):
            self._drop(request_id)
            self._stop_script(request_id)

    # Playing scripts ---------------------------------------------------------------------------

    def _request(self, request_id: str) -> list[Request]:
        # Empty when the daemon gave up while its request frame was still being sent.
        return [r for r in self.requests if r.request_id == request_id]

    def _stop_script(self, request_id: str) -> None:
        scope = self._scripts.get(request_id)
        if scope is not None:
            scope.cancel()

    async def _play_script(
        self,
        request_id: str,
        sealer: crypto.ChunkSealer,
        script: Script,
        scope: trio.CancelScope,
    ) -> None:
        try:
            with scope:
                for step in script:
                    if not await self._play(request_id, sealer, step):
                        break
        finally:
            del self._scripts[request_id]

    async def _play(self, request_id: str, sealer: crypto.ChunkSealer, step: Step) -> bool:
        """Play one step; False ends the script."""
        match step:
            case Chunk(line=line):
                payload = sealer.seal(line.encode())
                self._route(InferenceResponseChunk(request_id=request_id, encrypted_data=payload))
            case Plaintext():
                forged = crypto.seal_request(b"data: {}", self.box_key.public_key)[0]
                self._route(InferenceResponseChunk(request_id=request_id, encrypted_data=forged))
            case Cleartext(line=line, sealed=sealed):
                boxed = sealer.seal(line.encode()) if sealed and line is not None else None
                leak = InferenceResponseChunk(
                    request_id=request_id, encrypted_data=boxed, data=line
                )
                self._route(leak)
            case Accept():
                self._route(InferenceAccepted(request_id=request_id))
            case Complete(prompt_tokens=prompt, completion_tokens=completion):
                usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
                self._route(InferenceComplete(request_id=request_id, usage=usage), final=True)
                return False  # exactly one terminal ends a request
            case Fail(status=status, message=text, reason=reason):
                error = InferenceError(
                    request_id=request_id, error=text, status_code=status, error_reason=reason
                )
                self._route(error, final=True)
                return False
            case Wait(seconds=seconds):
                await trio.sleep(seconds)
            case Stall():
                await trio.sleep_forever()
            case Hold(release=release):
                await release.wait()
            case Drop():
                self._drop(request_id)
                return False
        return True

    def _route(self, frame: ProviderMessage, *, final: bool = False) -> None:
        request_id: str = frame.request_id  # type: ignore[union-attr]
        stream = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
        if stream is None:
            return  # ended or cancelled: PROTOCOL.md §6 says the daemon drops it
        try:
            stream.send_nowait(frame)
        except trio.WouldBlock:
            self._streams.pop(request_id, None)
            final = True
        if final:
            stream.close()

    def _drop(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.close()
