"""`POST /v1/chat/completions`: OpenAI chat completions, streamed or assembled.

The route is a codec on the shared skeleton (`handler.py`): `parse` is
`chat_request.parse_chat_request`; `respond` relays the provider's chunks as they are (they
already are chat-completion chunks, `relay.py`), or assembles one `chat.completion`. A failure
after the commit is one in-band `data: {"error": ...}` event and then `data: [DONE]`.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Final, assert_never

import msgspec

from daemon.api.asgi import Send, send_json
from daemon.api.assemble import CompletionAssembler
from daemon.api.chat_request import ChatOptions, parse_chat_request
from daemon.api.errors import ApiError, openai_error
from daemon.api.handler import Headers, Parsed
from daemon.api.relay import DONE, OpenAIChunks, collect, relay, send_failure, usage_fields
from daemon.nursery.dispatch import Committed, Finished, InBandError
from protocol.messages import Usage

__all__ = ["DONE", "ChatCodec"]

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
            usage_chunk = partial(_usage_chunk, committed.request_id, options.model)
            await relay(send, committed, headers, OpenAIChunks(options.include_usage, usage_chunk))
        else:
            await _complete(send, committed, headers, options.model)


def _usage_chunk(request_id: str, model: str, usage: Usage) -> dict[str, Any]:
    """The usage chunk the consumer asked for, built from `inference_complete`."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage_fields(usage),
    }


async def _complete(send: Send, committed: Committed, headers: Headers, model: str) -> None:
    assembler = CompletionAssembler(model)
    match await collect(committed, assembler.add):
        case Finished(usage=usage):
            await send_json(send, 200, _encoder.encode(assembler.result(usage)), headers)
        case InBandError() as failure:
            await send_failure(send, failure, headers)
        case end:
            assert_never(end)
