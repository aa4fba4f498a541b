"""Each backend's way of saying "the prompt is longer than the model's context".

PROTOCOL.md §6 wants one answer for it whatever the backend: `400` with `error_reason:
"context_length_exceeded"`, never a 5xx that would count against this provider. Backends
say it in their own error shapes, so `overflow_message` parses the error (an HTTP error body or
a mid-stream `{"error": ...}` event) into one `BackendError` and runs it through `MATCHERS`.
A structured field decides wherever the backend has one; the message is matched only where
it is all the backend gives, and then together with the status and type it comes with.

(The case where a backend says nothing at all, an empty or reset stream, is `provider.fit`.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final


@dataclass(frozen=True)
class BackendError:
    """An error answer in the fields backends fill; `status` is None for a mid-stream event."""

    status: int | None
    message: str
    type: str | None = None
    code: str | None = None
    param: str | None = None


@dataclass(frozen=True)
class Matcher:
    backend: str
    # The HTTP statuses the answer comes with; a mid-stream event (no status) always qualifies.
    statuses: frozenset[int] | None
    says_overflow: Callable[[BackendError], bool]

    def matches(self, error: BackendError) -> bool:
        if self.statuses is not None and error.status is not None:
            if error.status not in self.statuses:
                return False
        return self.says_overflow(error)


def _pattern(*phrases: str) -> Callable[[BackendError], bool]:
    found = re.compile("|".join(phrases), re.IGNORECASE).search
    return lambda error: found(error.message) is not None


_VLLM_SAYS = _pattern(
    r"maximum context length is \d+ tokens", r"model's context length is only \d+ tokens"
)
_OLLAMA_SAYS = _pattern(r"^the input length exceeds the context length$")

# What each backend sends; found in their sources (and in reports quoting the live answers):
# - llama.cpp `tools/server` (server-common.cpp `format_error_response`, server-task.cpp
#   `server_task_result_error::to_json`): ERROR_TYPE_EXCEED_CONTEXT_SIZE is HTTP 400,
#   `{"error": {"code": 400, "type": "exceed_context_size_error", "message": "request (N
#   tokens) exceeds the available context size (M tokens), try increasing it",
#   "n_prompt_tokens": N, "n_ctx": M}}`; in a stream the first error is that HTTP answer, a
#   later one `data: {"error": {...}}` (server.cpp `handle_completions_impl`). Builds before the
#   type existed said "the request exceeds the available context size" (400), "input (N
#   tokens) is larger than the max context size" or "input is too large to process. increase
#   the physical batch size" (500, `server_error`).
# - llama-cpp-python `llama_cpp/server/errors.py`: llama.py's ValueError "Requested tokens (N)
#   exceed context window of M" becomes 400 `{"error": {"code": "context_length_exceeded",
#   "type": "invalid_request_error", "param": "messages", "message": "This model's maximum
#   context length is M tokens. However, you requested N tokens ..."}}`, but only without
#   streaming: a stream raises it after the headers (app.py `get_event_publisher`).
# - vLLM: 400 `BadRequestError` with the status as `code` and no code of its own for this
#   (`vllm/entrypoints/openai/serving_engine.py`, `create_error_response`): "This model's
#   maximum context length is N tokens. However, you requested M tokens ..." or "... your
#   request has M input tokens" (older, the error fields at the top level with `"object":
#   "error"`), now "... However, the model's context length is only N tokens ..." with
#   `param` `input_tokens` or `input_text` (`vllm/renderers/params.py`).
# - Ollama: its runner's errorInputTooLong "the input length exceeds the context length"
#   (`runner/llamarunner/runner.go`, 400; 500 from older builds), wrapped by the OpenAI layer
#   as `{"error": {"message": ..., "type": "invalid_request_error"}}` (`openai/openai.go`
#   `NewError`); it truncates instead unless asked not to. Relaying a llama-server error it
#   puts that server's JSON, as a string, in its own `error` (parsed by `_parse`).
MATCHERS: Final = (
    Matcher("llama.cpp", None, lambda e: e.type == "exceed_context_size_error"),
    Matcher("llama-cpp-python", None, lambda e: e.code == "context_length_exceeded"),
    Matcher(
        "llama.cpp before exceed_context_size_error",
        frozenset({400, 500}),
        _pattern(
            r"exceeds the available context size",
            r"is larger than the max context size",
            r"input is too large to process\. increase the physical batch size",
        ),
    ),
    Matcher("vLLM", frozenset({400}), lambda e: e.type == "BadRequestError" and _VLLM_SAYS(e)),
    Matcher("Ollama", frozenset({400, 500}), _OLLAMA_SAYS),
)


def overflow_message(status: int | None, document: Any) -> str | None:
    """The backend's own words when `document` says the prompt does not fit, else None."""
    error = _parse(status, document)
    if error is None or not any(matcher.matches(error) for matcher in MATCHERS):
        return None
    return error.message


def _parse(status: int | None, document: Any, depth: int = 0) -> BackendError | None:
    if isinstance(document, dict):
        inner = document.get("error")
        if isinstance(inner, dict | str):
            return _parse(status, inner, depth)
        return _fields(status, document)
    if isinstance(document, str):
        nested = _json_object(document) if depth < 2 else None
        if nested is not None:
            return _parse(status, nested, depth + 1)
        return BackendError(status, document.strip())
    return None


def _fields(status: int | None, error: dict[str, Any]) -> BackendError | None:
    message = error.get("message", error.get("detail"))
    if not isinstance(message, str):
        return None
    return BackendError(
        status,
        message.strip(),
        type=_text(error.get("type")),
        code=_text(error.get("code")),
        param=_text(error.get("param")),
    )


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _text(value: Any) -> str | None:
    # A numeric `code` (llama-server, vLLM) is the HTTP status, never a reason name.
    return value if isinstance(value, str) else None
