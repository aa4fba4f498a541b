"""One client's bad requests must not take providers out for everyone, and bad input is
refused at the edge with a clear reason.

Through the real daemon and scripted fake providers over the real protocol: over-long
prompts (refused up front where providers advertise their context, reported by the node as
400 `context_length_exceeded` where they do not), failures nobody classified (the same
failure on providers of different versions is the request's fault), the seed's incident
(old builds crashing on tools still cool down), oversized sealed frames, unbounded numbers
and echoed input.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from protocol.crypto import sealed_request_frame_bytes
from protocol.messages import MAX_FRAME_BYTES, ModelInfo
from tests.consumer_harness import (
    BOUND_S,
    Api,
    OpenApi,
    assert_openai_error,
    chat_body,
    dispatches,
    poll_until,
    tool,
)
from tests.fakes.provider import (
    Fail,
    FakeProvider,
    Stall,
    always,
    answer,
    content_chunk,
    role_chunk,
)

OVERFLOW = Fail(
    400,
    "This model's maximum context length is 2048 tokens. However, you requested 9000 tokens",
    "context_length_exceeded",
)


def _long_prompt(tokens: int) -> list[dict[str, str]]:
    """A prompt the daemon estimates at about `tokens` tokens (four characters each)."""
    return [{"role": "user", "content": "word " * (tokens * 4 // 5)}]


def _cooling(api: Api, fake: FakeProvider, shape: str = "base") -> bool:
    key = (fake.provider_id, "m", shape)
    return api.daemon.supervisor.registry.breaker.in_cooldown(key, trio.current_time())


# Over-long prompts -----------------------------------------------------------------------------


async def test_ten_over_long_prompts_then_a_normal_request_is_served_by_the_same_provider(
    api: Api,
) -> None:
    """The node reports its backend's overflow as 400 context_length_exceeded: no strike."""
    overflow_then_answer = lambda body: (  # noqa: E731
        [OVERFLOW] if len(json.dumps(body)) > 4000 else answer("fine")
    )
    only = (await api.connect(api.fake(overflow_then_answer)))[0]
    for _ in range(10):
        response = await api.chat(messages=_long_prompt(3000))
        error = assert_openai_error(response, 400, "context_length_exceeded")
        assert "maximum context length" in error["message"]
    assert not _cooling(api, only)

    with trio.fail_after(1):  # at once: nothing is cooling, nothing waits
        served = await api.chat()
    assert served.status_code == 200
    assert served.headers["x-provider-id"] == only.provider_id
    assert dispatches(only) == 11


async def test_a_request_longer_than_every_advertised_context_is_refused_up_front(
    api: Api,
) -> None:
    small = [ModelInfo(id="m", context_length=2048)]
    fakes = await api.connect(api.fake(models=small), api.fake(models=small))

    response = await api.chat(messages=_long_prompt(2000), max_tokens=100)

    error = assert_openai_error(response, 400, "context_length_exceeded")
    assert "2048" in error["message"]
    assert dispatches(*fakes) == 0
    # max_tokens counts: a short prompt asking for more than the context is refused too.
    assert (await api.chat(max_tokens=4000)).status_code == 400
    assert (await api.chat(max_tokens=100)).status_code == 200


async def test_a_long_request_goes_to_the_provider_whose_context_fits(api: Api) -> None:
    short = api.fake(models=[ModelInfo(id="m", context_length=1024)])
    long = api.fake(models=[ModelInfo(id="m", context_length=32768)])
    await api.connect(short, long)

    for _ in range(3):
        response = await api.chat(messages=_long_prompt(2000))
        assert response.status_code == 200
        assert response.headers["x-provider-id"] == long.provider_id
    assert dispatches(short) == 0


# Failures nobody classified ---------------------------------------------------------------------


async def test_the_same_failure_on_two_versions_is_the_requests_fault_not_theirs(
    api: Api,
) -> None:
    """A poison request that makes every backend drop the stream: no strike, no third try."""
    poison = always([role_chunk(), Fail(502, "backend reset the connection")])
    a = api.fake(poison, version="0.7.0")
    b = api.fake(poison, version="0.8.0")
    c = api.fake(poison, version="0.9.0")
    await api.connect(a, b, c)

    for _ in range(3):
        response = await api.chat()
        error = assert_openai_error(response, 502)
        assert "the request itself" in error["message"]
    assert dispatches(a, b, c) == 6  # two providers per request, never a third
    assert not any(_cooling(api, fake) for fake in (a, b, c))


