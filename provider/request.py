"""One inference request, from the sealed `inference_request` to its single terminal frame.

Open the box, repair the body, stream it through the backend, and seal each SSE data line back
the moment it arrives: one `inference_response_chunk` per line, no batching. The plaintext of a
chunk is the data line exactly as the backend produced it (`data: {...}`).

Two kinds of line are never relayed:
- an `error` event (llama-server, vLLM): it ends the request as `inference_error` instead;
- `data: [DONE]`: the terminal frame already says the stream ended, and a `[DONE]` relayed
  before the node knows whether a finish reason arrived would tell the consumer "finished"
  for a stream that is about to fail (llama-cpp-python ends interrupted streams that way).

A stream that breaks off before any content may be a prompt too long for the model, said the
only way some backends can say it (`provider.fit`). A stream that succeeded without the
backend's prompt count gets it from the backend's tokenizer before the terminal frame
(`provider.tokenizer.counted`).

Cancelling the caller's scope aborts everything, closes the backend stream and sends nothing
more, which is what `cancel` asks for.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import trio
from nacl.public import PrivateKey

from protocol import crypto
from protocol.messages import (
    InferenceComplete,
    InferenceRequest,
    InferenceResponseChunk,
    ProviderMessage,
    Usage,
)
from protocol.sse import ChunkKind, classify_line
from provider import fit
from provider.backend import Backend
from provider.failures import RequestFailure, from_error_event
from provider.repair import PreparedRequest, prepare
from provider.stream import StreamAccount
from provider.tokenizer import Tokenizer, counted

log = logging.getLogger(__name__)

Emit = Callable[[str], Awaitable[None]]
# The most characters of lines one multi_sse frame carries: far inside the 10 MiB frame.
MAX_BATCH_CHARS: Final = 256 * 1024


class ChunkBatch:
    """multi_sse (docs/protocol-extensions.md): the lines of one request not yet sent.

    The request queues the batch once and keeps adding lines to it; the session's writer
    seals them into one `inference_response_chunk` when it takes the batch (`frame()`), so a
    frame carries what piled up while the writer was busy and no line waits for another.
    A batch at MAX_BATCH_CHARS holds the request until the writer has taken it.
    """

    def __init__(self, request_id: str, sealer: crypto.ChunkSealer) -> None:
        self._request_id = request_id
        self._sealer = sealer
        self._lines: list[str] = []
        self._chars = 0
        self._taken = trio.Event()

    async def add(self, line: str, send: Send) -> None:
        while self._lines and self._chars + len(line) > MAX_BATCH_CHARS:
            await self._taken.wait()
        self._lines.append(line)
        self._chars += len(line)
        if len(self._lines) == 1:  # not queued yet: the writer takes it when it gets to it
            await send(self)

    def frame(self) -> InferenceResponseChunk:
        """The queued lines as one sealed frame; the batch is empty again."""
        lines, self._lines, self._chars = self._lines, [], 0
        self._taken.set()
        self._taken = trio.Event()
        payload = self._sealer.seal("\n".join(lines).encode("utf-8"))
        return InferenceResponseChunk(request_id=self._request_id, encrypted_data=payload)


Send = Callable[[ProviderMessage | ChunkBatch], Awaitable[None]]
# A model's context length in tokens, as advertised; None when nobody knows it.
ContextLength = Callable[[str | None], int | None]


def _unknown(model: str | None) -> int | None:
    return None


async def serve_request(
    request: InferenceRequest,
    *,
    box: PrivateKey,
    backend: Backend,
    send: Send,
    context_length: ContextLength = _unknown,
    tokenizer: Tokenizer | None = None,
    multi_sse: bool = False,
) -> None:
    """Serve `request` and send its chunks and exactly one terminal frame.

    `tokenizer` is the backend's, shared across requests so what it learnt about the backend's
    routes is kept; without one, a fresh one is used for this request. `multi_sse`: the daemon
    acknowledged that extension, so the chunks go as a `ChunkBatch`.
    """
    request_id = request.request_id
    tokens = tokenizer or Tokenizer(backend)
    try:
        plaintext, sealer = _open(request, box)
        prepared = prepare(plaintext)
        usage = await _serve(request_id, prepared, sealer, tokens, send, context_length, multi_sse)
    except RequestFailure as failure:
        # The message may quote the backend; only the status and reason are logged.
        log.info("request %s failed: %d %s", request_id, failure.status_code, failure.reason)
        await send(failure.frame(request_id))
        return
    log.info("request %s complete: %d completion tokens", request_id, usage.completion_tokens)
    await send(InferenceComplete(request_id=request_id, usage=usage))


async def _serve(
    request_id: str,
    prepared: PreparedRequest,
    sealer: crypto.ChunkSealer,
    tokenizer: Tokenizer,
    send: Send,
    context_length: ContextLength,
    multi_sse: bool,
) -> Usage:
    account = StreamAccount(prepared.prompt_chars)
    backend = tokenizer.backend
    batch = ChunkBatch(request_id, sealer)

    async def emit(line: str) -> None:
        if multi_sse:
            await batch.add(line, send)
            return
        payload = sealer.seal(line.encode("utf-8"))
        await send(InferenceResponseChunk(request_id=request_id, encrypted_data=payload))

    try:
        async with backend.stream(prepared.endpoint, prepared.body) as lines:
            await relay(lines, account, emit)
        usage = account.outcome()
    except RequestFailure as failure:
        if account.produced_output:
            raise  # the prompt fit: the backend answered it before it failed
        context = context_length(prepared.model)
        explained = await fit.explain(failure, prepared, tokenizer, context)
        if explained is failure:
            raise
        raise explained from failure
    return await counted(tokenizer, usage, prepared)


def _open(request: InferenceRequest, box: PrivateKey) -> tuple[bytes, crypto.ChunkSealer]:
    try:
        return crypto.open_request(request.encrypted_body, box)
    except crypto.CryptoError as exc:
        raise RequestFailure(500, f"cannot open the request: {exc}", "undecryptable") from None


async def relay(lines: AsyncIterator[str], account: StreamAccount, emit: Emit) -> None:
    """Relay the stream's data lines until `[DONE]` or its end; raise on an error event."""
    async for line in lines:
        classified = classify_line(line)
        if classified is None:  # blank separators, comments, `event:` lines
            continue
        if classified.kind is ChunkKind.DONE:
            return
        if classified.kind is ChunkKind.ERROR:
            raise from_error_event(classified.event or {})
        account.observe(classified.event)
        await emit(line)
