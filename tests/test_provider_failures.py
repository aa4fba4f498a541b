"""The status table of PROTOCOL.md §6 and the stream accounting, as pure functions."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from protocol.messages import Usage
from provider.failures import (
    RequestFailure,
    error_message,
    from_backend_error,
    from_backend_status,
    from_error_event,
    from_transport,
)
from provider.stream import StreamAccount

REQUEST = httpx.Request("POST", "http://127.0.0.1:8080/v1/chat/completions")


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        pytest.param(httpx.ConnectError("refused", request=REQUEST), 502, id="refused"),
        pytest.param(httpx.ConnectTimeout("slow", request=REQUEST), 502, id="connect-timeout"),
        pytest.param(httpx.ReadError("reset", request=REQUEST), 502, id="reset"),
        pytest.param(httpx.RemoteProtocolError("cut", request=REQUEST), 502, id="cut"),
        pytest.param(httpx.ReadTimeout("silent", request=REQUEST), 504, id="read-timeout"),
        pytest.param(httpx.WriteTimeout("stuck", request=REQUEST), 504, id="write-timeout"),
        pytest.param(httpx.PoolTimeout("full", request=REQUEST), 503, id="pool-timeout"),
        pytest.param(httpx.UnsupportedProtocol("ftp", request=REQUEST), 500, id="misconfigured"),
    ],
)
def test_transport_errors(exc: httpx.RequestError, status: int) -> None:
    assert from_transport(exc).status_code == status


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, 400),
        (413, 413),
        (415, 415),
        (422, 422),
        (429, 503),
        (503, 503),
        (500, 500),
        (504, 500),
    ],
)
def test_backend_statuses(status: int, expected: int) -> None:
    assert from_backend_status(status, "m").status_code == expected


@pytest.mark.parametrize(
    ("event", "status"),
    [
        pytest.param({"error": {"code": 500, "message": "x"}}, 500, id="llama-server"),
        pytest.param(
            {"error": {"object": "error", "code": 400, "message": "x"}}, 400, id="vllm-400"
        ),
        pytest.param({"error": {"code": 503, "message": "x"}}, 503, id="busy"),
        pytest.param({"error": "plain text"}, 500, id="string-error"),
        pytest.param({"error": {"code": True}}, 500, id="boolean-code"),
    ],
)
def test_error_events(event: dict[str, Any], status: int) -> None:
    assert from_error_event(event).status_code == status


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"error": {"message": "too long"}}, "too long"),
        ({"error": "too long"}, "too long"),
        ({"detail": "too long"}, "too long"),
        ({"message": "too long"}, "too long"),
        ({"error": {}}, None),
        (42, None),
    ],
)
def test_error_messages_in_every_server_shape(document: Any, message: str | None) -> None:
    assert error_message(document) == message


def test_failure_frame_carries_status_message_and_reason() -> None:
    frame = RequestFailure(503, "busy", "at_capacity").frame("r")
    assert (frame.request_id, frame.status_code, frame.error, frame.error_reason) == (
        "r",
        503,
        "busy",
        "at_capacity",
    )


# --- a prompt longer than the model's context: each backend's own answer --------------------------

LLAMA_SERVER_ERROR = {
    "code": 400,
    "message": "request (4476 tokens) exceeds the available context size (4096 tokens), "
    "try increasing it",
    "type": "exceed_context_size_error",
    "n_prompt_tokens": 4476,
    "n_ctx": 4096,
}
LLAMA_CPP_PYTHON_MESSAGE = (
    "This model's maximum context length is 2048 tokens. However, you requested 2310 tokens "
    "(2310 in the messages, None in the completion). "
    "Please reduce the length of the messages or completion."
)
OLLAMA_MESSAGE = "the input length exceeds the context length"


def openai_error(message: str, type_: str, code: Any = None, param: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


OVERFLOWS = [
    pytest.param(400, {"error": LLAMA_SERVER_ERROR}, id="llama-server"),
    pytest.param(
        400,
        {"error": {**LLAMA_SERVER_ERROR, "message": "request (4476 tokens) exceeds context size"}},
        id="llama-server-reworded-message-same-type",
    ),
    pytest.param(
        400,
        {
            "error": {
                "code": 400,
                "message": "the request exceeds the available context size, try increasing it",
                "type": "invalid_request_error",
            }
        },
        id="llama-server-older-400",
    ),
    pytest.param(
        500,
        {
            "error": {
                "code": 500,
                "message": "input is too large to process. increase the physical batch size",
                "type": "server_error",
            }
        },
        id="llama-server-older-batch-500",
    ),
    pytest.param(
        400,
        openai_error(
            LLAMA_CPP_PYTHON_MESSAGE, "invalid_request_error", "context_length_exceeded", "messages"
        ),
        id="llama-cpp-python",
    ),
    pytest.param(
        400,
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens. However, you "
            "requested 5000 tokens (4000 in the messages, 1000 in the completion). Please "
            "reduce the length of the messages or completion.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        id="vllm-0.5-top-level",
    ),
    pytest.param(
        400,
        openai_error(
            "This model's maximum context length is 32768 tokens. However, your request has "
            "40000 input tokens. Please reduce the length of the input messages.",
            "BadRequestError",
            400,
        ),
        id="vllm-input-tokens",
    ),
    pytest.param(
        400,
        openai_error(
            "You passed 5000 input tokens and requested 0 output tokens. However, the model's "
            "context length is only 4096 tokens, resulting in a maximum input length of 4096 "
            "tokens. Please reduce the length of the input prompt.",
            "BadRequestError",
            400,
            "input_tokens",
        ),
        id="vllm-renderer",
    ),
    pytest.param(400, openai_error(OLLAMA_MESSAGE, "invalid_request_error"), id="ollama-openai"),
    pytest.param(500, {"error": OLLAMA_MESSAGE}, id="ollama-native-500"),
    pytest.param(
        400,
        {"error": json.dumps({"error": LLAMA_SERVER_ERROR})},
        id="ollama-relaying-llama-server",
    ),
]


@pytest.mark.parametrize(("status", "document"), OVERFLOWS)
def test_each_backends_context_overflow_is_a_400_with_its_own_message(
    status: int, document: dict[str, Any]
) -> None:
    failure = from_backend_error(status, document)
    assert (failure.status_code, failure.reason) == (400, "context_length_exceeded")
    assert "context" in failure.message or "too large" in failure.message
    assert not failure.message.startswith("{")  # the words, not a JSON dump


NOT_OVERFLOWS = [
    pytest.param(400, openai_error("prompt exceeds the context window", "error", 400), 400),
    pytest.param(400, openai_error("'messages' must be an array", "invalid_request_error"), 400),
    pytest.param(400, openai_error("temperature must be positive", "BadRequestError", 400), 400),
    pytest.param(500, openai_error("model crashed", "server_error", 500), 500),
    # Not a context error however it is worded: the backend is busy.
    pytest.param(503, openai_error(OLLAMA_MESSAGE, "unavailable_error", 503), 503),
    pytest.param(500, {"error": {"message": None, "type": "exceed_context"}}, 500),
]


@pytest.mark.parametrize(("status", "document", "expected"), NOT_OVERFLOWS)
def test_other_errors_keep_their_status(
    status: int, document: dict[str, Any], expected: int
) -> None:
    failure = from_backend_error(status, document)
    assert failure.reason != "context_length_exceeded"
    assert failure.status_code == expected


def test_the_llama_server_mid_stream_error_event_is_a_context_overflow() -> None:
    failure = from_error_event({"error": LLAMA_SERVER_ERROR})
    assert (failure.status_code, failure.message, failure.reason) == (
        400,
        LLAMA_SERVER_ERROR["message"],
        "context_length_exceeded",
    )


def test_an_error_event_without_a_code_can_still_be_a_context_overflow() -> None:
    failure = from_error_event({"error": {"message": OLLAMA_MESSAGE, "type": "api_error"}})
    assert (failure.status_code, failure.reason) == (400, "context_length_exceeded")


def test_the_backend_message_is_bounded() -> None:
    document = openai_error("x" * 10_000, "invalid_request_error", "context_length_exceeded")
    failure = from_backend_error(400, document)
    assert failure.reason == "context_length_exceeded"
    assert len(failure.message) <= 500


# --- the stream account -------------------------------------------------------------------------


def choice(finish_reason: str | None = None, **delta: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def test_a_stream_without_finish_reason_is_a_502() -> None:
    account = StreamAccount(prompt_chars=8)
    account.observe(choice(content="hi"))
    with pytest.raises(RequestFailure) as raised:
        account.outcome()
    assert (raised.value.status_code, raised.value.reason) == (502, "incomplete_stream")


def test_backend_usage_wins_with_its_reasoning_tokens() -> None:
    account = StreamAccount(prompt_chars=8)
    account.observe(choice(content="hi"))
    account.observe(choice(finish_reason="stop"))
    usage = {
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    account.observe({"choices": [], "usage": usage})
    assert account.outcome() == Usage(prompt_tokens=5, completion_tokens=7, reasoning_tokens=3)


def test_estimates_round_up_and_never_report_zero_for_content() -> None:
    account = StreamAccount(prompt_chars=1)
    account.observe(choice(reasoning_content="thinking"))
    account.observe(choice(finish_reason="length"))
    assert account.outcome() == Usage(prompt_tokens=1, completion_tokens=1, estimated=True)
