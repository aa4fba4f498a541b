"""`POST /v1/messages` (Anthropic Messages) and `/v1/messages/count_tokens`, end to end.

A real daemon on a loopback port, httpx (and hand-driven HTTP/1.1 for the hang-up), and
scripted fake providers speaking the real encrypted protocol. The tests assert what an
Anthropic client sees: the exact event sequence, the `message` object, the error shape, and
the chat body the providers were sent.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from protocol.messages import ModelInfo
from tests.consumer_harness import (
    BOUND_S,
    TOOL_SCRIPT,
    UUID_RE,
    Api,
    OpenApi,
    RawConnection,
    dispatches,
    in_turn,
    usage_chunk,
)
from tests.fakes.provider import (
    Chunk,
    Complete,
    Drop,
    Fail,
    Script,
    Stall,
    Step,
    always,
    answer,
    content_chunk,
    finish_chunk,
    role_chunk,
)

PATH = "/v1/messages"
HELLO = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": ["string", "null"]}},
        "required": ["city"],
    },
}


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": HELLO, **extra}


def headers(api: Api) -> dict[str, str]:
    return {"x-api-key": api.key, "anthropic-version": "2023-06-01"}


async def post(api: Api, payload: Any = None, path: str = PATH, **extra: Any) -> httpx.Response:
    content = payload if isinstance(payload, bytes) else json.dumps(payload or body(**extra))
    with trio.fail_after(BOUND_S):
        return await api.client.post(
            path, content=content, headers={**headers(api), "content-type": "application/json"}
        )


def events_of(response: httpx.Response) -> list[dict[str, Any]]:
    """Each `event: TYPE` / `data: JSON` pair, checking that the two name the same type."""
    assert response.headers["content-type"] == "text/event-stream"
    assert response.text.endswith("\n\n")
    events = []
    for block in response.text.removesuffix("\n\n").split("\n\n"):
        kind, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        events.append(event)
    return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(
        e["delta"]["text"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
    )


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    """The error has Anthropic's shape and type; returns its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["request-id"] == response.headers["x-request-id"]
    assert UUID_RE.match(response.headers["request-id"])
    error = response.json()
    assert set(error) == {"type", "error"} and error["type"] == "error"
    assert set(error["error"]) == {"type", "message"}
    assert error["error"]["type"] == kind
    message: str = error["error"]["message"]
    assert message
    return message


def delta_chunk(delta: dict[str, Any], finish_reason: str | None = None, **choice: Any) -> Chunk:
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, **choice}],
    }
    return Chunk("data: " + json.dumps(event))


def call_chunk(index: int, **call: Any) -> Chunk:
    return delta_chunk({"tool_calls": [{"index": index, **call}]})


def ending(reason: str, prompt: int = 3, completion: int = 2) -> list[Step]:
    return [finish_chunk(reason=reason), Chunk("data: [DONE]"), Complete(prompt, completion)]


# One call, streamed one argument fragment after another, as llama.cpp and vLLM send it.
WEATHER_CALL: Script = [
    role_chunk(),
    content_chunk("Checking."),
    call_chunk(0, id="call_w", type="function", function={"name": "get_weather"}),
    call_chunk(0, function={"arguments": '{"city": '}),
    call_chunk(0, function={"arguments": '"Paris"}'}),
    *ending("tool_calls", 30, 9),
]
THINKING: Script = [
    role_chunk(),
    delta_chunk({"reasoning_content": "The user "}),
    delta_chunk({"reasoning_content": "greets me."}),
    content_chunk("Hello!"),
    *ending("stop", 5, 7),
]


# Streaming ----------------------------------------------------------------------------------


async def test_a_streamed_answer_is_the_exact_anthropic_event_sequence(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await post(api, stream=True)
    assert response.status_code == 200
    events = events_of(response)
    assert types(events) == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    message = events[0]["message"]
    assert message["id"].startswith("msg_") and len(message["id"]) > 10
    assert message == {
        "id": message["id"],
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 4, "output_tokens": 0},  # the daemon's estimate of "hi"
    }
    assert events[2] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert events[3]["delta"] == {"type": "text_delta", "text": "Hello"}
    assert text_of(events) == "Hello world"
    assert events[5] == {"type": "content_block_stop", "index": 0}
    assert events[6] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 3, "output_tokens": 2},  # the provider's own counts
    }
    assert "[DONE]" not in response.text
    assert response.headers["x-provider-id"] == fake.provider_id
    assert response.headers["request-id"] == response.headers["x-request-id"]
    assert {
        part.split(";")[0].strip() for part in response.headers["server-timing"].split(",")
    } == {
        "queue",
        "route",
        "ttft",
    }


