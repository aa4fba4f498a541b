"""SSE data-line parsing and the boilerplate/content/error/done rules of PROTOCOL.md §6."""

from __future__ import annotations

import json
from typing import Any

import pytest

from protocol.sse import ChunkKind, Classified, classify, classify_line, parse_data_line

BOILERPLATE = ChunkKind.BOILERPLATE
CONTENT = ChunkKind.CONTENT
ERROR = ChunkKind.ERROR
DONE = ChunkKind.DONE


def chunk(*deltas: dict[str, Any], finish_reason: str | None = None, **top: Any) -> str:
    """A chat.completion.chunk with one choice per delta, as a backend would send it."""
    choices = [
        {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        for i, delta in enumerate(deltas)
    ]
    event = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1764026918,
        "model": "qwen3-8b",
        "choices": choices,
        **top,
    }
    return json.dumps(event)


def text_chunk(*texts: Any, finish_reason: str | None = None, **top: Any) -> str:
    """A `/v1/completions` chunk with one choice per text (`...`: no `text` key)."""
    logprobs = top.pop("logprobs", None)
    choices = [
        {"index": i, "logprobs": logprobs, "finish_reason": finish_reason}
        | ({} if text is ... else {"text": text})
        for i, text in enumerate(texts)
    ]
    event = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1764026918,
        "model": "qwen3-8b",
        "choices": choices,
        **top,
    }
    return json.dumps(event)


ROLE = {"role": "assistant"}
USAGE = {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12}

CASES = [
    pytest.param(chunk(ROLE), BOILERPLATE, id="role-only"),
    pytest.param(chunk({**ROLE, "content": ""}), BOILERPLATE, id="role-empty-content"),
    pytest.param(chunk({**ROLE, "content": None}), BOILERPLATE, id="role-null-content"),
    pytest.param(
        chunk({**ROLE, "content": "", "reasoning_content": None, "reasoning": ""}),
        BOILERPLATE,
        id="role-empty-reasoning",
    ),
    pytest.param(chunk({**ROLE, "refusal": None}), BOILERPLATE, id="role-null-refusal"),
    pytest.param(chunk({**ROLE, "tool_calls": None}), BOILERPLATE, id="role-null-tool-calls"),
    pytest.param(chunk({**ROLE, "tool_calls": []}), BOILERPLATE, id="role-empty-tool-calls"),
    pytest.param(chunk(ROLE, ROLE), BOILERPLATE, id="every-choice-vacuous"),
    pytest.param(chunk(ROLE, usage=None), BOILERPLATE, id="null-usage"),
    pytest.param(chunk({**ROLE, "content": "Hi"}), CONTENT, id="role-with-content"),
    pytest.param(chunk({**ROLE, "reasoning_content": "Let me"}), CONTENT, id="role-with-reasoning"),
    pytest.param(chunk({**ROLE, "refusal": "No."}), CONTENT, id="role-with-refusal"),
    pytest.param(
        chunk({**ROLE, "tool_calls": [{"index": 0, "id": "call_1", "type": "function"}]}),
        CONTENT,
        id="role-with-tool-call",
    ),
    pytest.param(chunk(ROLE, {"content": "Hi"}), CONTENT, id="one-choice-has-content"),
    pytest.param(chunk({"content": "Hi"}), CONTENT, id="plain-content-delta"),
    pytest.param(chunk({}), CONTENT, id="empty-delta-without-role"),
    pytest.param(chunk({"content": ""}), CONTENT, id="empty-content-without-role"),
    pytest.param(chunk({**ROLE, "audio": None}), CONTENT, id="unknown-delta-key"),
    pytest.param(chunk({**ROLE, "content": 0}), CONTENT, id="non-string-content"),
    pytest.param(chunk(ROLE, finish_reason="stop"), CONTENT, id="finish-reason-set"),
    pytest.param(chunk(ROLE, usage=USAGE), CONTENT, id="usage-present"),
    pytest.param(chunk(usage=USAGE), CONTENT, id="empty-choices-with-usage"),
    pytest.param(chunk(), BOILERPLATE, id="empty-choices-without-usage"),
    pytest.param(
        json.dumps({"object": "chat.completion.chunk", "choices": None}),
        CONTENT,
        id="choices-not-a-list",
    ),
    pytest.param(text_chunk(""), BOILERPLATE, id="text-empty"),
    pytest.param(text_chunk(None), BOILERPLATE, id="text-null"),
    pytest.param(text_chunk(...), BOILERPLATE, id="text-absent"),
    pytest.param(text_chunk("", ""), BOILERPLATE, id="text-every-choice-empty"),
    pytest.param(text_chunk("", usage=None), BOILERPLATE, id="text-null-usage"),
    pytest.param(text_chunk(), BOILERPLATE, id="text-empty-choices-without-usage"),
    pytest.param(text_chunk("Hi"), CONTENT, id="text-with-text"),
    pytest.param(text_chunk("", "Hi"), CONTENT, id="text-one-choice-has-text"),
    pytest.param(text_chunk(" "), CONTENT, id="text-whitespace"),
    pytest.param(text_chunk("", finish_reason="length"), CONTENT, id="text-finish-reason-set"),
    pytest.param(text_chunk("", usage=USAGE), CONTENT, id="text-usage-present"),
    pytest.param(text_chunk(usage=USAGE), CONTENT, id="text-empty-choices-with-usage"),
    pytest.param(
        text_chunk("", logprobs={"tokens": [""], "token_logprobs": [-0.1]}),
        CONTENT,
        id="text-empty-with-logprobs",
    ),
    pytest.param(
        json.dumps({"object": "text_completion", "choices": ["x"]}),
        CONTENT,
        id="text-choice-not-an-object",
    ),
    pytest.param(
        json.dumps({"object": "text_completion", "choices": None}),
        CONTENT,
        id="text-choices-not-a-list",
    ),
    pytest.param(
        json.dumps({"object": ["text_completion"], "choices": []}),
        CONTENT,
        id="unhashable-object",
    ),
    pytest.param(
        json.dumps({"object": "text_completion.chunk", "choices": []}),
        CONTENT,
        id="unknown-object",
    ),
    pytest.param(
        json.dumps({"type": "response.created", "response": {"id": "resp_1"}}),
        BOILERPLATE,
        id="response-created",
    ),
    pytest.param(
        json.dumps({"type": "response.in_progress", "response": {"id": "resp_1"}}),
        BOILERPLATE,
        id="response-in-progress",
    ),
    pytest.param(
        json.dumps({"type": "response.output_text.delta", "delta": "Hi"}),
        CONTENT,
        id="response-text-delta",
    ),
    pytest.param(json.dumps({"type": ["response.created"]}), CONTENT, id="unhashable-type"),
    pytest.param(
        chunk({**ROLE, "content": '{"type": "response.created"}'}),
        CONTENT,
        id="content-mentions-response-created",
    ),
    pytest.param(
        json.dumps({"error": {"message": "context overflow", "code": 500}}),
        ERROR,
        id="top-level-error",
    ),
    pytest.param(chunk(ROLE, error={"message": "boom"}), ERROR, id="error-beside-boilerplate"),
    pytest.param(
        chunk({**ROLE, "content": '{"error": "x"}'}), CONTENT, id="content-mentions-error"
    ),
    pytest.param("[DONE]", DONE, id="done"),
    pytest.param(b"[DONE]", DONE, id="done-bytes"),
    pytest.param("[DONE] \r", DONE, id="done-trailing-whitespace"),
    pytest.param("not json {", CONTENT, id="unparsable"),
    pytest.param("", CONTENT, id="empty-payload"),
    pytest.param('["role"]', CONTENT, id="json-array"),
]


