"""`POST /v1/responses`: the OpenAI Responses API, streamed or assembled.

The route is a codec on the shared skeleton (`handler.py`): `parse` translates the body into
a chat-completions request (`responses_request.py`); `respond` turns the provider's chat
chunks into Responses events (`responses_stream.py`) or assembles one `chat.completion` and
states it as one `response` (`responses_output.py`). `response.created` is written only after
the commit, like everything else. A failure after the commit is one `response.failed` event
in a stream, and a 502 or 504 in OpenAI's error shape for a non-streaming request. Nothing is
stored: each request carries its whole conversation.
"""

from __future__ import annotations

from typing import Final, assert_never

import msgspec

from daemon.api.asgi import Send, send_json
from daemon.api.assemble import CompletionAssembler
from daemon.api.errors import ApiError, openai_error
from daemon.api.handler import Headers, Parsed
from daemon.api.relay import collect, relay, send_failure
from daemon.api.responses_output import Frame, from_completion, usage_object
from daemon.api.responses_request import ResponsesOptions, parse_responses_request
from daemon.api.responses_stream import ResponseEvents
from daemon.nursery.dispatch import Committed, Finished, InBandError, RelayEnd

_encoder: Final = msgspec.json.Encoder(decimal_format="number")


class ResponsesCodec:
    """The Responses API wire shape."""

    def parse(self, raw: bytes) -> Parsed:
        return parse_responses_request(raw)

    def render_error(self, error: ApiError) -> bytes:
        return openai_error(error)

    async def respond(
        self, send: Send, committed: Committed, headers: Headers, options: ResponsesOptions
    ) -> RelayEnd:
        frame = Frame.open(committed.request_id, options)
        if options.stream:
            return await relay(send, committed, headers, ResponseEvents(frame))
        return await _complete(send, committed, headers, frame)


async def _complete(send: Send, committed: Committed, headers: Headers, frame: Frame) -> RelayEnd:
    assembler = CompletionAssembler(frame.options.model)
    end = await collect(committed, assembler.add)
    match end:
        case Finished(usage=usage):
            completion = assembler.result(usage)
            response = from_completion(frame, completion, usage_object(assembler.usage, usage))
            await send_json(send, 200, _encoder.encode(response), headers)
        case InBandError() as failure:
            await send_failure(send, failure, headers)
        case _:
            assert_never(end)
    return end
