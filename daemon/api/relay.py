"""A committed stream of OpenAI chunks, answered as server-sent events or as one object.

The OpenAI-shaped routes (chat and text completions) relay the provider's chunks as they are:
`relay_chunks` writes whatever is already buffered in one write, passes the usage-only chunk
the daemon always asks for only to a consumer who asked (`include_usage`), building it from
`inference_complete` when the backend sent none, reports a failure after the commit as one
`data: {"error": ...}` event, and ends with `data: [DONE]`. `collect` feeds every chunk to an
assembler for a one-object answer; `send_failure` is that answer's error after the commit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, assert_never

import msgspec

from daemon.api.asgi import Send, send_error
from daemon.nursery.attempt import Chunk
from daemon.nursery.dispatch import Committed, Finished, InBandError
from protocol.messages import Usage

DONE: Final = b"data: [DONE]\n\n"
EVENT_STREAM_HEADERS: Final = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_encoder: Final = msgspec.json.Encoder()

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


async def relay_chunks(
    send: Send,
    committed: Committed,
    headers: Headers,
    *,
    include_usage: bool,
    usage_chunk: UsageChunk,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*EVENT_STREAM_HEADERS, *headers],
        }
    )
    usage_sent = False
    parts: list[bytes] = []
    event = await committed.next_event()
    while True:
        match event:
            case Chunk(line=line, event=data):
                usage_only = _usage_only(data)
                usage_sent = usage_sent or usage_only
                if include_usage or not usage_only:
                    parts.append(line.encode() + b"\n\n")
            case Finished(usage=usage):
                if include_usage and not usage_sent:
                    parts.append(sse(usage_chunk(usage)))
                break
            case InBandError(kind=kind, message=message):
                parts.append(sse({"error": {"type": kind, "message": message}}))
                break
            case _:
                assert_never(event)
        polled = committed.poll()
        if polled is None:  # nothing more waiting: write what we have, then wait
            await body(send, b"".join(parts), more=True)
            parts = []
            event = await committed.next_event()
        else:
            event = polled
    parts.append(DONE)
    await body(send, b"".join(parts), more=False)


def _usage_only(event: dict[str, Any] | None) -> bool:
    """The usage chunk the daemon always asks providers for, unasked by this consumer."""
    return event is not None and not event.get("choices") and event.get("usage") is not None


async def body(send: Send, data: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def collect(
    committed: Committed, add: Callable[[dict[str, Any] | None], None]
) -> Finished | InBandError:
    """Feed every chunk to `add`; the stream's end."""
    while True:
        match await committed.next_event():
            case Chunk(event=data):
                add(data)
            case Finished() | InBandError() as end:
                return end
            case other:
                assert_never(other)


async def send_failure(send: Send, failure: InBandError, headers: Headers) -> None:
    """A one-object answer's failure after the commit: 504 for a timeout, else 502."""
    status = 504 if failure.kind == "timeout" else 502
    text = f"the provider failed mid-answer: {failure.message}"
    await send_error(send, status, text, failure.kind, headers=headers)
