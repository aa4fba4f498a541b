"""A consumer's `/v1/completions` body: validation, routing traits, the provider envelope.

`parse_completion_request` checks what chat shares (`body.py`) and the legacy fields:
- `prompt` is a string, or a list of exactly one string, forwarded as that string. OpenAI and
  vLLM read a list as a batch (one choice per prompt, like `n`), and joining the strings would
  answer a different question, so several strings are refused like `n > 1`; Ollama's
  `/v1/completions` takes only a string and llama-cpp-python refuses longer lists, so the one
  string is unwrapped. Token-id arrays are refused: the daemon cannot know a provider's
  tokenizer, and two providers of one model may not share one.
- `best_of > 1` is refused (it is `n` on the provider's side); `suffix`, `echo` and `logprobs`
  are checked for type and forwarded for the backend to apply.
The prompt tokens are estimated from the prompt's (and suffix's) text; the route never has
tools or media.
"""

from __future__ import annotations

from typing import Any, Final

from daemon.api.body import (
    DEFAULT_MAX_TOKENS,
    StreamOptions,
    asked_max_tokens,
    bad_request,
    check_number,
    check_options,
    decode_object,
    positive_int,
    provider_envelope,
    require,
    wants_usage,
)
from daemon.api.handler import Parsed
from daemon.routing.types import RequestTraits

ENDPOINT: Final = "/v1/completions"
CHARS_PER_TOKEN: Final = 4
# OpenAI's documented ceiling for the legacy `logprobs` (the top tokens per position).
MAX_LOGPROBS: Final = 5


def parse_completion_request(raw: bytes) -> Parsed:
    body = decode_object(raw)
    model = require(body, "model", str, "a string")
    prompt = _prompt(body)
    _check_legacy_options(body)
    check_options(body)
    suffix = body.get("suffix") or ""
    prompt_tokens = (len(prompt) + len(suffix)) // CHARS_PER_TOKEN
    asked = asked_max_tokens(body)
    traits = RequestTraits(
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=asked or DEFAULT_MAX_TOKENS,
        context_tokens=prompt_tokens + (asked or 0),
    )
    envelope = provider_envelope(ENDPOINT, {**body, "prompt": prompt})
    options = StreamOptions(model, body.get("stream") is True, wants_usage(body))
    return Parsed(traits, envelope, options)


def _prompt(body: dict[str, Any]) -> str:
    prompt = require(body, "prompt", str | list, "a string or an array of one string")
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise bad_request("'prompt' must not be an empty array", "prompt")
    if not all(isinstance(part, str) for part in prompt):
        raise bad_request(
            "'prompt' as token ids is not supported: send the prompt as text", "prompt"
        )
    if len(prompt) > 1:
        raise bad_request(
            "'prompt' with more than one string (a batch) is not supported: send one", "prompt"
        )
    text: str = prompt[0]
    return text


def _check_legacy_options(body: dict[str, Any]) -> None:
    best_of = positive_int(body, "best_of")
    if best_of is not None and best_of > 1:
        raise bad_request("'best_of' greater than 1 is not supported", "best_of")
    if body.get("echo") is not None and not isinstance(body["echo"], bool):
        raise bad_request("'echo' must be a boolean", "echo")
    if body.get("suffix") is not None and not isinstance(body["suffix"], str):
        raise bad_request("'suffix' must be a string", "suffix")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)):
        raise bad_request(f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS}", "logprobs")
    check_number(body, "logprobs", 0, MAX_LOGPROBS)
