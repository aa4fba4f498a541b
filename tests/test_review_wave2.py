"""Defects found by the second outside review, each pinned by what a user would see."""

from __future__ import annotations

import json

import anthropic
import pytest
import trio
from trio.testing import MockClock

from daemon.api.serve import RunningDaemon
from daemon.config import load_settings
from daemon.nursery.attempt import MAX_PROVIDER_TEXT
from daemon.nursery.supervisor import build_registry
from daemon.routing.registry import MAX_REMEMBERED_MODELS, MODEL_MEMORY_S
from daemon.routing.types import RequestTraits
from protocol.messages import MAX_MODELS, ModelInfo
from tests.consumer_harness import BOUND_S, UUID_RE, Api, assert_openai_error, sse_events
from tests.dispatch_harness import World, drain
from tests.fakes.entries import make_entry
from tests.fakes.provider import Chunk, Complete, Fail, Stall, always, answer, role_chunk
from tests.test_provider_sessions import assert_rejected, raw_provider, refused


async def test_two_busy_providers_of_different_versions_do_not_blame_the_request(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    """503 is capacity (PROTOCOL.md §6: try elsewhere): two busy providers prove nothing
    about the request, so the third, free one still answers."""
    world = World(nursery)
    world.provider([Fail(503, "busy")], version="0.6.3")
    world.provider([Fail(503, "busy")], version="0.7.0")
    c = world.provider(answer("third"), version="0.8.0")

    committed = await world.dispatch()
    await drain(committed)

    assert committed.provider_id == c.id and committed.attempts == 3
    await world.assert_nothing_leaked()


# A hostile provider's chunk shapes ----------------------------------------------------------


def _chunk_with_finish(finish_reason: object) -> Chunk:
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": finish_reason}],
    }
    return Chunk("data: " + json.dumps(event))


@pytest.mark.parametrize("finish_reason", [["stop"], {"why": "stop"}, 7])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_non_string_finish_reason_is_ignored_by_the_responses_route(
    api: Api, finish_reason: object, stream: bool
) -> None:
    """A provider's `finish_reason` that is no string used to crash the route (an unhashable
    dict key): a 500 from the server, or a stream cut short with no terminal event."""
    script = [role_chunk(), _chunk_with_finish(finish_reason), Chunk("data: [DONE]"), Complete()]
    await api.connect(api.fake(always(script)))

    with trio.fail_after(BOUND_S):
        response = await api.client.post(
            "/v1/responses", json={"model": "m", "input": "hi", "stream": stream}, headers=api.auth
        )

    assert response.status_code == 200, response.text
    if stream:
        events = sse_events(response.text)
        assert events[-1]["type"] == "response.completed"
        answer = events[-1]["response"]
    else:
        answer = response.json()
    assert answer["status"] == "completed"
    assert answer["output"][0]["content"][0]["text"] == "Hi"


# The model list in Anthropic's shape ----------------------------------------------------------


async def test_the_anthropic_sdk_reads_a_request_id_from_a_model_list_error(api: Api) -> None:
    """Anthropic's SDK names a failed call by the `request-id` header, as on /v1/messages."""
    async with anthropic.AsyncAnthropic(
        base_url=api.daemon.base_url, api_key=api.key, max_retries=0, timeout=BOUND_S
    ) as client:
        with trio.fail_after(BOUND_S), pytest.raises(anthropic.NotFoundError) as missing:
            await client.models.retrieve("nope")
    assert missing.value.request_id is not None
    assert UUID_RE.match(missing.value.request_id)
    assert missing.value.response.headers["x-request-id"] == missing.value.request_id


# What a provider advertises ----------------------------------------------------------------


@pytest.mark.parametrize("field", ["decode_tps", "prefill_tps"])
async def test_a_negative_advertised_speed_is_refused(daemon: RunningDaemon, field: str) -> None:
    """A negative speed made a provider's expected time negative: it won every pick, over
    every honest provider, until its first completed request (PROTOCOL.md §4: a bad register
    is rejected with a reason)."""
    with trio.fail_after(BOUND_S):
        verdict, close = await refused(daemon, lambda p: p.register_fields(**{field: -1.0}))
    assert_rejected(verdict, close, f"$.{field}", ">= 0")
    assert daemon.supervisor.registry.providers() == []


