"""Preparing a decrypted request for the backend: the repairs, and what is left alone."""

from __future__ import annotations

import json
from typing import Any

import pytest

from provider.failures import RequestFailure
from provider.repair import prepare

CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def envelope(body: Any, endpoint: str = "/v1/chat/completions") -> bytes:
    return json.dumps({"endpoint": endpoint, "body": body}).encode()


def test_a_body_needing_no_repair_is_forwarded_byte_for_byte() -> None:
    # Odd spacing and a float with many digits: any re-encoding would change them.
    raw = b'{"model": "m",  "temperature": 0.1000000000000000055511151231257827, "stream": true}'
    plaintext = b'{"endpoint": "/v1/chat/completions", "body": ' + raw + b"}"
    prepared = prepare(plaintext)
    assert prepared.body == raw
    assert (prepared.endpoint, prepared.model) == ("/v1/chat/completions", "m")


def test_assistant_null_content_beside_tool_calls_becomes_empty_string() -> None:
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "assistant", "content": None},  # no tool calls: not the quirk, left alone
        {"role": "user", "content": None},
    ]
    body = json.loads(prepare(envelope({"stream": True, "messages": messages})).body)
    assert [m.get("content", "absent") for m in body["messages"]] == ["", "", None, None]


def test_repair_keeps_every_number_exact() -> None:
    body = {
        "stream": True,
        "seed": 2**63 + 1,
        "top_p": 0.1000000000000000055511151231257827,
        "messages": [{"role": "assistant", "content": None, "tool_calls": [CALL]}],
    }
    text = json.dumps(body).replace("0.1", "0.1000000000000000055511151231257827", 1)
    plaintext = b'{"endpoint": "/v1/chat/completions", "body": ' + text.encode() + b"}"
    out = prepare(plaintext).body
    assert b"0.1000000000000000055511151231257827" in out
    assert str(2**63 + 1).encode() in out


def test_stream_is_forced_on() -> None:
    body = json.loads(prepare(envelope({"model": "m", "stream": False})).body)
    assert body["stream"] is True


def test_tool_schemas_are_normalized() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"properties": {}}}}
    body = json.loads(prepare(envelope({"stream": True, "tools": [tool]})).body)
    assert body["tools"][0]["function"]["parameters"]["type"] == "object"


@pytest.mark.parametrize(
    ("body", "chars"),
    [
        pytest.param({"messages": [{"role": "user", "content": "abcd"}]}, 4, id="string"),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "abc"}, {"type": "image_url"}],
                    }
                ]
            },
            3,
            id="parts",
        ),
        pytest.param({"prompt": "abcdef"}, 6, id="completions"),
        pytest.param({"prompt": ["ab", "cd"]}, 4, id="completions-list"),
    ],
)
def test_prompt_characters_are_counted_for_estimates(body: dict[str, Any], chars: int) -> None:
    assert prepare(envelope({"stream": True, **body})).prompt_chars == chars


@pytest.mark.parametrize(
    "plaintext",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"endpoint": "/v1/chat/completions"}', id="no-body"),
        pytest.param(envelope({}, "/v1/embeddings"), id="unserved-endpoint"),
        pytest.param(envelope("text"), id="body-not-object"),
    ],
)
def test_an_invalid_request_is_a_400(plaintext: bytes) -> None:
    with pytest.raises(RequestFailure) as raised:
        prepare(plaintext)
    assert raised.value.status_code == 400
