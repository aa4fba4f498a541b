"""A committed stream, answered as server-sent events or as one object.

Every streaming route writes through `relay()` with its own `StreamEncoder`; `OpenAIChunks` is
the OpenAI-shaped routes' (chat and text completions relay the provider's chunks as they are,
each as one event and only JSON objects, a failure after the commit is one
`data: {"error": ...}` event, and `data: [DONE]` ends it).
`collect` feeds every chunk to an assembler for a one-object answer; `send_failure` is that
answer's error after the commit.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol, assert_never

import msgspec

from daemon.api.asgi import Send, send_api_error, send_json
from daemon.api.assemble import CompletionAssembler
from daemon.api.body import StreamOptions
from daemon.api.errors import ApiError, openai_error
from daemon.api.handler import Parsed
from daemon.nursery.attempt import Chunk
from daemon.nursery.dispatch import Committed, Finished, InBandError, RelayEnd
from protocol.messages import Usage
from protocol.sse import parse_data_line

DONE: Final = b"data: [DONE]\n\n"
EVENT_STREAM_HEADERS: Final = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
# The most a one-object (non-streaming) answer may hold, in characters of SSE lines.
MAX_ASSEMBLED_CHARS: Final = 64 * 1024 * 1024
_encoder: Final = msgspec.json.Encoder()
_FAILURE_STATUS: Final = {"timeout": 504, "server_shutting_down": 503}
_LINE_BREAKS: Final = re.compile(r"\r\n|\r|\n")  # what ends a line in an event stream

# The route's own usage-only chunk, for a usage `inference_complete` reported.
UsageChunk = Callable[[Usage], dict[str, Any]]
Headers = list[tuple[bytes, bytes]]


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + _encoder.encode(event) + b"\n\n"


def usage_fields(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class StreamEncoder(Protocol):
    """A route's event stream: the bytes for its opening, each relayed chunk and its end."""

    def opening(self) -> bytes: ...

    def chunk(self, chunk: Chunk) -> bytes: ...

    def finish(self, usage: Usage) -> bytes: ...

    def fail(self, kind: str, message: str) -> bytes: ...


async def relay(
    send: Send, committed: Committed, headers: Headers, encoder: StreamEncoder
) -> RelayEnd:
    """Write the committed stream as `encoder`'s events, one write per batch of what is
    already buffered: under load that saves a send, an HTTP chunk and a task switch per chunk.
    Returns how the stream ended."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*EVENT_STREAM_HEADERS, *headers],
        }
    )
    parts = [encoder.opening()]
    event = await committed.next_event()
    while True:
        match event:
            case Chunk():
                parts.append(encoder.chunk(event))
            case Finished(usage=usage) as end:
                parts.append(encoder.finish(usage))
                break
            case InBandError(kind=kind, message=message) as end:
                parts.append(encoder.fail(kind, message))
                break
            case _:
                assert_never(event)
        polled = committed.poll()
        if polled is None:  # nothing more waiting: write what we have, then wait
            if data := b"".join(parts):  # a chunk may map to no event (usage only)
                await body(send, data, more=True)
            parts = []
            event = await committed.next_event()
        else:
            event = polled
    await body(send, b"".join(parts), more=False)
    return end


class OpenAIChunks:
    """The OpenAI-shaped stream: the provider's chunks as they are, then `data: [DONE]`.

    The usage-only chunk the daemon always asks for reaches only a consumer who asked
    (`include_usage`), built from `inference_complete` when the backend sent none.
    """

    def __init__(self, include_usage: bool, usage_chunk: Callable[[Usage], dict[str, Any]]):
        self._include_usage = include_usage
        self._usage_chunk = usage_chunk
        self._usage_sent = False

    def opening(self) -> bytes:
        return b""

    def chunk(self, chunk: Chunk) -> bytes:
        if chunk.event is None:
            # Not a JSON object (opaque text, `null`, a number): every OpenAI client fails on
            # such an event, and one holding `\n\ndata: [DONE]` would end the stream twice.
            return b""
        usage_only = _usage_only(chunk.event)
        self._usage_sent = self._usage_sent or usage_only
        if self._include_usage or not usage_only:
            return _relayed_line(chunk.line)
        return b""

    def finish(self, usage: Usage) -> bytes:
        if self._include_usage and not self._usage_sent:
            return sse(self._usage_chunk(usage)) + DONE
        return DONE

    def fail(self, kind: str, message: str) -> bytes:
        return sse({"error": {"type": kind, "message": message}}) + DONE


def _relayed_line(line: str) -> bytes:
    """A provider's `data:` line as one event: as it is, unless it breaks lines inside (JSON
    may, between tokens), which would end the event early; then each piece is a `data:` line
    of its own, and a consumer's SSE parser joins them back with LF."""
    if "\n" not in line and "\r" not in line:
        return line.encode() + b"\n\n"
    payload = parse_data_line(line) or ""
    pieces = _LINE_BREAKS.split(payload)
    return b"".join(b"data: " + piece.encode() + b"\n" for piece in pieces) + b"\n"


