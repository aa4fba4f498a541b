"""`DINFER_LOG_FORMAT=json`: one JSON object per line for every record, and never a secret.

The formatter is checked alone (what a line holds, what it leaves out), then on a real daemon
whose event logs (a failover, a cooldown, a provider's arrival) are captured as the operator's
log shipper would read them, with the consumer key, the admin key and the provider token in
play: none may appear.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from daemon.log_format import JsonFormatter, configure_logging
from tests.conftest import ADMIN_KEY
from tests.consumer_harness import ADMIN, Api, OpenApi, assert_openai_error, in_turn
from tests.fakes.provider import Fail, always, answer, role_chunk


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("dinfer.api", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_a_line_holds_time_level_logger_message_and_the_request_summary() -> None:
    summary = {"request_id": "r1", "key_id": "key_1", "status": 200, "outcome": "completed"}
    line = JsonFormatter().format(record("served %s", "r1", request=summary))
    parsed = json.loads(line)
    assert "\n" not in line
    assert parsed.pop("timestamp").endswith("+00:00")
    assert parsed == {
        "level": "info",
        "logger": "dinfer.api",
        "message": "served r1",
        "request": summary,
    }


def test_other_extras_are_never_written() -> None:
    line = JsonFormatter().format(record("hello", api_key="sk-secret", request="not a dict"))
    assert "sk-secret" not in line
    assert "request" not in json.loads(line)


def test_an_exception_is_one_field_of_the_same_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = logging.LogRecord(
            "dinfer",
            logging.ERROR,
            __file__,
            1,
            "crashed",
            (),
            exc_info=sys.exc_info(),
        )
    parsed = json.loads(JsonFormatter().format(made))
    assert parsed["level"] == "error" and "ValueError: boom" in parsed["exception"]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Every record of the process, as the daemon's JSON handler writes it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_the_daemons_event_logs_are_json_lines_without_any_secret(
    open_api: OpenApi, json_log: io.StringIO
) -> None:
    api: Api = await open_api(provider_auth="token")
    token_reply = await api.client.post(
        "/v1/admin/provider-tokens", json={"name": "rig"}, headers=ADMIN
    )
    token = token_reply.json()["token"]
    behave = in_turn([role_chunk(), Fail(500)], answer("fine"))
    await api.connect(api.fake(behave, auth_token=token), api.fake(behave, auth_token=token))
    assert (await api.chat()).status_code == 200  # a failover
    sick = api.fake(always([role_chunk(), Fail(500)]), auth_token=token)
    await api.connect(sick)
    for _ in range(3):
        await api.chat()  # a cooldown on the way, wherever these land
    assert_openai_error(await api.chat(model="nobody"), 404)
    await api.client.post(
        "/v1/chat/completions", json={"model": "m"}, headers={"Authorization": "Bearer sk-bad"}
    )

    lines = json_log.getvalue().splitlines()
    assert lines
    for line in lines:
        parsed = json.loads(line)
        assert {"timestamp", "level", "logger", "message"} <= parsed.keys()
        for secret in (api.key, ADMIN_KEY, token, "sk-bad"):
            assert secret not in line
    loggers = {json.loads(line)["logger"] for line in lines}
    assert "dinfer.dispatch" in loggers or "dinfer.session" in loggers


def test_configure_logging_json_writes_json_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("info", "json")
        logging.getLogger("dinfer").info("listening on %s", "127.0.0.1:8000")
        (line,) = capsys.readouterr().err.splitlines()
        assert json.loads(line)["message"] == "listening on 127.0.0.1:8000"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_coredis_connection_retries_are_not_written_at_info(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # With the cluster's Redis down coredis logs every retry at INFO: thousands a minute.
    root, coredis = logging.getLogger(), logging.getLogger("coredis")
    saved = (root.handlers[:], root.level, coredis.level)
    try:
        configure_logging("info", "text")
        coredis.info("Retry attempt 1 due to error: Unable to establish a connection")
        coredis.warning("a real warning")
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and "a real warning" in lines[0]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        coredis.setLevel(saved[2])
