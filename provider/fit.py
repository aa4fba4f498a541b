"""Whether a stream that broke off before any content did so because the prompt cannot fit.

llama-cpp-python checks the prompt against its context inside the stream generator, after the
200 headers are sent (`llama_cpp/server/app.py` `get_event_publisher`): an over-long prompt
reaches the node as an empty stream or a reset connection, with no error to classify. So when
a stream breaks off before any content, and the model's context length is known, the node
measures the prompt: exactly with the backend's tokenizer (llama-cpp-python `POST
/extras/tokenize`, llama-server `POST /tokenize`), else as characters / 4. A prompt at least as
long as the context (both servers refuse `n_prompt >= n_ctx`) could never have been served, so
the failure is reported as the request's: 400 `context_length_exceeded`, not a 502 that would
count against this provider. Only this failure path pays for the count.

The exact count tokenizes the messages' text without the chat template's own tokens, so it
errs short: it never blames a prompt that fit. The estimate can err either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import trio

from provider.backend import Backend
from provider.failures import RequestFailure, context_exceeded
from provider.repair import PreparedRequest
from provider.stream import CHARS_PER_TOKEN

# The failures that can hide a context error: the backend took the request, then said nothing.
BROKE_OFF: Final = frozenset({"empty_response", "incomplete_stream", "backend_disconnected"})
# Each tokenizer route with the field its text goes in; a server answers 404 to the other's.
TOKENIZERS: Final = (("/extras/tokenize", "input"), ("/tokenize", "content"))
# A backend that cannot count quickly (wedged, or the one that just broke) gets the estimate.
TOKENIZE_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class PromptSize:
    tokens: int
    exact: bool

    def describe(self) -> str:
        return f"{self.tokens} tokens" if self.exact else f"about {self.tokens} tokens (estimated)"


async def explain(
    failure: RequestFailure, prepared: PreparedRequest, backend: Backend, context: int | None
) -> RequestFailure:
    """`failure`, or the context overflow it was if the prompt cannot fit `context` tokens."""
    if failure.reason not in BROKE_OFF or context is None:
        return failure
    size = await prompt_size(backend, prepared)
    if size.tokens < context:
        return failure
    return context_exceeded(
        f"the prompt is {size.describe()}, the model's context is {context}: "
        "the backend ended the stream without an answer"
    )


async def prompt_size(backend: Backend, prepared: PreparedRequest) -> PromptSize:
    text = prepared.prompt_text()
    with trio.move_on_after(TOKENIZE_TIMEOUT):
        for path, field in TOKENIZERS:
            count = await _count(backend, path, {"model": prepared.model, field: text})
            if count is not None:
                return PromptSize(count, exact=True)
    return PromptSize(-(-len(text) // CHARS_PER_TOKEN), exact=False)


async def _count(backend: Backend, path: str, request: dict[str, Any]) -> int | None:
    try:
        answer = await backend.post_json(path, request)
    except RequestFailure:
        return None  # no such route here, or the backend is down: the next one, or estimate
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    return len(tokens) if isinstance(tokens, list) else None
