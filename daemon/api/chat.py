"""`POST /v1/chat/completions`: OpenAI chat completions, streamed or assembled.

The route is a codec on the shared skeleton (`handler.py`): `parse` is
`chat_request.parse_chat_request`; `respond` relays the provider's chunks as they are (they
already are chat-completion chunks), dropping the usage chunk the consumer did not ask for, or
assembles one `chat.completion`. A failure after the commit is one in-band
`data: {"error": ...}` event and then `data: [DONE]`.
"""

from __future__ import annotations

import time
from typing import Any, Final, assert_never

import msgspec

from daemon.api.asgi import Send, send_error, send_json
from daemon.api.assemble import CompletionAssembler
from daemon.api.chat_request import ChatOptions, parse_chat_request
from daemon.api.errors import ApiError, openai_error
from daemon.api.handler import Headers, Parsed
from daemon.nursery.attempt import Chunk
from daemon.nursery.dispatch import Committed, Finished, InBandError
from protocol.messages import Usage

DONE: Final = b"data: [DONE]\n\n"
_encoder: Final = msgspec.json.Encoder()


class ChatCodec:
    """The chat-completions wire shape."""

    def parse(self, raw: bytes) -> Parsed:
        return parse_chat_request(raw)

    def render_error(self, error: ApiError) -> bytes:
        return openai_error(error)

    async def respond(
        self, send: Send, committed: Committed, headers: Headers, options: ChatOptions
    ) -> None:
        if options.stream:
            await _stream(send, committed, headers, options.include_usage, options.model)
        else:
            await _complete(send, committed, headers, options.model)


async def _stream(
    send: Send, committed: Committed, headers: Headers, include_usage: bool, model: str
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *headers,
            ],
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
                    parts.append(_usage_chunk(committed.request_id, model, usage))
                break
            case InBandError(kind=kind, message=message):
                error = _encoder.encode({"error": {"type": kind, "message": message}})
                parts.append(b"data: " + error + b"\n\n")
                break
            case _:
                assert_never(event)
        polled = committed.poll()
        if polled is None:  # nothing more waiting: write what we have, then wait
            await _body(send, b"".join(parts), more=True)
            parts = []
            event = await committed.next_event()
        else:
            event = polled
    parts.append(DONE)
    await _body(send, b"".join(parts), more=False)


def _usage_chunk(request_id: str, model: str, usage: Usage) -> bytes:
    """The usage chunk the consumer asked for, built from `inference_complete`."""
    chunk = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    }
    return b"data: " + _encoder.encode(chunk) + b"\n\n"


def _usage_only(event: dict[str, Any] | None) -> bool:
    """The usage chunk the daemon always asks providers for, unasked by this consumer."""
    return event is not None and not event.get("choices") and event.get("usage") is not None


async def _body(send: Send, data: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _complete(send: Send, committed: Committed, headers: Headers, model: str) -> None:
    assembler = CompletionAssembler(model)
    while True:
        match await committed.next_event():
            case Chunk(event=data):
                assembler.add(data)
            case Finished(usage=usage):
                body = _encoder.encode(assembler.result(usage))
                await send_json(send, 200, body, headers)
                return
            case InBandError(kind=kind, message=message):
                status = 504 if kind == "timeout" else 502
                text = f"the provider failed mid-answer: {message}"
                await send_error(send, status, text, kind, headers=headers)
                return
            case other:
                assert_never(other)
