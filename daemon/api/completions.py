"""`POST /v1/completions`: OpenAI's legacy text completions, streamed or assembled.

A codec on the shared skeleton (`handler.py`): `parse` is
`completions_request.parse_completion_request`; providers forward the body to their backend's
own `/v1/completions`, so `respond` relays its `text_completion` chunks as they are
(`relay.py`), or assembles one `text_completion` from them. A failure after the commit is one
in-band `data: {"error": ...}` event and then `data: [DONE]`, as on the chat route.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Final, assert_never

import msgspec

from daemon.api.asgi import Send, send_json
from daemon.api.assemble import CompletionAssembler
from daemon.api.completions_request import TextOptions, parse_completion_request
from daemon.api.errors import ApiError, openai_error
from daemon.api.handler import Headers, Parsed
from daemon.api.relay import OpenAIChunks, collect, relay, send_failure, usage_fields
from daemon.nursery.dispatch import Committed, Finished, InBandError
from protocol.messages import Usage

_encoder: Final = msgspec.json.Encoder()


class CompletionsCodec:
    """The text-completions wire shape."""

    def parse(self, raw: bytes) -> Parsed:
        return parse_completion_request(raw)

    def render_error(self, error: ApiError) -> bytes:
        return openai_error(error)

    async def respond(
        self, send: Send, committed: Committed, headers: Headers, options: TextOptions
    ) -> None:
        if options.stream:
            usage_chunk = partial(_usage_chunk, committed.request_id, options.model)
            await relay(send, committed, headers, OpenAIChunks(options.include_usage, usage_chunk))
        else:
            await _complete(send, committed, headers, options.model)


def _usage_chunk(request_id: str, model: str, usage: Usage) -> dict[str, Any]:
    """The usage chunk the consumer asked for, built from `inference_complete`."""
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage_fields(usage),
    }


async def _complete(send: Send, committed: Committed, headers: Headers, model: str) -> None:
    assembler = CompletionAssembler(model)
    match await collect(committed, assembler.add):
        case Finished(usage=usage):
            answer = _text_completion(assembler, usage, committed.request_id)
            await send_json(send, 200, _encoder.encode(answer), headers)
        case InBandError() as failure:
            await send_failure(send, failure, headers)
        case end:
            assert_never(end)


def _text_completion(
    assembler: CompletionAssembler, usage: Usage, request_id: str
) -> dict[str, Any]:
    """The assembled chat completion, in the legacy shape."""
    chat = assembler.result(usage)
    (choice,) = chat["choices"]
    return {
        "id": assembler.id or f"cmpl-{request_id}",
        "object": "text_completion",
        "created": chat["created"],
        "model": chat["model"],
        "choices": [
            {
                "index": 0,
                "text": choice["message"]["content"],
                "logprobs": assembler.logprobs or None,
                "finish_reason": choice["finish_reason"],
            }
        ],
        "usage": chat["usage"],
    }
