"""Hypothesis strategies for the fuzz targets (`fuzz_targets.py`): hostile bytes and JSON.

Purely random bytes rarely get past a parser's first check, so most inputs are JSON built from
the words the parsers look for (field names, roles, block and item types, schema keywords)
mixed with random ones, and values that break assumptions: huge integers, `1e400`, booleans
where numbers go, lone surrogates, CR and LF inside a line, deep nesting. A share of them are
then mangled at the byte level (cut short, a byte flipped, trailing data).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from hypothesis import strategies as st

# Every name a route's translator, the frame decoder or the schema repair branches on.
WORDS: Final = (
    # request fields
    "model", "messages", "prompt", "input", "instructions", "system", "stream",
    "stream_options", "include_usage", "max_tokens", "max_completion_tokens",
    "max_output_tokens", "n", "best_of", "echo", "suffix", "logprobs", "top_logprobs",
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_sequences",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "tools",
    "tool_choice", "parallel_tool_calls", "disable_parallel_tool_use", "text", "format",
    "schema", "strict", "name", "description", "previous_response_id", "conversation",
    "background", "metadata", "response_format",
    # messages, parts, blocks and items
    "role", "content", "type", "tool_calls", "tool_call_id", "tool_use_id", "id", "call_id",
    "function", "arguments", "output", "is_error", "source", "media_type", "data", "url",
    "image_url", "detail", "refusal", "input_schema", "parameters",
    # schemas
    "properties", "items", "additionalProperties", "enum", "anyOf", "oneOf", "allOf",
    "nullable", "required",
    # chunks
    "choices", "delta", "index", "finish_reason", "stop_reason", "usage", "object",
    "reasoning_content", "reasoning", "prompt_tokens", "completion_tokens", "total_tokens",
    "completion_tokens_details", "prompt_tokens_details", "reasoning_tokens", "cached_tokens",
    "created", "error", "message",
    # frames
    "request_id", "encrypted_data", "ephemeral_public_key", "ciphertext", "status_code",
    "error_reason", "active_requests", "status", "nonce", "signature", "protocol", "version",
    "backend", "public_key", "identity_key", "auth_token", "max_concurrency", "decode_tps",
    "prefill_tps", "hardware", "is_vision", "context_length", "template_render",
    "template_render_ok", "quantization", "timestamp", "encrypted_body", "reason",
)  # fmt: skip
# String values the same code compares against.
VALUES: Final = (
    "user", "assistant", "system", "developer", "tool", "text", "image", "tool_use",
    "tool_result", "thinking", "redacted_thinking", "base64", "url", "custom", "function",
    "auto", "any", "none", "required", "message", "function_call", "function_call_output",
    "input_text", "output_text", "input_image", "json_object", "json_schema", "object",
    "array", "string", "null", "integer", "number", "boolean", "stop", "length", "tool_calls",
    "content_filter", "chat.completion.chunk", "text_completion", "response.created",
    "response.in_progress", "[DONE]", "register", "heartbeat", "models_update",
    "attestation_response", "inference_accepted", "inference_response_chunk",
    "inference_complete", "inference_error", "attestation_challenge", "trust_status",
    "inference_request", "cancel", "image_url", "video_url", "image/png",
)  # fmt: skip

# Text that includes what JSON and SSE treat specially, and lone surrogates (which no UTF-8
# byte string holds, but a `str` can).
_any_char = st.characters(exclude_categories=())
_line_breaks = st.sampled_from(["\n", "\r", "\r\n", "\n\n", "data: [DONE]", "\u2028", "\x00"])
texts: Final = st.one_of(
    st.text(max_size=12),
    st.text(_any_char, max_size=6),
    st.sampled_from(VALUES),
    st.lists(st.one_of(st.text(max_size=4), _line_breaks), max_size=4).map("".join),
)
keys: Final = st.one_of(st.sampled_from(WORDS), st.sampled_from(WORDS), st.text(max_size=6))
numbers: Final = st.one_of(
    st.integers(-3, 30),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, 10_000_001]),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars: Final = st.one_of(st.none(), st.booleans(), numbers, texts)


def json_values(max_leaves: int = 24) -> st.SearchStrategy[Any]:
    """Any JSON value, its objects keyed mostly by the words the parsers look for."""
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(keys, children, max_size=5),
        ),
        max_leaves=max_leaves,
    )


def json_objects(max_leaves: int = 24) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(keys, json_values(max_leaves), max_size=8)


_encoder: Final = msgspec.json.Encoder()


def encoded(value: Any) -> bytes:
    """`value` as JSON; a lone surrogate, unencodable, becomes U+FFFD as a socket would."""
    try:
        return _encoder.encode(value)
    except UnicodeEncodeError:
        text = _encoder.encode(_scrub(value))
        return text


def _scrub(value: Any) -> Any:
    match value:
        case str():
            return value.encode(errors="replace").decode()
        case list():
            return [_scrub(item) for item in value]
        case dict():
            return {_scrub(key): _scrub(item) for key, item in value.items()}
    return value


@st.composite
def mangled(draw: st.DrawFn, document: bytes) -> bytes:
    """`document`, sometimes cut short, with a byte changed, or with something after it."""
    match draw(st.integers(0, 7)):
        case 0:
            return document[: draw(st.integers(0, len(document)))]
        case 1 if document:
            at = draw(st.integers(0, len(document) - 1))
            return document[:at] + bytes([draw(st.integers(0, 255))]) + document[at + 1 :]
        case 2:
            return document + draw(st.sampled_from([b" ", b"x", b"{}", b"\n\n", b"\x00"]))
    return document


# Literal JSON msgspec reads in surprising ways: numbers too big for a float or an int64,
# deep nesting, duplicate keys, escapes for lone surrogates.
ODD_DOCUMENTS: Final = (
    b'{"model": "m", "max_tokens": 1e400}',
    b'{"model": "m", "temperature": 1e-400}',
    b'{"model": "m", "max_tokens": 123456789012345678901234567890}',
    b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "m", "model": 1}',
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b"\xef\xbb\xbf{}",
    b"\xff\xfe",
)


def documents(objects: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """Bodies or frames: mostly `objects` encoded (and maybe mangled), some raw bytes."""
    return st.one_of(
        objects.map(encoded).flatmap(mangled),
        objects.map(encoded),
        st.binary(max_size=64),
        st.sampled_from(ODD_DOCUMENTS),
        json_values(8).map(encoded),
    )


# Request bodies -------------------------------------------------------------------------------
# Near-valid bodies reach the deep checks; each field is sometimes of a wrong type.


def either(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly `good`, sometimes any JSON value."""
    return st.one_of(good, good, good, json_values(6))