async def test_old_builds_that_crash_on_tools_still_cool_down_while_a_new_one_serves(
    api: Api,
) -> None:
    """The seed's incident: 0.6.3 crashes on tool requests; 0.7.0 serves them. Two old
    providers failing alike are one binary's bug, not the request's: they are struck."""
    crash_on_tools = lambda body: (  # noqa: E731
        [Fail(500, "template error")] if body.get("tools") else answer("plain")
    )
    old_a = api.fake(crash_on_tools, version="0.6.3")
    old_b = api.fake(crash_on_tools, version="0.6.3")
    new_behaviour = lambda body: (  # noqa: E731
        answer("with tools") if body.get("tools") else [role_chunk(), content_chunk("x"), Stall()]
    )
    both = [ModelInfo(id="m"), ModelInfo(id="hold")]  # only the new build serves "hold"
    new = api.fake(new_behaviour, version="0.7.0", max_concurrency=1, models=both)
    await api.connect(old_a, old_b, new)
    tools = [tool({"type": "object", "properties": {}})]

    with trio.fail_after(BOUND_S * 2):
        async with api.client.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body(stream=True, model="hold"),
            headers=api.auth,
        ) as held:
            assert held.headers["x-provider-id"] == new.provider_id
            for _ in range(2):  # the new build is busy: only the old ones can be tried
                assert (await api.chat(tools=tools)).status_code == 502
    assert _cooling(api, old_a, "tools") and _cooling(api, old_b, "tools")

    crashes = dispatches(old_a, old_b)
    for _ in range(3):  # cooled down: tool requests go straight to the new build
        response = await api.chat(tools=tools)
        assert response.headers["x-provider-id"] == new.provider_id
    assert dispatches(old_a, old_b) == crashes
    assert not _cooling(api, old_a) and not _cooling(api, old_b)  # plain chat unaffected


# Input that cannot be sent or should not be accepted ------------------------------------------


async def test_a_body_whose_sealed_frame_would_exceed_10_mib_is_413_and_no_provider_sees_it(
    api: Api,
) -> None:
    fake = (await api.connect(api.fake()))[0]
    size = 8 * 1024 * 1024  # under the 16 MiB body limit, over the frame limit once sealed
    assert sealed_request_frame_bytes(size) > MAX_FRAME_BYTES
    body = chat_body(messages=[{"role": "user", "content": "x" * size}])

    with trio.fail_after(BOUND_S * 4):
        response = await api.client.post("/v1/chat/completions", json=body, headers=api.auth)

    error = assert_openai_error(response, 413, "request_too_large")
    assert "10 MiB" in error["message"]
    assert dispatches(fake) == 0
    assert (await api.chat()).status_code == 200  # the provider is still there


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 10**12),
        ("max_completion_tokens", 10**12),
        ("temperature", "1e400"),
        ("temperature", -1),
        ("top_p", 1.5),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("seed", 2**64),
        ("temperature", "hot"),
    ],
)
async def test_out_of_range_numbers_are_400_naming_the_field(
    api: Api, field: str, value: object
) -> None:
    fake = (await api.connect(api.fake()))[0]
    raw = json.dumps(chat_body(**{field: 0})).replace(
        f'"{field}": 0', f'"{field}": {value if value != "hot" else json.dumps(value)}'
    )
    response = await api.post_raw(raw.encode())
    error = assert_openai_error(response, 400, "invalid_request")
    assert error["param"] == field and field in error["message"]
    assert dispatches(fake) == 0


async def test_a_huge_model_name_is_not_echoed_whole(api: Api) -> None:
    await api.connect(api.fake())
    name = "m" * (1024 * 1024)
    response = await api.chat(model=name)
    error = assert_openai_error(response, 404, "model_not_found")
    assert len(error["message"]) < 200
    assert len(response.content) < 1000


# The admission queue -----------------------------------------------------------------------------


async def test_a_full_queue_and_a_queue_timeout_are_two_different_429s(
    open_api: OpenApi, nursery: trio.Nursery
) -> None:
    api = await open_api(queue_max="1", queue_timeout_s="1")
    holder = api.fake(always([role_chunk(), content_chunk("busy"), Stall()]), max_concurrency=1)
    await api.connect(holder)
    queue = api.daemon.supervisor.queue
    waited: list[httpx.Response] = []
    answered = trio.Event()

    async def wait_in_queue() -> None:
        waited.append(await api.chat())
        answered.set()

    with trio.fail_after(BOUND_S):
        async with api.client.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=api.auth
        ) as busy:
            assert busy.status_code == 200  # committed: it holds the only slot
            nursery.start_soon(wait_in_queue)
            await poll_until(lambda: queue.waiting("m") == 1)

            full = await api.chat()
            error = assert_openai_error(full, 429, "queue_full")
            assert "full" in error["message"] and int(full.headers["retry-after"]) >= 1

            await answered.wait()
    error = assert_openai_error(waited[0], 429, "queue_timeout")
    assert "became free" in error["message"]
    assert dispatches(holder) == 1