@pytest.mark.parametrize(("payload", "kind"), CASES)
def test_classify_kind(payload: str | bytes, kind: ChunkKind) -> None:
    assert classify(payload).kind is kind


def test_classify_accepts_bytes() -> None:
    payload = chunk({**ROLE, "content": "Hi"})
    assert classify(payload.encode()) == classify(payload)


def test_classify_returns_the_parsed_event() -> None:
    payload = chunk({"content": "Hi"}, usage=USAGE)
    result = classify(payload)
    assert result == Classified(CONTENT, json.loads(payload))
    assert result.event is not None and result.event["usage"]["prompt_tokens"] == 12


@pytest.mark.parametrize("payload", ["[DONE]", "oops", "[1, 2]"], ids=["done", "bad", "array"])
def test_classify_has_no_event_without_a_json_object(payload: str) -> None:
    assert classify(payload).event is None


@pytest.mark.parametrize(
    ("line", "payload"),
    [
        pytest.param('data: {"a":1}', '{"a":1}', id="space"),
        pytest.param('data:{"a":1}', '{"a":1}', id="no-space"),
        pytest.param("data:  two", " two", id="only-one-space-stripped"),
        pytest.param("data: [DONE]\n", "[DONE]", id="lf"),
        pytest.param("data: [DONE]\r\n", "[DONE]", id="crlf"),
        pytest.param("data: x\r", "x", id="cr"),
        pytest.param("data: x\n\n", "x\n", id="only-one-newline-stripped"),
        pytest.param("data:", "", id="empty"),
        pytest.param("data: \n", "", id="empty-with-space"),
        pytest.param("", None, id="blank"),
        pytest.param("\n", None, id="newline"),
        pytest.param(": keep-alive", None, id="comment"),
        pytest.param("event: message", None, id="event-field"),
        pytest.param("id: 7", None, id="id-field"),
        pytest.param(" data: x", None, id="leading-space"),
        pytest.param("DATA: x", None, id="uppercase"),
    ],
)
def test_parse_data_line(line: str, payload: str | None) -> None:
    assert parse_data_line(line) == payload


def test_classify_line_classifies_the_payload() -> None:
    assert classify_line(f"data: {chunk(ROLE)}\n") == Classified(
        BOILERPLATE, json.loads(chunk(ROLE))
    )
    assert classify_line("data: [DONE]\r\n") == Classified(DONE, None)


@pytest.mark.parametrize("line", ["", ": ping", "event: error"], ids=["blank", "comment", "event"])
def test_classify_line_ignores_non_data_lines(line: str) -> None:
    assert classify_line(line) is None


def test_a_chunk_nested_too_deeply_to_parse_is_opaque_content() -> None:
    payload = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
    assert classify(payload).kind is ChunkKind.CONTENT
