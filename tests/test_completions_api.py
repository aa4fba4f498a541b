"""`POST /v1/completions` (OpenAI's legacy text completions), end to end.

A real daemon on a loopback port, httpx and the official `openai` SDK as consumers, scripted
fake providers speaking the real encrypted protocol and answering with `text_completion`
chunks, as a backend's own `/v1/completions` does. Each test names what a consumer sees.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
import trio

from protocol.messages import ModelInfo
from tests.consumer_harness import (
    BOUND_S,
    UUID_RE,
    Api,
    OpenApi,
    RawConnection,
    assert_openai_error,
    dispatches,
    in_turn,
    sse_data,
    sse_events,
)
from tests.fakes.provider import (
    Chunk,
    Complete,
    Drop,
    Fail,
    Script,
    Stall,
    always,
)

PATH = "/v1/completions"


def text_chunk(text: str | None, finish_reason: str | None = None, **choice: Any) -> Chunk:
    """One `text_completion` chunk, as llama-server and vLLM stream them."""
    event = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, **choice}
        ],
    }
    return Chunk("data: " + json.dumps(event))


def text_usage_chunk(prompt: int, completion: int) -> Chunk:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    event = {"id": "cmpl-fake", "object": "text_completion", "model": "m", "choices": []}
    total = {"total_tokens": prompt + completion}
    return Chunk("data: " + json.dumps({**event, "usage": {**usage, **total}}))


EMPTY = text_chunk("")  # what some backends send first: boilerplate, it commits nothing


def text_answer(*texts: str, finish_reason: str = "stop") -> Script:
    """A healthy stream: an empty first chunk, the texts, a finish reason, [DONE], complete."""
    return [
        EMPTY,
        *(text_chunk(t) for t in texts),
        text_chunk("", finish_reason),
        Chunk("data: [DONE]"),
        Complete(prompt_tokens=3, completion_tokens=len(texts)),
    ]


def completion_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "Once upon a time", "max_tokens": 16, **extra}


async def complete(api: Api, **extra: Any) -> httpx.Response:
    with trio.fail_after(BOUND_S):
        return await api.client.post(PATH, json=completion_body(**extra), headers=api.auth)


def streamed_text(events: list[dict[str, Any]]) -> str:
    return "".join(
        choice.get("text") or "" for event in events for choice in event.get("choices", ())
    )


def finish_reasons(events: list[dict[str, Any]]) -> list[str]:
    return [
        choice["finish_reason"]
        for event in events
        for choice in event.get("choices", ())
        if choice.get("finish_reason")
    ]


def ends_once_with_done(response: httpx.Response) -> bool:
    data = sse_data(response.text)
    return data.count("[DONE]") == 1 and data[-1] == "[DONE]"


# The answer ---------------------------------------------------------------------------------


async def test_a_stream_relays_the_backend_s_text_completion_chunks(api: Api) -> None:
    fake = (await api.connect(api.fake(always(text_answer("Once", " there", " was")))))[0]
    response = await complete(api, stream=True)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/event-stream"
    assert UUID_RE.match(response.headers["x-request-id"])
    assert response.headers["x-provider-id"] == fake.provider_id
    assert "ttft;dur=" in response.headers["server-timing"]
    events = sse_events(response.text)
    assert {event["object"] for event in events} == {"text_completion"}
    assert streamed_text(events) == "Once there was"
    assert finish_reasons(events) == ["stop"]
    assert ends_once_with_done(response)
    assert not any("usage" in event for event in events)


async def test_one_answer_is_an_assembled_text_completion(api: Api) -> None:
    script = [*text_answer("Once", " there")]
    script.insert(-2, text_usage_chunk(5, 2))
    fake = (await api.connect(api.fake(always(script))))[0]
    response = await complete(api)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-provider-id"] == fake.provider_id
    assert response.json() == {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "text": "Once there", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


async def test_usage_comes_from_inference_complete_without_a_usage_chunk(api: Api) -> None:
    await api.connect(api.fake(always(text_answer("a", "b"))))  # Complete(3, 2), no chunk
    assembled = (await complete(api)).json()
    assert assembled["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    streamed = await complete(api, stream=True, stream_options={"include_usage": True})
    events = sse_events(streamed.text)
    assert events[-1]["object"] == "text_completion" and events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert ends_once_with_done(streamed)


@pytest.mark.parametrize("include_usage", [True, False])
async def test_the_usage_chunk_reaches_only_consumers_who_asked(
    api: Api, include_usage: bool
) -> None:
    script = [*text_answer("Hi")]
    script.insert(-2, text_usage_chunk(7, 1))
    await api.connect(api.fake(always(script)))
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    response = await complete(api, stream=True, **extra)
    usage = [event["usage"] for event in sse_events(response.text) if "usage" in event]
    assert usage == (
        [{"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}] if include_usage else []
    )
    assert streamed_text(sse_events(response.text)) == "Hi"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_length_stop_says_length(api: Api, stream: bool) -> None:
    await api.connect(api.fake(always(text_answer("one", " two", finish_reason="length"))))
    response = await complete(api, stream=stream, max_tokens=2)
    assert response.status_code == 200, response.text
    if stream:
        assert finish_reasons(sse_events(response.text)) == ["length"]
    else:
        assert response.json()["choices"][0]["finish_reason"] == "length"
        assert response.json()["choices"][0]["text"] == "one two"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_thinking_model_s_reasoning_arrives_as_the_text_it_wrote(
    api: Api, stream: bool
) -> None:
    """The legacy API has no reasoning channel: a thinking model's thoughts are part of its
    text, and the daemon neither strips nor moves them."""
    await api.connect(api.fake(always(text_answer("<think>", "2+2 is 4", "</think>", " 4"))))
    response = await complete(api, stream=stream, prompt="2+2=")
    assert response.status_code == 200, response.text
    text = (
        streamed_text(sse_events(response.text))
        if stream
        else response.json()["choices"][0]["text"]
    )
    assert text == "<think>2+2 is 4</think> 4"


async def test_logprobs_of_one_answer_are_concatenated(api: Api) -> None:
    def scored(text: str, logprob: float, finish: str | None = None) -> Chunk:
        logprobs = {
            "tokens": [text],
            "token_logprobs": [logprob],
            "top_logprobs": [{text: logprob}],
            "text_offset": [0],
        }
        return text_chunk(text, finish, logprobs=logprobs)

    script: Script = [scored("A", -0.5), scored("B", -1.0, "stop"), Complete()]
    await api.connect(api.fake(always(script)))
    response = await complete(api, logprobs=1)
    (choice,) = response.json()["choices"]
    assert choice["text"] == "AB"
    assert choice["logprobs"] == {
        "tokens": ["A", "B"],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"A": -0.5}, {"B": -1.0}],
        "text_offset": [0, 0],
    }


async def test_the_provider_gets_a_streaming_completions_body_for_its_backend(api: Api) -> None:
    fake = (await api.connect(api.fake(always(text_answer("x")))))[0]
    extra = {
        "suffix": " the end.",
        "echo": True,
        "logprobs": 2,
        "temperature": 0.25,
        "stop": ["\n"],
    }
    response = await complete(api, prompt=["Once upon a time"], **extra)
    assert response.status_code == 200, response.text
    (envelope,) = fake.received
    assert envelope["endpoint"] == "/v1/completions"
    body = envelope["body"]
    assert body == {
        **completion_body(),
        **extra,
        "prompt": "Once upon a time",  # a list of one string is forwarded as that string
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert "messages" not in body and "tools" not in body


# Failover: invisible before content, in-band after ------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize("failure", [[EMPTY, Fail(500)], [EMPTY, Drop()]], ids=["500", "drop"])
async def test_a_failure_after_an_empty_chunk_fails_over_invisibly(
    api: Api, stream: bool, failure: Script
) -> None:
    behave = in_turn(failure, text_answer("from", " the other one"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await complete(api, stream=stream)
    assert response.status_code == 200, response.text
    winner = response.headers["x-provider-id"]
    loser = a if winner == b.provider_id else b
    assert winner != loser.provider_id and len(loser.received) == 1
    assert dispatches(a, b) == 2
    if stream:
        events = sse_events(response.text)
        assert streamed_text(events) == "from the other one"
        assert finish_reasons(events) == ["stop"]
        assert len(events) == 4  # the winner's own four chunks: nothing of the failed racer
        assert ends_once_with_done(response)
    else:
        assert response.json()["choices"][0]["text"] == "from the other one"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_failure_after_text_is_in_band_and_never_retried(api: Api, stream: bool) -> None:
    committed: Script = [EMPTY, text_chunk("partial"), Fail(500, "backend crashed")]
    behave = in_turn(committed, text_answer("must not be used"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await complete(api, stream=stream)
    if stream:
        assert response.status_code == 200
        events = sse_events(response.text)
        assert streamed_text(events) == "partial"
        assert events[-1] == {"error": {"type": "provider_error", "message": "backend crashed"}}
        assert ends_once_with_done(response)
    else:
        error = assert_openai_error(response, 502, "provider_error")
        assert "backend crashed" in error["message"]
    assert dispatches(a, b) == 1


async def test_a_stall_after_text_ends_in_an_in_band_timeout(open_api: OpenApi) -> None:
    api = await open_api(inference_timeout_s="0.3")
    fake = (await api.connect(api.fake(always([text_chunk("so"), Stall()]))))[0]
    response = await complete(api, stream=True)
    events = sse_events(response.text)
    assert streamed_text(events) == "so"
    assert events[-1]["error"]["type"] == "timeout"
    assert ends_once_with_done(response)
    with trio.fail_after(BOUND_S):
        await fake.cancel_seen.wait()


async def test_a_silent_primary_is_overtaken_by_a_backup(open_api: OpenApi) -> None:
    api = await open_api(ttft_base_s="0.4")
    behave = in_turn([Stall()], text_answer("from the backup"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await complete(api, stream=True)
    assert streamed_text(sse_events(response.text)) == "from the backup"
    winner = response.headers["x-provider-id"]
    silent = a if winner == b.provider_id else b
    with trio.fail_after(BOUND_S):
        await silent.cancel_seen.wait()
    assert silent.cancels == silent.request_ids
    assert dispatches(a, b) == 2


async def test_a_request_fault_from_a_provider_is_returned_not_retried(api: Api) -> None:
    behave = in_turn([Fail(400, "prompt exceeds the context window")], text_answer("unused"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await complete(api)
    error = assert_openai_error(response, 400)
    assert "context window" in error["message"]
    assert dispatches(a, b) == 1


async def test_a_consumer_hanging_up_cancels_the_provider_and_frees_the_slot(api: Api) -> None:
    stalls: Script = [text_chunk("first words"), Stall()]
    fake = api.fake(in_turn(stalls, text_answer("next")), max_concurrency=1)
    await api.connect(fake)
    conn = await RawConnection.open(api.daemon.base_url)
    body = json.dumps(completion_body(stream=True)).encode()
    with trio.fail_after(BOUND_S):
        assert await conn.stream_until(b"first words", PATH, body, api.auth) == 200
        await conn.aclose()
        await fake.cancel_seen.wait()
    assert fake.cancels == fake.request_ids[:1]
    assert (await complete(api)).json()["choices"][0]["text"] == "next"


# Gates and refusals, in OpenAI's error shape -------------------------------------------------


async def test_a_prompt_too_long_for_every_context_is_refused_before_dispatch(api: Api) -> None:
    small = (await api.connect(api.fake(models=[ModelInfo(id="m", context_length=100)])))[0]
    response = await complete(api, prompt="word " * 200, max_tokens=50)
    error = assert_openai_error(response, 400, "context_length_exceeded")
    assert "100 tokens" in error["message"]
    assert dispatches(small) == 0
    assert (await complete(api, prompt="short", max_tokens=50)).status_code == 200


async def test_a_provider_cooling_down_is_skipped_with_a_503_that_says_why(api: Api) -> None:
    sick = (await api.connect(api.fake(always([EMPTY, Fail(500)]))))[0]
    for _ in range(2):
        assert_openai_error(await complete(api), 502, "provider_error")
    skipped = await complete(api)
    error = assert_openai_error(skipped, 503)
    assert "cooling down" in error["message"]
    assert int(skipped.headers["retry-after"]) >= 1
    assert dispatches(sick) == 2


async def test_an_unknown_model_is_404(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    error = assert_openai_error(await complete(api, model="nope"), 404, "model_not_found")
    assert "nope" in error["message"]
    assert fake.received == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer dk_wrong"}, {"x-api-key": "dk_wrong"}],
    ids=["none", "bearer", "x-api-key"],
)
async def test_a_missing_or_unknown_key_is_401(api: Api, headers: dict[str, str]) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await api.client.post(PATH, json=completion_body(), headers=headers)
    assert_openai_error(response, 401, "invalid_api_key")
    assert fake.received == []


async def test_an_x_api_key_is_a_consumer_key_too(api: Api) -> None:
    await api.connect(api.fake(always(text_answer("ok"))))
    response = await api.client.post(PATH, json=completion_body(), headers={"x-api-key": api.key})
    assert response.json()["choices"][0]["text"] == "ok"


async def test_get_is_405(api: Api) -> None:
    assert_openai_error(await api.client.get(PATH, headers=api.auth), 405, "method_not_allowed")


def _bad(raw: bytes | dict[str, Any], param: str | None, id_: str) -> Any:
    encoded = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return pytest.param(encoded, param, id=id_)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        _bad(b"{not json", None, "not-json"),
        _bad(b"[]", None, "array"),
        _bad({"prompt": "hi"}, "model", "no-model"),
        _bad({"model": "m"}, "prompt", "no-prompt"),
        _bad(completion_body(prompt=5), "prompt", "prompt-number"),
        _bad(completion_body(prompt=None), "prompt", "prompt-null"),
        _bad(completion_body(prompt=[]), "prompt", "prompt-empty-list"),
        _bad(completion_body(prompt=[1, 2, 3]), "prompt", "prompt-token-ids"),
        _bad(completion_body(prompt=[[1, 2], [3]]), "prompt", "prompt-token-id-batch"),
        _bad(completion_body(prompt=["a", "b"]), "prompt", "prompt-several-strings"),
        _bad(completion_body(n=2), "n", "n-2"),
        _bad(completion_body(best_of=2), "best_of", "best-of-2"),
        _bad(completion_body(best_of=0), "best_of", "best-of-0"),
        _bad(completion_body(echo="yes"), "echo", "echo-not-bool"),
        _bad(completion_body(suffix=5), "suffix", "suffix-not-string"),
        _bad(completion_body(logprobs=6), "logprobs", "logprobs-too-many"),
        _bad(completion_body(logprobs=-1), "logprobs", "logprobs-negative"),
        _bad(completion_body(logprobs=1.5), "logprobs", "logprobs-fraction"),
        _bad(completion_body(logprobs=True), "logprobs", "logprobs-bool"),
        _bad(completion_body(stream="yes"), "stream", "stream-not-bool"),
        _bad(completion_body(max_tokens=0), "max_tokens", "max-tokens-0"),
        _bad(completion_body(temperature=3), "temperature", "temperature-out-of-range"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(api: Api, raw: bytes, param: str | None) -> None:
    fake = (await api.connect(api.fake()))[0]
    with trio.fail_after(BOUND_S):
        response = await api.client.post(
            PATH, content=raw, headers={**api.auth, "content-type": "application/json"}
        )
    error = assert_openai_error(response, 400, "invalid_request")
    assert error["param"] == param
    if param is not None:
        assert param in error["message"]
    assert fake.received == []


# The official SDK -----------------------------------------------------------------------------


def _sdk(api: Api, client: type[openai.OpenAI] | type[openai.AsyncOpenAI]) -> Any:
    return client(
        base_url=api.daemon.base_url + "/v1", api_key=api.key, max_retries=0, timeout=BOUND_S
    )


async def test_the_sdk_gets_one_completion(api: Api) -> None:
    script = [*text_answer("Once", " there")]
    script.insert(-2, text_usage_chunk(5, 2))
    await api.connect(api.fake(always(script)))
    async with _sdk(api, openai.AsyncOpenAI) as client:
        with trio.fail_after(BOUND_S):
            completion = await client.completions.create(model="m", prompt="Once upon a time")
    assert completion.object == "text_completion"
    (choice,) = completion.choices
    assert (choice.text, choice.finish_reason) == ("Once there", "stop")
    assert completion.usage is not None and completion.usage.completion_tokens == 2


async def test_the_sdk_streams_a_completion_with_usage(api: Api) -> None:
    """The synchronous client in a worker thread: `AsyncStream` leaks its generators under
    Trio (see tests/test_openai_sdk.py)."""
    await api.connect(api.fake(always(text_answer("Once", " there", finish_reason="length"))))

    def stream() -> list[Any]:
        with _sdk(api, openai.OpenAI) as client:
            return list(
                client.completions.create(
                    model="m",
                    prompt="Once upon a time",
                    max_tokens=2,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )

    with trio.fail_after(BOUND_S):
        chunks = await trio.to_thread.run_sync(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Once there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5


async def test_the_sdk_raises_a_failure_after_text_in_the_stream(api: Api) -> None:
    await api.connect(api.fake(always([text_chunk("partial"), Fail(500, "oom")])))
    seen: list[str] = []

    def consume() -> None:
        with _sdk(api, openai.OpenAI) as client:
            for chunk in client.completions.create(model="m", prompt="x", stream=True):
                seen.append(chunk.choices[0].text)

    with pytest.raises(openai.APIError, match="oom"):
        with trio.fail_after(BOUND_S):
            await trio.to_thread.run_sync(consume)
    assert "".join(seen) == "partial"


async def test_the_sdk_s_typed_errors(api: Api) -> None:
    await api.connect(api.fake())
    async with _sdk(api, openai.AsyncOpenAI) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model="m", prompt=["a", "b"])
        assert bad.value.param == "prompt"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.completions.create(model="nope", prompt="x")
        assert missing.value.code == "model_not_found"
