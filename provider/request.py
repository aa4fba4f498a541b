"""One inference request, from the sealed `inference_request` to its single terminal frame.

Open the box, repair the body, stream it through the backend, and seal each SSE data line back
the moment it arrives: one `inference_response_chunk` per line, no batching. The plaintext of a
chunk is the data line exactly as the backend produced it (`data: {...}`).

Two kinds of line are never relayed:
- an `error` event (llama-server, vLLM): it ends the request as `inference_error` instead;
- `data: [DONE]`: the terminal frame already says the stream ended, and a `[DONE]` relayed
  before the node knows whether a finish reason arrived would tell the consumer "finished"
  for a stream that is about to fail (llama-cpp-python ends interrupted streams that way).

Cancelling the caller's scope aborts everything, closes the backend stream and sends nothing
more, which is what `cancel` asks for.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

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
from provider.backend import Backend
from provider.failures import RequestFailure, from_error_event
from provider.repair import prepare
from provider.stream import StreamAccount

log = logging.getLogger(__name__)

Send = Callable[[ProviderMessage], Awaitable[None]]
Emit = Callable[[str], Awaitable[None]]


async def serve_request(
    request: InferenceRequest, *, box: PrivateKey, backend: Backend, send: Send
) -> None:
    """Serve `request` and send its chunks and exactly one terminal frame."""
    request_id = request.request_id
    try:
        usage = await _serve(request, box, backend, send)
    except RequestFailure as failure:
        # The message may quote the backend; only the status and reason are logged.
        log.info("request %s failed: %d %s", request_id, failure.status_code, failure.reason)
        await send(failure.frame(request_id))
        return
    log.info("request %s complete: %d completion tokens", request_id, usage.completion_tokens)
    await send(InferenceComplete(request_id=request_id, usage=usage))


async def _serve(request: InferenceRequest, box: PrivateKey, backend: Backend, send: Send) -> Usage:
    plaintext, sealer = _open(request, box)
    prepared = prepare(plaintext)
    account = StreamAccount(prepared.prompt_chars)

    async def emit(line: str) -> None:
        payload = sealer.seal(line.encode("utf-8"))
        await send(InferenceResponseChunk(request_id=request.request_id, encrypted_data=payload))

    async with backend.stream(prepared.endpoint, prepared.body) as lines:
        await relay(lines, account, emit)
    return account.outcome()


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