async def test_a_non_streaming_answer_is_one_message(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await post(api)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-provider-id"] == fake.provider_id
    assert response.headers["request-id"] == response.headers["x-request-id"]
    message = response.json()
    assert message["id"].startswith("msg_")
    assert message == {
        "id": message["id"],
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": "Hello world"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }


async def test_bearer_auth_works_too(api: Api) -> None:
    await api.connect(api.fake())
    with trio.fail_after(BOUND_S):
        response = await api.client.post(PATH, json=body(), headers=api.auth)
    assert response.status_code == 200
    assert response.json()["content"] == [{"type": "text", "text": "Hello world"}]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_length_stop_is_max_tokens(api: Api, stream: bool) -> None:
    script = [role_chunk(), content_chunk("cut sh"), *ending("length", 3, 64)]
    await api.connect(api.fake(always(script)))
    response = await post(api, stream=stream)
    if stream:
        events = events_of(response)
        assert text_of(events) == "cut sh"
        delta = events[-2]
        assert delta["delta"]["stop_reason"] == "max_tokens"
        assert delta["usage"]["output_tokens"] == 64
    else:
        message = response.json()
        assert (message["stop_reason"], message["usage"]["output_tokens"]) == ("max_tokens", 64)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_matched_stop_sequence_is_named_when_the_backend_says_which(
    api: Api, stream: bool
) -> None:
    """vLLM reports the stop string it matched (`stop_reason`); that becomes stop_sequence."""
    script: Script = [
        role_chunk(),
        content_chunk("one, two"),
        delta_chunk({}, "stop", stop_reason="three"),
        Complete(),
    ]
    fake = (await api.connect(api.fake(always(script))))[0]
    response = await post(api, stream=stream, stop_sequences=["three", "END"])
    stop = events_of(response)[-2]["delta"] if stream else response.json()
    assert (stop["stop_reason"], stop["stop_sequence"]) == ("stop_sequence", "three")
    assert fake.received[0]["body"]["stop"] == ["three", "END"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_reasoning_is_a_thinking_block_before_the_text(api: Api, stream: bool) -> None:
    await api.connect(api.fake(always(THINKING)))
    response = await post(api, stream=stream)
    assert response.status_code == 200
    thinking = {"type": "thinking", "thinking": "The user greets me.", "signature": ""}
    if not stream:
        assert response.json()["content"] == [thinking, {"type": "text", "text": "Hello!"}]
        return
    events = events_of(response)
    assert types(events)[2:9] == [
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
    ]
    assert events[2]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert [e["delta"] for e in events[3:5]] == [
        {"type": "thinking_delta", "thinking": "The user "},
        {"type": "thinking_delta", "thinking": "greets me."},
    ]
    assert (events[6]["index"], events[6]["content_block"]) == (1, {"type": "text", "text": ""})
    assert events[7]["delta"] == {"type": "text_delta", "text": "Hello!"}


async def test_a_usage_only_chunk_adds_no_event(api: Api) -> None:
    script: Script = [
        role_chunk(),
        content_chunk("Hi"),
        finish_chunk(),
        usage_chunk(3, 1),
        Complete(),
    ]
    await api.connect(api.fake(always(script)))
    events = events_of(await post(api, stream=True))
    assert types(events) == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_malformed_chunk_is_skipped_not_a_500(api: Api, stream: bool) -> None:
    odd: Script = [
        role_chunk(),
        Chunk('data: {"object": "chat.completion.chunk", "choices": true}'),
        Chunk("data: not json at all"),
        *answer("fine")[1:],
    ]
    await api.connect(api.fake(always(odd)))
    response = await post(api, stream=stream)
    assert response.status_code == 200, response.text
    if stream:
        assert text_of(events_of(response)) == "fine"
    else:
        assert response.json()["content"] == [{"type": "text", "text": "fine"}]


# Tools --------------------------------------------------------------------------------------


async def test_a_tool_round_trip_streamed(api: Api) -> None:
    """A tool call goes out as a tool_use block; its tool_result comes back as a tool message."""
    fake = (await api.connect(api.fake(in_turn(WEATHER_CALL, answer("It is sunny.")))))[0]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    first = await post(api, stream=True, tools=[WEATHER_TOOL], messages=ask)
    events = events_of(first)
    assert types(events) == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[5] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_w", "name": "get_weather", "input": {}},
    }
    fragments = [e["delta"] for e in events[6:8]]
    assert fragments == [
        {"type": "input_json_delta", "partial_json": '{"city": '},
        {"type": "input_json_delta", "partial_json": '"Paris"}'},
    ]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"] == {"input_tokens": 30, "output_tokens": 9}

    history = [
        *ask,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "call_w",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_w", "content": "sunny, 21 C"}],
        },
    ]
    second = await post(api, stream=True, tools=[WEATHER_TOOL], messages=history)
    assert text_of(events_of(second)) == "It is sunny."
    assert fake.received[1]["body"]["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_w",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_w", "content": "sunny, 21 C", "name": "get_weather"},
    ]


async def test_parallel_tool_calls_assemble_into_one_message(api: Api) -> None:
    """The chat harness's script interleaves two calls' argument fragments."""
    await api.connect(api.fake(always(TOOL_SCRIPT)))
    response = await post(api, tools=[WEATHER_TOOL])
    assert response.status_code == 200, response.text
    message = response.json()
    assert message["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_a", "name": "lookup", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "convert", "input": {"unit": "c"}},
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {"input_tokens": 17, "output_tokens": 4}


async def test_interleaved_tool_fragments_stream_to_their_own_blocks(api: Api) -> None:
    await api.connect(api.fake(always(TOOL_SCRIPT)))
    events = events_of(await post(api, stream=True, tools=[WEATHER_TOOL]))
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"].get("id")) for e in starts] == [
        (0, None),
        (1, "call_a"),
        (2, "call_b"),
    ]
    arguments: dict[int, str] = {}
    for e in events:
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta":
            arguments[e["index"]] = arguments.get(e["index"], "") + e["delta"]["partial_json"]
    assert arguments == {1: '{"city": "Paris"}', 2: '{"unit": "c"}'}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


