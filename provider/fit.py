"""Whether a stream that broke off before any content did so because the prompt cannot fit.

llama-cpp-python checks the prompt against its context inside the stream generator, after the
200 headers are sent (`llama_cpp/server/app.py` `get_event_publisher`): an over-long prompt
reaches the node as an empty stream or a reset connection, with no error to classify. So when
a stream breaks off before any content, and the model's context length is known, the node
measures the prompt: exactly with the backend's tokenizer (`provider.tokenizer`), else as
characters / 4. A prompt at least as
long as the context (both servers refuse `n_prompt >= n_ctx`) could never have been served, so
the failure is reported as the request's: 400 `context_length_exceeded`, not a 502 that would
count against this provider. Only this failure path pays for the count.

The exact count tokenizes the messages' text without the chat template's own tokens, so it
errs short: it never blames a prompt that fit. The estimate can err either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import trio

from provider.failures import RequestFailure, context_exceeded
from provider.repair import PreparedRequest
from provider.stream import estimated_tokens
from provider.tokenizer import ROUTES, Tokenizer

# The failures that can hide a context error: the backend took the request, then said nothing.
BROKE_OFF: Final = frozenset({"empty_response", "incomplete_stream", "backend_disconnected"})
# A backend that cannot count quickly (wedged, or the one that just broke) gets the estimate.
TOKENIZE_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class PromptSize:
    tokens: int
    exact: bool

    def describe(self) -> str:
        return f"{self.tokens} tokens" if self.exact else f"about {self.tokens} tokens (estimated)"


async def explain(
    failure: RequestFailure, prepared: PreparedRequest, tokenizer: Tokenizer, context: int | None
) -> RequestFailure:
    """`failure`, or the context overflow it was if the prompt cannot fit `context` tokens."""
    if failure.reason not in BROKE_OFF or context is None:
        return failure
    size = await prompt_size(tokenizer, prepared)
    if size.tokens < context:
        return failure
    return context_exceeded(
        f"the prompt is {size.describe()}, the model's context is {context}: "
        "the backend ended the stream without an answer"
    )


async def prompt_size(tokenizer: Tokenizer, prepared: PreparedRequest) -> PromptSize:
    text = prepared.prompt_text()
    with trio.move_on_after(TOKENIZE_TIMEOUT):
        # Only failures pay for this, so it may try every route the tokenizer has not ruled out.
        for _ in ROUTES:
            count = await tokenizer.count(prepared.model, text)
            if count is not None:
                return PromptSize(count, exact=True)
    return PromptSize(estimated_tokens(len(text)), exact=False)
