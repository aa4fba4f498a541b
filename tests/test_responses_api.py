"""`POST /v1/responses` end to end: a real daemon, httpx, scripted fake providers.

The providers stream chat-completion chunks, as every provider does; each test names what a
Responses API consumer sees of them: the event sequence of a stream, the one `response` object
otherwise, and the same dispatch guarantees as the chat route (invisible failover, the in-band
failure after content, the hedge, the gates, the 4xx stop) in this route's own shapes.
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
    assert_openai_error,
    dispatches,
    in_turn,
)
from tests.fakes.provider import (
    Chunk,
    Complete,
    Drop,
    Fail,
    Script,
    Stall,
    always,
    answer,
    content_chunk,
    finish_chunk,
    role_chunk,
)

HELLO = [{"role": "user", "content": "hi"}]
TEXT_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 2,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
LOOKUP = {
    "type": "function",
    "name": "lookup",
    "description": "Look a city up",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": ["string", "null"], "description": "optional"}},
    },
}


# Helpers -------------------------------------------------------------------------------------


def request(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "input": "hi", **extra}


async def respond(api: Api, body: dict[str, Any] | None = None, **extra: Any) -> httpx.Response:
    with trio.fail_after(BOUND_S):
        return await api.client.post(
            "/v1/responses", json=body or request(**extra), headers=api.auth
        )


def events_of(response: httpx.Response) -> list[dict[str, Any]]:
    """The stream's events; each names its type twice (`event:` and `data.type`) and they
    are numbered from 0 without gaps."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/event-stream"
    events = []
    for block in response.text.split("\n\n"):
        if not block:
            continue
        (kind, data) = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        events.append(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def deltas(events: list[dict[str, Any]], kind: str = "response.output_text.delta") -> str:
    return "".join(event["delta"] for event in events if event["type"] == kind)


def output_text(response: dict[str, Any]) -> str:
    """What the SDK's `output_text` computes: every `output_text` part of every message."""
    return "".join(
        part["text"]
        for item in response["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


def delta_chunk(finish_reason: str | None = None, **delta: Any) -> Chunk:
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return Chunk("data: " + json.dumps(event))


def usage_chunk(prompt: int, completion: int, reasoning: int = 0) -> Chunk:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    return Chunk("data: " + json.dumps({"id": "x", "choices": [], "usage": usage}))


REASONING_SCRIPT: Script = [
    role_chunk(),
    delta_chunk(reasoning_content="The user "),
    delta_chunk(reasoning="greets me."),  # the field vLLM and Ollama use
    content_chunk("Hello"),
    content_chunk("!"),
    finish_chunk(),
    usage_chunk(5, 9, reasoning=6),
    Chunk("data: [DONE]"),
    Complete(5, 9),
]
LENGTH_SCRIPT: Script = [
    role_chunk(),
    content_chunk("One, two,"),
    content_chunk(" three"),
    finish_chunk(reason="length"),
    Chunk("data: [DONE]"),
    Complete(4, 16),
]


# Answers -------------------------------------------------------------------------------------


async def test_a_stream_is_the_responses_event_sequence(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await respond(api, stream=True)
    events = events_of(response)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        *TEXT_EVENTS,
        "response.completed",
    ]
    assert deltas(events) == "Hello world"
    created, final = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["id"].startswith("resp_") and final["id"] == created["id"]
    assert final["status"] == "completed" and final["model"] == "m"
    assert output_text(final) == "Hello world"
    (message,) = final["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["id"] == events[2]["item"]["id"] == events[3]["item_id"]
    assert events[-2]["item"] == message  # output_item.done carries the finished item
    assert final["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 5,
    }
    assert response.headers["x-provider-id"] == fake.provider_id
    assert UUID_RE.match(response.headers["x-request-id"])
    assert "ttft;dur=" in response.headers["server-timing"]


async def test_a_non_streaming_request_gets_one_response_object(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await respond(api, instructions="Be brief.", temperature=0.5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-provider-id"] == fake.provider_id
    body = response.json()
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert isinstance(body["created_at"], int)
    assert (body["status"], body["model"], output_text(body)) == ("completed", "m", "Hello world")
    assert body["output"][0]["content"] == [
        {"type": "output_text", "text": "Hello world", "annotations": [], "logprobs": []}
    ]
    assert body["usage"]["total_tokens"] == 5
    # The request's settings are stated back, as OpenAI does.
    assert (body["instructions"], body["temperature"], body["tool_choice"]) == (
        "Be brief.",
        0.5,
        "auto",
    )
    assert (body["tools"], body["parallel_tool_calls"], body["error"]) == ([], True, None)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_reasoning_is_a_reasoning_item_before_the_message(api: Api, stream: bool) -> None:
    await api.connect(api.fake(always(REASONING_SCRIPT)))
    response = await respond(api, stream=stream)
    if stream:
        events = events_of(response)
        assert types(events)[2:9] == [
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.content_part.done",
            "response.output_item.done",
        ]
        assert deltas(events, "response.reasoning_text.delta") == "The user greets me."
        assert deltas(events) == "Hello!"
        final = events[-1]["response"]
    else:
        final = response.json()
    reasoning, message = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "The user greets me."}]
    assert message["type"] == "message" and message["status"] == "completed"
    assert output_text(final) == "Hello!"
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 6}
    assert final["usage"]["output_tokens"] == 9


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_length_stop_is_an_incomplete_response(api: Api, stream: bool) -> None:
    fake = (await api.connect(api.fake(always(LENGTH_SCRIPT))))[0]
    response = await respond(api, stream=stream, max_output_tokens=16)
    if stream:
        events = events_of(response)
        assert types(events)[-1] == "response.incomplete"
        assert "response.completed" not in types(events)
        final = events[-1]["response"]
    else:
        final = response.json()
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["max_output_tokens"] == 16
    assert output_text(final) == "One, two, three"
    assert final["output"][0]["status"] == "incomplete"
    assert final["usage"]["output_tokens"] == 16
    assert fake.received[0]["body"]["max_tokens"] == 16


async def test_an_answer_without_content_is_an_empty_completed_response(api: Api) -> None:
    await api.connect(api.fake(always([role_chunk(), Complete(4, 0)])))
    events = events_of(await respond(api, stream=True))
    assert types(events) == ["response.created", "response.in_progress", "response.completed"]
    final = events[-1]["response"]
    assert (final["output"], final["usage"]["input_tokens"]) == ([], 4)


# Tools --------------------------------------------------------------------------------------


async def test_a_streamed_tool_call_is_a_function_call_item(api: Api) -> None:
    fake = (await api.connect(api.fake(always(TOOL_SCRIPT))))[0]
    response = await respond(api, stream=True, tools=[LOOKUP], tool_choice="required")
    events = events_of(response)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    lookup, convert = events[8]["item"], events[9]["item"]
    assert (lookup["call_id"], lookup["name"], lookup["arguments"]) == ("call_a", "lookup", "")
    assert (events[8]["output_index"], events[9]["output_index"]) == (1, 2)
    assert (convert["call_id"], convert["name"]) == ("call_b", "convert")
    assert [event["output_index"] for event in events[10:13]] == [1, 2, 1]
    assert events[13]["arguments"] == '{"city": "Paris"}'
    final = events[-1]["response"]
    message, *calls = final["output"]
    assert message["type"] == "message" and output_text(final) == "Let me check."
    assert [(c["type"], c["call_id"], c["name"], c["arguments"]) for c in calls] == [
        ("function_call", "call_a", "lookup", '{"city": "Paris"}'),
        ("function_call", "call_b", "convert", '{"unit": "c"}'),
    ]
    assert all(c["status"] == "completed" and c["id"].startswith("fc_") for c in calls)
    assert final["tools"] == [LOOKUP] and final["tool_choice"] == "required"
    sent = fake.received[0]["body"]
    assert sent["tool_choice"] == "required"


async def test_tools_are_sent_as_repaired_chat_tools(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    choice = {"type": "function", "name": "lookup"}
    response = await respond(api, tools=[{**LOOKUP, "strict": False}], tool_choice=choice)
    assert response.status_code == 200, response.text
    body = fake.received[0]["body"]
    (tool,) = body["tools"]
    assert tool["type"] == "function"
    assert tool["function"]["name"] == "lookup"
    assert tool["function"]["description"] == "Look a city up"
    assert tool["function"]["strict"] is False
    # The chat route's tool-schema repair: the nullable type list a Gemma template crashes on.
    city = tool["function"]["parameters"]["properties"]["city"]
    assert city == {"type": "string", "nullable": True, "description": "optional"}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}


async def test_a_tool_result_goes_back_as_a_chat_tool_turn(api: Api) -> None:
    behave = in_turn(TOOL_SCRIPT, answer("It is sunny in Paris."))
    fake = (await api.connect(api.fake(behave)))[0]
    question = {"role": "user", "content": "Weather in Paris, in celsius?"}
    first = await respond(api, input=[question], tools=[LOOKUP])
    output = first.json()["output"]

    results = [
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny, 21"},
        {"type": "function_call_output", "call_id": "call_b", "output": "celsius"},
    ]
    second = await respond(api, input=[question, *output, *results], tools=[LOOKUP])
    assert output_text(second.json()) == "It is sunny in Paris."
    messages = fake.received[1]["body"]["messages"]
    assert messages == [
        question,
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "convert", "arguments": '{"unit": "c"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny, 21"},
        {"role": "tool", "tool_call_id": "call_b", "content": "celsius"},
    ]


async def test_a_call_without_a_preceding_message_is_its_own_assistant_turn(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    call = {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"}
    result = {"type": "function_call_output", "call_id": "c1", "output": "ok"}
    response = await respond(api, input=[*HELLO, call, result], tools=[LOOKUP])
    assert response.status_code == 200, response.text
    assert fake.received[0]["body"]["messages"][1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]


# The request a provider gets ---------------------------------------------------------------


async def test_the_provider_gets_the_equivalent_chat_request(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    image = "data:image/png;base64,iVBORw0KGgo="
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    body = request(
        instructions="You are terse.",
        input=[
            {"type": "message", "role": "developer", "content": "Answer in French."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Bonjour", "annotations": []}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "And this?"},
                    {"type": "input_image", "image_url": image, "detail": "low"},
                ],
            },
        ],
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
        temperature=0.25,
        top_p=0.9,
        stop=["\n\n"],
        max_output_tokens=64,
        store=True,
        metadata={"x": "y"},
    )
    vision = api.fake(models=[ModelInfo(id="m", is_vision=True)])
    await api.connect(vision)
    response = await respond(api, body)
    assert response.status_code == 200, response.text
    assert dispatches(fake) == 0  # the image part made it a vision request
    sent = vision.received[0]
    assert sent["endpoint"] == "/v1/chat/completions"
    assert sent["body"] == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And this?"},
                    {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
                ],
            },
        ],
        "temperature": 0.25,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "max_tokens": 64,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema},
        },
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_json_object_format_is_a_chat_response_format(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await respond(api, text={"format": {"type": "json_object"}})
    assert response.status_code == 200, response.text
    assert fake.received[0]["body"]["response_format"] == {"type": "json_object"}
    assert response.json()["text"] == {"format": {"type": "json_object"}}


# Bad input: a 400 in OpenAI's shape naming the field ------------------------------------------


def _bad(body: dict[str, Any] | bytes, param: str | None, code: str, id_: str) -> Any:
    return pytest.param(body, param, code, id=id_)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        _bad(b"{oops", None, "invalid_request", "not-json"),
        _bad(b"[]", None, "invalid_request", "not-an-object"),
        _bad({"model": "m"}, "input", "invalid_request", "no-input"),
        _bad({"input": "hi"}, "model", "invalid_request", "no-model"),
        _bad(request(input=[]), "input", "invalid_request", "input-empty"),
        _bad(request(input=5), "input", "invalid_request", "input-a-number"),
        _bad(request(input=[7]), "input[0]", "invalid_request", "item-not-an-object"),
        _bad(
            request(input=[{"type": "web_search_call", "id": "ws_1"}]),
            "input[0].type",
            "invalid_request",
            "unsupported-item",
        ),
        _bad(
            request(input=[{"type": "reasoning", "summary": []}]),
            "input",
            "invalid_request",
            "only-reasoning",
        ),
        _bad(
            request(input=[{"role": "tool", "content": "x"}]),
            "input[0].role",
            "invalid_request",
            "unknown-role",
        ),
        _bad(
            request(input=[{"role": {}, "content": "x"}]),
            "input[0].role",
            "invalid_request",
            "role-an-object",
        ),
        _bad(
            request(input=[{"role": "user", "content": [{"type": "input_file"}]}]),
            "input[0].content[0].type",
            "invalid_request",
            "file-part",
        ),
        _bad(
            request(input=[{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]),
            "input[0].content[0].image_url",
            "invalid_request",
            "image-by-file-id",
        ),
        _bad(
            request(input=[{"type": "function_call_output", "output": "x"}]),
            "input[0].call_id",
            "invalid_request",
            "output-without-call-id",
        ),
        _bad(
            request(input=[{"type": "function_call", "call_id": "c", "arguments": "{}"}]),
            "input[0].name",
            "invalid_request",
            "call-without-name",
        ),
        _bad(request(instructions=["x"]), "instructions", "invalid_request", "instructions-list"),
        _bad(
            request(tools=[{"type": "web_search"}]),
            "tools[0].type",
            "unsupported_tool",
            "web-search",
        ),
        _bad(
            request(tools=[LOOKUP, {"type": "mcp", "server_label": "x"}]),
            "tools[1].type",
            "unsupported_tool",
            "mcp",
        ),
        _bad(
            request(tools=[{"type": "function", "function": {"name": "lookup"}}]),
            "tools[0].name",
            "invalid_request",
            "chat-shaped-tool",
        ),
        _bad(request(tool_choice="always"), "tool_choice", "invalid_request", "tool-choice"),
        _bad(
            request(tool_choice={"type": "file_search"}),
            "tool_choice",
            "invalid_request",
            "hosted-tool-choice",
        ),
        _bad(
            request(text={"format": {"type": "xml"}}),
            "text.format.type",
            "invalid_request",
            "text-format",
        ),
        _bad(
            request(text={"format": {"type": "json_schema", "name": "x"}}),
            "text.format.schema",
            "invalid_request",
            "json-schema-without-schema",
        ),
        _bad(request(max_output_tokens=0), "max_output_tokens", "invalid_request", "max-0"),
        _bad(request(max_output_tokens="9"), "max_output_tokens", "invalid_request", "max-str"),
        _bad(request(temperature=3), "temperature", "invalid_request", "temperature-3"),
        _bad(request(stream="yes"), "stream", "invalid_request", "stream-not-bool"),
        _bad(
            request(previous_response_id="resp_1"),
            "previous_response_id",
            "invalid_request",
            "previous-response",
        ),
        _bad(request(conversation="conv_1"), "conversation", "invalid_request", "conversation"),
        _bad(request(background=True), "background", "invalid_request", "background"),
    ],
)
async def test_bad_input_is_400_naming_what_is_wrong(
    api: Api, body: dict[str, Any] | bytes, param: str | None, code: str
) -> None:
    fake = (await api.connect(api.fake()))[0]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with trio.fail_after(BOUND_S):
        response = await api.client.post(
            "/v1/responses",
            content=content,
            headers={**api.auth, "content-type": "application/json"},
        )
    error = assert_openai_error(response, 400, code)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if param is not None:
        assert param.removesuffix(".type") in error["message"]
    assert fake.received == []


@pytest.mark.parametrize(
    "kind", ["web_search", "file_search", "code_interpreter", "computer_use_preview", "mcp"]
)
async def test_a_hosted_tool_is_refused_by_name(api: Api, kind: str) -> None:
    error = assert_openai_error(await respond(api, tools=[{"type": kind}]), 400, "unsupported_tool")
    assert f"'{kind}'" in error["message"] and "function tools" in error["message"]


async def test_an_unsupported_input_item_is_refused_by_type(api: Api) -> None:
    item = {"type": "computer_call_output", "call_id": "c", "output": {}}
    error = assert_openai_error(await respond(api, input=[*HELLO, item]), 400)
    assert "'computer_call_output'" in error["message"]
    assert error["param"] == "input[1].type"


async def test_previous_response_id_says_to_send_the_whole_input(api: Api) -> None:
    response = await respond(api, previous_response_id="resp_abc")
    error = assert_openai_error(response, 400)
    assert "whole conversation" in error["message"]


async def test_a_missing_key_is_401_in_openai_shape(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    response = await api.client.post("/v1/responses", json=request())
    assert_openai_error(response, 401, "invalid_api_key")
    assert fake.received == []


# Dispatch guarantees ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize(
    "failure", [[role_chunk(), Fail(500)], [role_chunk(), Drop()]], ids=["500", "drop"]
)
async def test_a_failure_after_the_role_chunk_fails_over_invisibly(
    api: Api, stream: bool, failure: Script
) -> None:
    behave = in_turn(failure, answer("from", " the other one"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await respond(api, stream=stream)
    assert response.status_code == 200, response.text
    assert dispatches(a, b) == 2
    if stream:
        events = events_of(response)
        assert types(events)[:2] == ["response.created", "response.in_progress"]
        assert types(events).count("response.created") == 1
        assert types(events)[-1] == "response.completed"
        final = events[-1]["response"]
    else:
        final = response.json()
    assert output_text(final) == "from the other one"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_failure_after_content_is_response_failed_and_never_retried(
    api: Api, stream: bool
) -> None:
    committed: Script = [role_chunk(), content_chunk("partial"), Fail(500, "backend crashed")]
    behave = in_turn(committed, answer("must not be used"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await respond(api, stream=stream)
    if stream:
        events = events_of(response)
        assert types(events) == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.failed",
        ]
        failed = events[-1]["response"]
        assert failed["status"] == "failed"
        assert failed["error"] == {
            "code": "server_error",
            "type": "provider_error",
            "message": "backend crashed",
        }
        assert output_text(failed) == "partial"
        assert failed["output"][0]["status"] == "incomplete"
    else:
        error = assert_openai_error(response, 502, "provider_error")
        assert "backend crashed" in error["message"]
    assert dispatches(a, b) == 1  # the healthy provider never saw the request


async def test_a_stall_after_content_fails_the_response_with_a_timeout(open_api: OpenApi) -> None:
    api = await open_api(inference_timeout_s="0.3")
    fake = (await api.connect(api.fake(always([role_chunk(), content_chunk("so"), Stall()]))))[0]
    events = events_of(await respond(api, stream=True))
    assert types(events)[-1] == "response.failed"
    assert events[-1]["response"]["error"]["type"] == "timeout"
    with trio.fail_after(BOUND_S):
        await fake.cancel_seen.wait()


async def test_a_silent_primary_is_overtaken_by_a_backup(open_api: OpenApi) -> None:
    api = await open_api(ttft_base_s="0.4")
    behave = in_turn([Stall()], answer("from the backup"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    response = await respond(api, stream=True)
    events = events_of(response)
    assert deltas(events) == "from the backup"
    assert types(events)[-1] == "response.completed"
    winner = response.headers["x-provider-id"]
    silent = a if winner == b.provider_id else b
    with trio.fail_after(BOUND_S):
        await silent.cancel_seen.wait()
    assert silent.cancels == silent.request_ids
    assert dispatches(a, b) == 2


async def test_tools_on_old_providers_is_503_at_once_naming_the_floor(api: Api) -> None:
    old = await api.connect(api.fake(version="0.5.0"))
    started = trio.current_time()
    response = await respond(api, tools=[LOOKUP])
    assert trio.current_time() - started < 0.5
    error = assert_openai_error(response, 503)
    assert "0.6.3" in error["message"] and "tools" in error["message"]
    assert int(response.headers["retry-after"]) >= 1
    assert dispatches(*old) == 0
    assert (await respond(api)).status_code == 200  # plain answers still go to them


async def test_an_image_for_a_text_only_model_is_503_at_once(api: Api) -> None:
    text_only = (await api.connect(api.fake()))[0]
    image = {"type": "input_image", "image_url": "https://example.com/cat.png"}
    response = await respond(api, input=[{"role": "user", "content": [image]}])
    error = assert_openai_error(response, 503)
    assert "image" in error["message"]
    assert dispatches(text_only) == 0


async def test_a_request_fault_from_a_provider_is_not_retried(api: Api) -> None:
    behave = in_turn([Fail(400, "prompt exceeds the context window")], answer("unused"))
    a, b = await api.connect(api.fake(behave), api.fake(behave))
    error = assert_openai_error(await respond(api, stream=True), 400)
    assert "context window" in error["message"]
    assert dispatches(a, b) == 1


async def test_an_unknown_model_is_404(api: Api) -> None:
    fake = (await api.connect(api.fake()))[0]
    error = assert_openai_error(await respond(api, model="nope"), 404, "model_not_found")
    assert "nope" in error["message"]
    assert fake.received == []


async def test_a_consumer_hanging_up_cancels_the_provider(api: Api) -> None:
    stalls: Script = [role_chunk(), content_chunk("first words"), Stall()]
    fake = api.fake(in_turn(stalls, answer("next")), max_concurrency=1)
    await api.connect(fake)
    conn = await RawConnection.open(api.daemon.base_url)
    body = json.dumps(request(stream=True)).encode()
    with trio.fail_after(BOUND_S):
        status = await conn.stream_until(b"first words", "/v1/responses", body, api.auth)
        assert status == 200
        await conn.aclose()
        await fake.cancel_seen.wait()
    assert fake.cancels == fake.request_ids[:1]
    assert output_text((await respond(api)).json()) == "next"  # the slot is free again