async def test_a_register_with_a_zero_or_a_huge_speed_is_admitted(daemon: RunningDaemon) -> None:
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            await provider.register(decode_tps=1e9, prefill_tps=0.0)
            entry = daemon.supervisor.registry.get(provider.provider_id)
    assert entry is not None and entry.advertised_decode_tps == 1e9


# What a provider says about a failure --------------------------------------------------------


async def test_a_provider_s_error_text_reaches_the_consumer_cut_short(api: Api) -> None:
    """A provider's `error` and `error_reason` are its own strings, up to a 10 MiB frame:
    the consumer gets a bounded message, and a `code` only when the reason is a short
    identifier (never the provider's arbitrary text, as here with a newline in it)."""
    huge = "overflow " * 100_000
    await api.connect(api.fake(always([Fail(400, huge, reason="bad\nreason" * 1000)])))

    response = await api.chat()

    error = assert_openai_error(response, 400, "invalid_request")
    assert error["message"].startswith("overflow overflow")
    assert len(error["message"]) <= MAX_PROVIDER_TEXT + 1


async def test_a_provider_s_short_error_reason_is_the_consumer_s_code(api: Api) -> None:
    await api.connect(api.fake(always([Fail(400, "too long", reason="context_length_exceeded")])))

    response = await api.chat()

    assert_openai_error(response, 400, "context_length_exceeded")


async def test_a_provider_cycling_model_ids_cannot_grow_the_model_memory_without_end(
    autojump_clock: MockClock,
) -> None:
    """Every id a provider ever advertised was remembered forever (for the 10-minute
    "reconnecting" answer): a `models_update` loop through fresh ids grew it without end."""
    reg = build_registry(load_settings({}), seed=1)
    entry = make_entry("p1", ["first"])
    reg.add(entry)
    rounds = MAX_REMEMBERED_MODELS // MAX_MODELS + 2
    for n in range(rounds):
        reg.update_models(entry, [ModelInfo(id=f"m{n}-{i}") for i in range(MAX_MODELS)])
    assert len(reg._model_seen) <= MAX_REMEMBERED_MODELS
    # The longest-unseen id went first; the ones just left still queue for a reconnect.
    assert reg.preflight(RequestTraits(model="first")).verdict == "unknown_model"
    assert reg.preflight(RequestTraits(model=f"m{rounds - 2}-0")).verdict == "queue"

    reg.update_models(entry, [ModelInfo(id="now")])
    await trio.sleep(MODEL_MEMORY_S)
    reg.update_models(entry, [ModelInfo(id="later")])
    # Every id last served 10 minutes ago is gone ("now" was served until this update).
    assert set(reg._model_seen) == {"now", "later"}


# Found by reading, after the review -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        (
            "/v1/messages",
            {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]},
        ),
    ],
    ids=["chat", "messages"],
)
async def test_a_one_object_answer_is_bounded_and_the_provider_released(
    api: Api, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, object]
) -> None:
    """A provider that streams on past max_tokens cannot grow a non-streaming answer without
    end: past the bound the consumer gets a 502 and the provider a cancel."""
    from daemon.api import relay
    from tests.fakes.provider import content_chunk

    monkeypatch.setattr(relay, "MAX_ASSEMBLED_CHARS", 2000)
    endless = [role_chunk(), *(content_chunk("x" * 100) for _ in range(40)), Stall()]
    fake = (await api.connect(api.fake(always(endless))))[0]

    with trio.fail_after(BOUND_S):
        response = await api.client.post(path, json=body, headers=api.auth)
        await fake.cancel_seen.wait()

    assert response.status_code == 502, response.text
    assert "exceeds 2000 characters" in response.text
    assert len(fake.cancels) == 1


async def test_a_superseded_sessions_failing_streams_do_not_cool_its_successor(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    world = World(nursery, DINFER_BREAKER_THRESHOLD="1")
    old = world.provider(
        [role_chunk(), Chunk('data: {"choices":[{"delta":{"content":"a"}}]}'), Stall()]
    )
    committed = await world.dispatch()

    newer = old.session.entry()  # the same identity, reconnected and proven
    assert not world.registry.add(newer)
    assert world.registry.promote(newer) is old.entry
    old.session.kick(4001, "superseded by a newer connection")
    drained = await drain(committed)

    assert drained.error is not None  # the old session's stream failed in-band
    key = (newer.provider_id, "m", "base")
    assert not world.registry.breaker.in_cooldown(key, trio.current_time())
