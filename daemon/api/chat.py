"""`POST /v1/chat/completions`: OpenAI chat completions, streamed or assembled.

A codec on the shared skeleton (`handler.py`): `parse_chat_request` reads the body; providers
already answer in chat-completion chunks, so they are relayed as they are (`relay.py`), or
assembled into one `chat.completion`. A failure after the commit is one in-band
`data: {"error": ...}` event and then `data: [DONE]`.
"""

from __future__ import annotations

from typing import Any, Final

from daemon.api.assemble import CompletionAssembler
from daemon.api.chat_request import parse_chat_request
from daemon.api.relay import OpenAICodec
from protocol.messages import Usage


def _chat_completion(
    assembler: CompletionAssembler, usage: Usage, _request_id: str
) -> dict[str, Any]:
    return assembler.result(usage)


ChatCodec: Final = OpenAICodec(
    parse_chat_request, "chat.completion.chunk", "chatcmpl-", _chat_completion
)
