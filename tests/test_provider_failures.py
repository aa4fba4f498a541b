"""The status table of PROTOCOL.md §6 and the stream accounting, as pure functions."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from protocol.messages import Usage
from provider.failures import (
    RequestFailure,
    error_message,
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
    assert account.outcome() == Usage(prompt_tokens=1, completion_tokens=1)