async def test_the_provider_gets_the_translated_chat_body(api: Api) -> None:
    fake = (await api.connect(api.fake(models=[ModelInfo(id="m", is_vision=True)])))[0]
    request = body(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What are these?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "is_error": True,
                        "content": [{"type": "text", "text": "no such city"}],
                    },
                    {"type": "text", "text": "Try again."},
                ],
            },
        ],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        stop_sequences=["\n\nHuman:"],
        temperature=0.25,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": "u-1"},
    )
    response = await post(api, request)
    assert response.status_code == 200, response.text
    envelope = fake.received[0]
    assert envelope["endpoint"] == "/v1/chat/completions"
    sent = envelope["body"]
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What are these?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "t1",
            "content": "Error: no such city",
            "name": "get_weather",
        },
        {"role": "user", "content": "Try again."},
    ]
    (function,) = sent["tools"]
    assert function["type"] == "function"
    assert function["function"]["name"] == "get_weather"
    assert function["function"]["description"] == "The weather in a city"
    # Repaired like every other home of a tool schema: the nullable array type is gone.
    city = function["function"]["parameters"]["properties"]["city"]
    assert city == {"type": "string", "nullable": True}
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False
    assert sent["stop"] == ["\n\nHuman:"]
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.25, 0.9, 40)
    assert sent["max_tokens"] == 64
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert "metadata" not in sent and "system" not in sent and "stop_sequences" not in sent


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
    ids=["auto", "any", "none", "tool"],
)
async def test_tool_choice_maps_to_chat(api: Api, choice: dict[str, Any], expected: Any) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await post(api, tools=[WEATHER_TOOL], tool_choice=choice)
    assert response.status_code == 200
    sent = fake.received[0]["body"]
    assert sent["tool_choice"] == expected
    assert "parallel_tool_calls" not in sent


