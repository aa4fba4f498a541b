"""`POST /v1/completions`: OpenAI's legacy text completions, streamed or assembled.

A codec on the shared skeleton (`handler.py`): `parse_completion_request` reads the body;
providers forward it to their backend's own `/v1/completions`, so its `text_completion`
chunks are relayed as they are (`relay.py`), or assembled into one `text_completion`. A
failure after the commit is one in-band `data: {"error": ...}` event and then `data: [DONE]`,
as on the chat route.
"""

from __future__ import annotations

from typing import Any, Final

from daemon.api.assemble import CompletionAssembler
from daemon.api.completions_request import parse_completion_request
from daemon.api.relay import OpenAICodec
from protocol.messages import Usage


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


CompletionsCodec: Final = OpenAICodec(
    parse_completion_request, "text_completion", "cmpl-", _text_completion
)
