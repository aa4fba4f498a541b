"""Defects found by a second reading of dispatch, the chat handler and the provider session.

Each test proves one finding and failed before its fix. Dispatch-level tests run on the
autojump MockClock with in-memory providers, the rest against a real daemon with scripted fake
providers (`tests/dispatch_harness.py`, `tests/consumer_harness.py`).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from trio.testing import MockClock

from daemon.api.serve import serve
from daemon.config import load_settings
from protocol import crypto
from protocol.messages import (
    AttestationChallenge,
    AttestationResponse,
    ModelInfo,
    Register,
    TrustStatus,
    decode_daemon_frame,
    encode,
)
from tests.conftest import FAST_ENV, StartDaemon
from tests.consumer_harness import (
    BOUND_S,
    Api,
    OpenApi,
    RawConnection,
    chat_body,
    create_key,
    in_turn,
)
from tests.dispatch_harness import World, drain
from tests.fakes.provider import (
    Accept,
    Chunk,
    Complete,
    FakeProvider,
    Stall,
    Step,
    Wait,
    always,
    answer,
    content_chunk,
    finish_chunk,
    open_provider_socket,
    role_chunk,
    start_fakes,
)

# Deeper than msgspec's recursion limit: decoding it raises RecursionError, not DecodeError.
DEEP_JSON = "[" * 5000 + "]" * 5000


# Fixed ----------------------------------------------------------------------------------------


async def test_a_repeated_inference_accepted_does_not_postpone_the_first_content_deadline(
    autojump_clock: MockClock, world: World
) -> None:
    # Each `inference_accepted` used to restart the 600 s wait: a provider repeating it
    # could hold a consumer forever without a token and without failing over.
    repeats: list[Step] = [Wait(500), Accept()] * 3
    world.provider([Wait(1), Accept(), *repeats, *answer("never")])

    failed = await world.fails(max_attempts=1)

    assert failed.status == 504
    assert trio.current_time() == 601.0  # 600 s after the first accepted
    await world.assert_nothing_leaked()


def _tool_call_line(call: dict[str, Any]) -> Chunk:
    choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}
    return Chunk("data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]}))


@pytest.mark.parametrize(
    "call",
    [
        {"index": None, "id": "c1", "function": {"name": "f", "arguments": "{}"}},
        {"index": 0, "id": "c1", "function": {"name": "f", "arguments": {"a": 1}}},
        {"index": 0, "id": "c1", "function": "f"},
        {"index": "0", "id": "c1", "function": {"name": 7, "arguments": "{}"}},
    ],
    ids=["null-index", "object-arguments", "string-function", "string-index-int-name"],
)
async def test_a_malformed_tool_call_delta_is_assembled_not_a_500(
    api: Api, call: dict[str, Any]
) -> None:
    script: list[Step] = [
        role_chunk(),
        _tool_call_line(call),
        finish_chunk(reason="tool_calls"),
        Complete(),
    ]
    await api.connect(api.fake(in_turn(script)))

    response = await api.chat()

    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert [tool_call["id"] for tool_call in message["tool_calls"]] == ["c1"]


# Fixed in protocol/ by b12c53d: end to end, a deep nesting is no crash ------------------


async def test_a_chunk_nested_too_deeply_to_parse_is_opaque_content_not_a_crash(
    autojump_clock: MockClock, world: World
) -> None:
    deep = Chunk(f'data: {{"a": {DEEP_JSON}}}')
    world.provider([deep, Complete()])

    drained = await drain(await world.dispatch())

    assert drained.lines == [deep.line]
    await world.assert_nothing_leaked()


async def test_a_frame_nested_too_deeply_is_refused_with_a_reason(
    start_daemon: StartDaemon,
) -> None:
    daemon = await start_daemon()
    async with open_provider_socket(daemon.provider_url) as ws:
        await ws.send_message('{"type": "register", "models": ' + DEEP_JSON + "}")
        with trio.fail_after(BOUND_S):
            verdict = decode_daemon_frame(await ws.get_message())
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
    assert isinstance(verdict, TrustStatus) and verdict.status == "rejected"
    assert closed.value.reason is not None and closed.value.reason.code == 1008


# Open: needs the session's writes decoupled from dispatch ------------------------------------


async def _wedged_provider(url: str, trusted: trio.Event) -> None:
    """A provider that registers, passes its challenge, then never reads its socket again (a
    hung process whose kernel still holds the connection open)."""
    box, identity = crypto.generate_box_key(), crypto.generate_identity_key()
    register = Register(
        protocol=1,
        version="0.7.0",
        backend="hung",
        public_key=crypto.encode_key(box.public_key),
        identity_key=crypto.encode_key(identity.verify_key),
        models=[ModelInfo(id="m")],
        max_concurrency=64,
        decode_tps=1e6,  # ranked first, so it is every request's primary
        prefill_tps=1e9,
    )
    async with open_provider_socket(url, max_message_size=64 * 1024 * 1024) as ws:
        await ws.send_message(encode(register))
        while True:
            match decode_daemon_frame(await ws.get_message()):
                case AttestationChallenge(nonce=nonce, timestamp=timestamp):
                    signature = crypto.sign_challenge(identity, nonce, timestamp)
                    await ws.send_message(encode(AttestationResponse(nonce, signature)))
                case TrustStatus(status="trusted"):
                    break
        trusted.set()
        await trio.sleep_forever()


async def test_a_provider_that_stops_reading_its_socket_cannot_wedge_requests(
    start_daemon: StartDaemon, nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(ttft_base_s="1", ttft_per_token_ms="0.001")
    trusted = trio.Event()
    nursery.start_soon(_wedged_provider, daemon.provider_url, trusted)
    await trusted.wait()
    healthy = FakeProvider(daemon.provider_url, behaviour=lambda _body: answer("backup"))
    await start_fakes(nursery, [healthy])
    async with httpx.AsyncClient(base_url=daemon.base_url, timeout=BOUND_S) as client:
        _, key = await create_key(client)
        # Under the fake's 1 MiB frame limit; a few fill the hung provider's socket buffers.
        body = chat_body(messages=[{"role": "user", "content": "y" * 700_000}])
        for _ in range(8):
            with trio.fail_after(3):  # the backup goes out at 0.5 s and answers at once
                response = await client.post(
                    "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                )
            assert response.json()["choices"][0]["message"]["content"] == "backup"


# Fixed: a watchdog in the chat handler ---------------------------------------------------


async def test_a_consumer_who_stops_reading_frees_the_provider_after_the_inference_timeout(
    open_api: OpenApi,
) -> None:
    api = await open_api(inference_timeout_s="1")
    # More than the loopback socket buffers hold, so the relay's send blocks on the consumer.
    big = "x" * 16384
    script: list[Step] = [role_chunk(), *[content_chunk(big) for _ in range(640)], Stall()]
    fake = api.fake(in_turn(script), max_concurrency=1)
    await api.connect(fake)
    conn = await RawConnection.open(api.daemon.base_url)
    body = json.dumps(chat_body(stream=True)).encode()
    try:
        with trio.fail_after(BOUND_S):
            status = await conn.stream_until(b"xxxx", "/v1/chat/completions", body, api.auth)
        assert status == 200
        with trio.fail_after(3):  # the consumer is still connected, just not reading
            await fake.cancel_seen.wait()
        entry = api.daemon.supervisor.registry.get(fake.provider_id)
        assert entry is not None and entry.in_flight == 0
    finally:
        await conn.aclose()  # a hung-up consumer breaks the blocked send


# Fixed: the shutdown sequence in serve.py -------------------------------------------------


async def test_shutting_down_closes_provider_sessions_with_1001(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    stop = trio.Event()
    env = {**FAST_ENV, "DINFER_DATA_DIR": str(tmp_path / "data")}
    daemon = await nursery.start(
        partial(serve, load_settings(env), shutdown_trigger=stop.wait, seed=7)
    )
    (fake,) = await start_fakes(nursery, [FakeProvider(daemon.provider_url)])

    stop.set()
    with trio.fail_after(10):
        await fake.closed.wait()

    assert (fake.close_code, fake.close_reason) == (1001, "daemon shutting down")


async def test_shutting_down_lets_a_request_in_flight_finish_then_closes_its_provider(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    stop = trio.Event()
    env = {**FAST_ENV, "DINFER_DATA_DIR": str(tmp_path / "data")}
    daemon = await nursery.start(
        partial(serve, load_settings(env), shutdown_trigger=stop.wait, seed=7)
    )
    slow = always([role_chunk(), content_chunk("still"), Wait(1), *answer(" here")])
    (fake,) = await start_fakes(nursery, [FakeProvider(daemon.provider_url, behaviour=slow)])
    async with httpx.AsyncClient(base_url=daemon.base_url, timeout=BOUND_S) as client:
        _, key = await create_key(client)
        auth = {"Authorization": f"Bearer {key}"}
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=auth
        ) as response:
            await fake.request_seen.wait()
            stop.set()
            body = (await response.aread()).decode()
        assert response.status_code == 200
        assert "still" in body and " here" in body and "error" not in body
    with trio.fail_after(10):
        await fake.closed.wait()
    assert fake.close_code == 1001