# Failover -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize(
    "failure", [[role_chunk(), Fail(500)], [role_chunk(), Drop()]], ids=["500", "drop"]
)
async def test_a_failure_after_the_role_chunk_fails_over_invisibly(
    api: Api, stream: bool, failure: Script
) -> None:
    behave = in_turn(failure, answer("from", " the other one"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await post(api, stream=stream)
    assert response.status_code == 200, response.text
    winner = response.headers["x-provider-id"]
    assert winner in {a.provider_id, b.provider_id}
    assert dispatches(a, b) == 2
    if stream:
        events = events_of(response)
        assert text_of(events) == "from the other one"
        assert types(events).count("message_start") == 1
        assert types(events)[-1] == "message_stop"
        assert "error" not in types(events)
    else:
        assert response.json()["content"] == [{"type": "text", "text": "from the other one"}]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_failure_after_content_is_an_error_event_never_retried(
    api: Api, stream: bool
) -> None:
    committed: Script = [role_chunk(), content_chunk("partial"), Fail(500, "backend crashed")]
    a, b = await api.connect(*(api.fake(in_turn(committed, answer("unused"))) for _ in "ab"))
    response = await post(api, stream=stream)
    if stream:
        assert response.status_code == 200
        events = events_of(response)
        assert text_of(events) == "partial"
        assert types(events)[-2:] == ["content_block_delta", "error"]
        assert events[-1] == {
            "type": "error",
            "error": {"type": "api_error", "message": "backend crashed"},
        }
        assert "[DONE]" not in response.text
    else:
        message = assert_anthropic_error(response, 502, "api_error")
        assert "backend crashed" in message
    assert dispatches(a, b) == 1


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_stall_after_content_is_an_overloaded_error(
    open_api: OpenApi, stream: bool
) -> None:
    api = await open_api(inference_timeout_s="0.3")
    fake = (await api.connect(api.fake(always([role_chunk(), content_chunk("so"), Stall()]))))[0]
    response = await post(api, stream=stream)
    if stream:
        events = events_of(response)
        assert text_of(events) == "so"
        assert events[-1]["type"] == "error"
        assert events[-1]["error"]["type"] == "overloaded_error"
    else:
        assert_anthropic_error(response, 504, "api_error")
    with trio.fail_after(BOUND_S):
        await fake.cancel_seen.wait()


async def test_a_request_fault_from_a_provider_is_a_400_and_not_retried(api: Api) -> None:
    behave = in_turn([Fail(400, "prompt exceeds the context window")], answer("unused"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    message = assert_anthropic_error(await post(api), 400, "invalid_request_error")
    assert "context window" in message
    assert dispatches(a, b) == 1


async def test_a_silent_primary_is_overtaken_by_a_backup(open_api: OpenApi) -> None:
    api = await open_api(ttft_base_s="0.4")
    behave = in_turn([Stall()], answer("from the backup"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await post(api, stream=True)
    assert text_of(events_of(response)) == "from the backup"
    winner = response.headers["x-provider-id"]
    silent = a if winner == b.provider_id else b
    with trio.fail_after(BOUND_S):
        await silent.cancel_seen.wait()
    assert silent.cancels == silent.request_ids
    assert dispatches(a, b) == 2


async def test_a_consumer_hanging_up_cancels_the_provider(api: Api) -> None:
    stalls: Script = [role_chunk(), content_chunk("first words"), Stall()]
    fake = api.fake(in_turn(stalls, answer("next")), max_concurrency=1)
    await api.connect(fake)
    conn = await RawConnection.open(api.daemon.base_url)
    raw = json.dumps(body(stream=True)).encode()
    with trio.fail_after(BOUND_S):
        status = await conn.stream_until(b"first words", PATH, raw, headers(api))
        assert status == 200
        await conn.aclose()
        await fake.cancel_seen.wait()
    assert fake.cancels == fake.request_ids[:1]
    assert (await post(api)).json()["content"] == [{"type": "text", "text": "next"}]


# Gates and errors ---------------------------------------------------------------------------


async def test_tools_on_old_providers_are_refused_at_once_in_anthropic_shape(api: Api) -> None:
    old = await api.connect(api.fake(version="0.5.0"))
    started = trio.current_time()
    response = await post(api, tools=[WEATHER_TOOL])
    assert trio.current_time() - started < 0.5
    message = assert_anthropic_error(response, 503, "overloaded_error")
    assert "0.6.3" in message and "tools" in message
    assert int(response.headers["retry-after"]) >= 1
    assert dispatches(*old) == 0
    assert (await post(api)).status_code == 200  # plain messages still served


async def test_an_image_for_a_text_only_model_is_refused_as_vision(api: Api) -> None:
    text_only = (await api.connect(api.fake()))[0]
    image = {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}
    response = await post(api, messages=[{"role": "user", "content": [image]}])
    assert "image" in assert_anthropic_error(response, 503, "overloaded_error")
    assert dispatches(text_only) == 0


async def test_an_unknown_model_is_a_not_found_error(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    message = assert_anthropic_error(await post(api, model="claude-nope"), 404, "not_found_error")
    assert "claude-nope" in message
    assert fake.received == []


@pytest.mark.parametrize("key", [None, "dk_not-a-key"], ids=["missing", "unknown"])
async def test_a_bad_key_is_an_authentication_error(api: Api, key: str | None) -> None:
    fake = (await api.connect(api.fake()))[0]
    auth = {} if key is None else {"x-api-key": key}
    with trio.fail_after(BOUND_S):
        response = await api.client.post(PATH, json=body(), headers=auth)
    assert_anthropic_error(response, 401, "authentication_error")
    assert fake.received == []


async def test_a_body_over_the_limit_is_request_too_large(open_api: OpenApi) -> None:
    api = await open_api(max_body_bytes="2048")
    await api.connect(api.fake())
    padded = json.dumps(body()).encode() + b" " * 2048
    assert_anthropic_error(await post(api, padded), 413, "request_too_large")


async def test_get_is_refused_in_anthropic_shape(api: Api) -> None:
    with trio.fail_after(BOUND_S):
        response = await api.client.get(PATH, headers=headers(api))
    assert_anthropic_error(response, 405, "invalid_request_error")


def _bad(raw: bytes | dict[str, Any], field: str | None, id_: str) -> Any:
    encoded = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return pytest.param(encoded, field, id=id_)


def _user(*blocks: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(blocks)}]


async def test_a_huge_block_type_is_not_echoed_whole(api: Api) -> None:
    response = await post(api, messages=_user({"type": "x" * 100_000}))
    assert len(assert_anthropic_error(response, 400, "invalid_request_error")) < 200


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        _bad(b"{nope", None, "not-json"),
        _bad(b"[]", None, "not-an-object"),
        _bad({"model": "m", "messages": HELLO}, "max_tokens", "no-max-tokens"),
        _bad(body(max_tokens=0), "max_tokens", "max-tokens-zero"),
        _bad(body(max_tokens="9"), "max_tokens", "max-tokens-string"),
        _bad({"max_tokens": 5, "messages": HELLO}, "model", "no-model"),
        _bad(body(model=""), "model", "model-empty"),
        _bad({"model": "m", "max_tokens": 5}, "messages", "no-messages"),
        _bad(body(messages=[]), "messages", "messages-empty"),
        _bad(body(messages=["hi"]), "messages.0", "message-not-an-object"),
        _bad(body(messages=[{"role": "system", "content": "x"}]), "messages.0.role", "bad-role"),
        _bad(body(messages=[{"role": ["user"], "content": "x"}]), "messages.0.role", "role-list"),
        _bad(body(messages=[{"role": "user", "content": 5}]), "messages.0.content", "bad-content"),
        _bad(body(messages=_user({"text": "x"})), "messages.0.content.0", "block-without-type"),
        _bad(body(messages=_user({"type": "document"})), "messages.0.content.0.type", "document"),
        _bad(
            body(messages=_user({"type": "text", "text": 5})), "messages.0.content.0.text", "text"
        ),
        _bad(
            body(messages=_user({"type": "image", "source": {"type": "file", "file_id": "f"}})),
            "messages.0.content.0.source",
            "image-file-source",
        ),
        _bad(
            body(messages=_user({"type": "image", "source": {"type": "base64", "data": "x"}})),
            "messages.0.content.0.source.media_type",
            "image-without-media-type",
        ),
        _bad(
            body(messages=_user({"type": "tool_use", "id": "t", "name": "n", "input": {}})),
            "messages.0.content.0.type",
            "tool-use-from-the-user",
        ),
        _bad(
            body(messages=_user({"type": "tool_result"})),
            "messages.0.content.0.tool_use_id",
            "tool-result-without-id",
        ),
        _bad(
            body(
                messages=[
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "n", "input": []}],
                    }
                ]
            ),
            "messages.0.content.0.input",
            "tool-input-not-an-object",
        ),
        _bad(body(system=5), "system", "system-not-text"),
        _bad(body(system=[{"type": "image"}]), "system.0", "system-block-not-text"),
        _bad(body(tools={"name": "x"}), "tools", "tools-not-an-array"),
        _bad(body(tools=[{"name": "x"}]), "tools.0.input_schema", "tool-without-schema"),
        _bad(body(tools=[{"input_schema": {}}]), "tools.0.name", "tool-without-name"),
        _bad(
            body(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
            "tools.0.type",
            "server-tool",
        ),
        _bad(body(tools=[WEATHER_TOOL], tool_choice={"type": "some"}), "tool_choice", "choice"),
        _bad(body(tools=[WEATHER_TOOL], tool_choice={"type": "tool"}), "tool_choice.name", "name"),
        _bad(body(temperature=1.5), "temperature", "temperature-above-1"),
        _bad(body(top_p=-0.1), "top_p", "top-p-negative"),
        _bad(body(top_k=-1), "top_k", "top-k-negative"),
        _bad(body(stop_sequences="END"), "stop_sequences", "stop-sequences-not-an-array"),
        _bad(body(stream="yes"), "stream", "stream-not-a-boolean"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(api: Api, raw: bytes, field: str | None) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await post(api, raw)
    message = assert_anthropic_error(response, 400, "invalid_request_error")
    if field is not None:
        assert f"'{field}'" in message
    assert fake.received == []


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "api_error"),
    ],
)
def test_each_status_has_anthropic_s_error_type(status: int, kind: str) -> None:
    from daemon.api.errors import ApiError, anthropic_error

    rendered = json.loads(anthropic_error(ApiError(status, "code", "what went wrong")))
    assert rendered == {"type": "error", "error": {"type": kind, "message": "what went wrong"}}


async def test_a_full_queue_is_a_rate_limit_error_with_retry_after(open_api: OpenApi) -> None:
    api = await open_api(queue_timeout_s="0.2")
    fake = api.fake(in_turn([role_chunk(), content_chunk("busy"), Stall()]), max_concurrency=1)
    await api.connect(fake)
    with trio.fail_after(BOUND_S):
        async with api.client.stream(
            "POST", PATH, json=body(stream=True), headers=headers(api)
        ) as busy:
            assert busy.status_code == 200
            waited = await post(api)
            assert_anthropic_error(waited, 429, "rate_limit_error")
            assert int(waited.headers["retry-after"]) >= 1
    assert dispatches(fake) == 1


# count_tokens -------------------------------------------------------------------------------

COUNT = "/v1/messages/count_tokens"


async def test_count_tokens_is_the_estimate_the_stream_starts_with(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    request = {
        "model": "m",
        "system": "You are a terse assistant.",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    counted = await post(api, request, path=COUNT)
    assert counted.status_code == 200, counted.text
    assert counted.headers["request-id"] == counted.headers["x-request-id"]
    tokens = counted.json()
    assert set(tokens) == {"input_tokens"} and tokens["input_tokens"] > 0
    assert fake.received == []  # counting dispatches nothing

    streamed = events_of(await post(api, {**request, "max_tokens": 8, "stream": True}))
    assert streamed[0]["message"]["usage"]["input_tokens"] == tokens["input_tokens"]


async def test_count_tokens_counts_an_image(api: Api) -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}
    text = {"type": "text", "text": "What is this?"}
    plain = await post(api, {"model": "m", "messages": _user(text)}, path=COUNT)
    pictured = await post(api, {"model": "m", "messages": _user(image, text)}, path=COUNT)
    assert pictured.json()["input_tokens"] > plain.json()["input_tokens"]


async def test_count_tokens_errors_are_in_anthropic_shape(api: Api) -> None:
    with trio.fail_after(BOUND_S):
        denied = await api.client.post(COUNT, json={"model": "m", "messages": HELLO})
    assert_anthropic_error(denied, 401, "authentication_error")
    message = assert_anthropic_error(
        await post(api, {"model": "m", "messages": []}, path=COUNT), 400, "invalid_request_error"
    )
    assert "'messages'" in message
    with trio.fail_after(BOUND_S):
        wrong = await api.client.get(COUNT, headers=headers(api))
    assert_anthropic_error(wrong, 405, "invalid_request_error")
