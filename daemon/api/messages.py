"""`POST /v1/messages` (Anthropic Messages) and `POST /v1/messages/count_tokens`.

The Messages route is a codec on the shared skeleton (`handler.py`): `parse` translates the
body to chat completions (`messages_request.py`), so it is routed, gated and failed over
exactly like the chat route; `respond` translates the committed chunks back to Anthropic's
stream events or one `message` (`messages_response.py`). A failure after the commit is one
`event: error`, and no `[DONE]` ever. Errors use Anthropic's shape
`{"type": "error", "error": {"type", "message"}}`, and every answer carries `request-id`
(what Anthropic's SDK reads) beside `X-Request-ID`.

`count_tokens` answers `{"input_tokens": N}` with the daemon's own estimate of the prompt (the
one routing uses), not a model tokenizer's count; it dispatches nothing.
"""

from __future__ import annotations

from typing import Any, Final, assert_never

import msgspec

from daemon.api.asgi import ClientGone, Receive, Send, send_api_error, send_json
from daemon.api.assemble import CompletionAssembler
from daemon.api.errors import ApiError, anthropic_error
from daemon.api.handler import Headers, Parsed, read_consumer_body, request_id_headers
from daemon.api.messages_request import (
    MessagesOptions,
    count_input_tokens,
    parse_messages_request,
)
from daemon.api.messages_response import EventStream, Stop, assembled_message, message_id
from daemon.api.relay import collect, relay, send_failure
from daemon.nursery.dispatch import Committed, Finished, InBandError, RelayEnd
from daemon.nursery.supervisor import Supervisor

REQUEST_ID_HEADERS: Final = (b"x-request-id", b"request-id")
_encoder: Final = msgspec.json.Encoder()


class MessagesCodec:
    """The Anthropic Messages wire shape."""

    def parse(self, raw: bytes) -> Parsed:
        return parse_messages_request(raw)

    def render_error(self, error: ApiError) -> bytes:
        return anthropic_error(error)

    async def respond(
        self, send: Send, committed: Committed, headers: Headers, options: MessagesOptions
    ) -> RelayEnd:
        if options.stream:
            events = EventStream(options, message_id(committed.request_id))
            return await relay(send, committed, headers, events)
        return await _complete(send, committed, headers, options)


async def _complete(
    send: Send, committed: Committed, headers: Headers, options: MessagesOptions
) -> RelayEnd:
    assembler = CompletionAssembler(options.model)
    stop = Stop(options.stop_sequences)

    def add(data: dict[str, Any] | None) -> None:
        assembler.add(data)
        stop.observe(data)

    end = await collect(committed, add)
    match end:
        case Finished(usage=usage):
            completion = assembler.result(usage)
            ident = message_id(committed.request_id)
            message = assembled_message(completion, stop, options, ident, usage)
            await send_json(send, 200, _encoder.encode(message), headers)
        case InBandError() as failure:
            await send_failure(send, failure, headers, anthropic_error)
        case _:
            assert_never(end)
    return end


class CountTokensRoute:
    """The ASGI handler of `POST /v1/messages/count_tokens`."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        ident = request_id_headers(REQUEST_ID_HEADERS)
        try:
            raw, _ = await read_consumer_body(self._sup, scope, receive)
            tokens = count_input_tokens(raw)
        except ClientGone:
            return
        except ApiError as error:
            await send_api_error(send, error, ident, anthropic_error)
            return
        await send_json(send, 200, _encoder.encode({"input_tokens": tokens}), ident)