def _usage_only(event: dict[str, Any] | None) -> bool:
    """The usage chunk the daemon always asks providers for, unasked by this consumer."""
    return event is not None and not event.get("choices") and event.get("usage") is not None


async def body(send: Send, data: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def collect(committed: Committed, add: Callable[[dict[str, Any] | None], None]) -> RelayEnd:
    """Feed every chunk to `add`; the stream's end.

    A one-object answer is held whole until its end, so it is bounded: past
    MAX_ASSEMBLED_CHARS the provider is released and the answer fails (a provider that
    ignores max_tokens must not exhaust the daemon's memory).
    """
    size = 0
    while True:
        match await committed.next_event():
            case Chunk(event=data, line=line):
                size += len(line)
                if size > MAX_ASSEMBLED_CHARS:
                    committed.close()
                    limit = MAX_ASSEMBLED_CHARS
                    too_long = (
                        f"the answer exceeds {limit} characters: ask for fewer tokens, or stream"
                    )
                    return InBandError("provider_error", too_long)
                add(data)
            case Finished() | InBandError() as end:
                return end
            case other:
                assert_never(other)


async def send_failure(
    send: Send,
    failure: InBandError,
    headers: Headers,
    render: Callable[[ApiError], bytes] = openai_error,
) -> None:
    """A one-object answer's failure after the commit: 504 for a timeout, 503 for the daemon's
    own shutdown, else 502."""
    status = _FAILURE_STATUS.get(failure.kind, 502)
    prefix = "" if status == 503 else "the provider failed mid-answer: "
    error = ApiError(status, failure.kind, prefix + failure.message)
    await send_api_error(send, error, headers, render)


@dataclass(frozen=True, slots=True)
class OpenAICodec:
    """An OpenAI-shaped route: the provider's chunks relayed as they are (`OpenAIChunks`), or
    one object assembled from them by `answer(assembler, usage, request_id)`."""

    parse_request: Callable[[bytes], Parsed]
    chunk_object: str  # the `object` of the usage chunk built from inference_complete
    id_prefix: str
    answer: Callable[[CompletionAssembler, Usage, str], dict[str, Any]]

    def parse(self, raw: bytes) -> Parsed:
        return self.parse_request(raw)

    def render_error(self, error: ApiError) -> bytes:
        return openai_error(error)

    async def respond(
        self, send: Send, committed: Committed, headers: Headers, options: StreamOptions
    ) -> RelayEnd:
        if options.stream:
            usage_chunk = partial(self._usage_chunk, committed.request_id, options.model)
            encoder = OpenAIChunks(options.include_usage, usage_chunk)
            return await relay(send, committed, headers, encoder)
        assembler = CompletionAssembler(options.model)
        end = await collect(committed, assembler.add)
        match end:
            case Finished(usage=usage):
                answer = self.answer(assembler, usage, committed.request_id)
                await send_json(send, 200, _encoder.encode(answer), headers)
            case InBandError() as failure:
                await send_failure(send, failure, headers)
            case _:
                assert_never(end)
        return end

    def _usage_chunk(self, request_id: str, model: str, usage: Usage) -> dict[str, Any]:
        """The usage chunk the consumer asked for, built from `inference_complete`."""
        return {
            "id": f"{self.id_prefix}{request_id}",
            "object": self.chunk_object,
            "created": int(time.time()),
            "model": model,
            "choices": [],
            "usage": usage_fields(usage),
        }