def shaped(
    fixed: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """An object with `fixed` keys and some of `optional`, values maybe of the wrong type, and
    maybe a random extra key."""
    known = st.fixed_dictionaries(
        {k: either(v) for k, v in fixed.items()},
        optional={k: either(v) for k, v in optional.items()},
    )
    return st.tuples(known, st.dictionaries(keys, scalars, max_size=2)).map(
        lambda pair: {**pair[1], **pair[0]}
    )


def _schemas() -> st.SearchStrategy[Any]:
    types = st.one_of(
        st.sampled_from(["string", "object", "array", "null", "integer", "STRING"]),
        st.lists(st.sampled_from(["string", "null", "integer", "array"]), max_size=3),
        scalars,
    )
    return st.recursive(
        st.fixed_dictionaries({}, optional={"type": types, "description": texts}),
        lambda inner: st.fixed_dictionaries(
            {},
            optional={
                "type": types,
                "properties": st.dictionaries(texts, inner, max_size=3),
                "items": st.one_of(inner, st.lists(inner, max_size=2)),
                "additionalProperties": st.one_of(st.booleans(), inner),
                "anyOf": st.lists(inner, max_size=3),
                "oneOf": st.lists(inner, max_size=2),
                "allOf": st.lists(inner, max_size=2),
                "enum": st.lists(scalars, max_size=3),
                "required": st.lists(texts, max_size=2),
            },
        ),
        max_leaves=12,
    )


schemas: Final = _schemas()
_bools = st.booleans()
_models = st.one_of(st.just("m"), texts)
_sampling = {
    "temperature": numbers,
    "top_p": numbers,
    "top_k": numbers,
    "seed": numbers,
    "max_tokens": numbers,
    "stop": st.one_of(texts, st.lists(texts, max_size=3)),
}
_chat_parts = shaped(
    {"type": st.sampled_from(["text", "image_url", "input_image", "image", "video_url"])},
    {"text": texts, "image_url": shaped({"url": texts}, {})},
)
_chat_tools = st.one_of(
    shaped(
        {"type": st.just("function")},
        {"function": shaped({"name": texts}, {"parameters": schemas})},
    ),
    shaped({"type": st.just("function"), "name": texts}, {"parameters": schemas}),
    shaped({"name": texts, "input_schema": schemas}, {}),
)
_chat_messages = shaped(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"])},
    {
        "content": st.one_of(texts, st.none(), st.lists(_chat_parts, max_size=3)),
        "tool_calls": st.lists(json_objects(6), max_size=2),
        "tool_call_id": texts,
    },
)
chat_bodies: Final = shaped(
    {"model": _models, "messages": st.lists(_chat_messages, max_size=4)},
    {
        **_sampling,
        "stream": _bools,
        "stream_options": shaped({"include_usage": _bools}, {}),
        "n": numbers,
        "max_completion_tokens": numbers,
        "tools": st.lists(_chat_tools, max_size=3),
        "tool_choice": json_values(4),
    },
)
completion_bodies: Final = shaped(
    {"model": _models, "prompt": st.one_of(texts, st.lists(texts, max_size=2))},
    {
        **_sampling,
        "stream": _bools,
        "stream_options": shaped({"include_usage": _bools}, {}),
        "best_of": numbers,
        "echo": _bools,
        "suffix": texts,
        "logprobs": numbers,
    },
)
_blocks = shaped(
    {
        "type": st.sampled_from(
            ["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"]
        )
    },
    {
        "text": texts,
        "id": texts,
        "name": texts,
        "input": json_objects(6),
        "tool_use_id": texts,
        "content": st.one_of(texts, st.lists(shaped({"type": st.just("text")}, {"text": texts}))),
        "is_error": _bools,
        "source": shaped(
            {"type": st.sampled_from(["base64", "url"])},
            {"media_type": texts, "data": texts, "url": texts},
        ),
    },
)
messages_bodies: Final = shaped(
    {
        "model": _models,
        "max_tokens": numbers,
        "messages": st.lists(
            shaped(
                {"role": st.sampled_from(["user", "assistant"])},
                {"content": st.one_of(texts, st.lists(_blocks, max_size=4))},
            ),
            max_size=4,
        ),
    },
    {
        **{name: value for name, value in _sampling.items() if name != "max_tokens"},
        "stream": _bools,
        "system": st.one_of(texts, st.lists(shaped({"type": st.just("text")}, {"text": texts}))),
        "stop_sequences": st.lists(texts, max_size=3),
        "tools": st.lists(
            shaped({"name": texts}, {"input_schema": schemas, "type": st.just("custom")}),
            max_size=3,
        ),
        "tool_choice": shaped(
            {"type": st.sampled_from(["auto", "any", "tool", "none"])},
            {"name": texts, "disable_parallel_tool_use": _bools},
        ),
    },
)
_response_parts = shaped(
    {"type": st.sampled_from(["input_text", "output_text", "refusal", "input_image"])},
    {"text": texts, "refusal": texts, "image_url": texts, "detail": texts},
)
_items = shaped(
    {
        "type": st.sampled_from(
            ["message", "function_call", "function_call_output", "reasoning", "web_search"]
        )
    },
    {
        "role": st.sampled_from(["user", "assistant", "system", "developer"]),
        "content": st.one_of(texts, st.lists(_response_parts, max_size=3)),
        "call_id": texts,
        "name": texts,
        "arguments": texts,
        "output": st.one_of(texts, st.lists(_response_parts, max_size=2)),
    },
)
responses_bodies: Final = shaped(
    {"model": _models, "input": st.one_of(texts, st.lists(_items, max_size=4))},
    {
        **_sampling,
        "stream": _bools,
        "instructions": texts,
        "max_output_tokens": numbers,
        "tools": st.lists(
            shaped(
                {"type": st.sampled_from(["function", "web_search"]), "name": texts},
                {"parameters": schemas, "description": texts, "strict": _bools},
            ),
            max_size=3,
        ),
        "tool_choice": st.one_of(
            st.sampled_from(["auto", "none", "required"]),
            shaped({"type": st.just("function")}, {"name": texts}),
        ),
        "parallel_tool_calls": _bools,
        "text": shaped(
            {
                "format": shaped(
                    {"type": st.sampled_from(["text", "json_object", "json_schema"])},
                    {"name": texts, "schema": schemas, "strict": _bools},
                )
            },
            {},
        ),
        "previous_response_id": texts,
        "background": _bools,
    },
)


# Provider chunks ------------------------------------------------------------------------------

_finish = st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))
_tool_call_deltas = shaped(
    {"index": st.integers(0, 3)},
    {
        "id": texts,
        "type": st.just("function"),
        "function": shaped({}, {"name": texts, "arguments": texts}),
    },
)
_deltas = shaped(
    {},
    {
        "role": st.just("assistant"),
        "content": texts,
        "reasoning_content": texts,
        "reasoning": texts,
        "refusal": texts,
        "tool_calls": st.lists(_tool_call_deltas, max_size=2),
    },
)
_usages = shaped(
    {"prompt_tokens": numbers, "completion_tokens": numbers},
    {
        "total_tokens": numbers,
        "completion_tokens_details": shaped({"reasoning_tokens": numbers}, {}),
        "prompt_tokens_details": shaped({"cached_tokens": numbers}, {}),
    },
)
_choices = shaped(
    {"index": st.integers(0, 1)},
    {
        "delta": _deltas,
        "text": texts,
        "finish_reason": _finish,
        "stop_reason": texts,
        "logprobs": st.one_of(st.none(), json_objects(6)),
    },
)
chunk_events: Final = shaped(
    {
        "object": st.sampled_from(["chat.completion.chunk", "text_completion"]),
        "choices": st.lists(_choices, max_size=2),
    },
    {"id": texts, "created": numbers, "model": texts, "usage": st.one_of(st.none(), _usages)},
)


@st.composite
def data_lines(draw: st.DrawFn) -> str:
    """One SSE line as a provider's backend may write it: mostly a chunk, sometimes not."""
    payload = draw(
        st.one_of(
            chunk_events.map(lambda event: encoded(event).decode()),
            chunk_events.map(lambda event: encoded(event).decode().replace(",", ",\n")),
            json_values(6).map(lambda value: encoded(value).decode()),
            st.sampled_from(["[DONE]", " [DONE] ", "", '{"error": {"message": "x"}}']),
            texts,
        )
    )
    prefix = draw(st.sampled_from(["data: ", "data: ", "data:", "event: x", ": comment", ""]))
    return prefix + payload + draw(st.sampled_from(["", "", "\n", "\r\n", "\r"]))
