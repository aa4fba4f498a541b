"""The official `openai` SDK's Responses API, unmodified, against the real daemon.

Every client validates strictly (`_strict_response_validation=True`): each event and object
the daemon writes must match the SDK's own types, not merely be close enough to construct.
Non-streaming calls use `AsyncOpenAI` under Trio; streaming calls use the synchronous client
in a worker thread, for the reason `test_openai_sdk.py` gives (the async stream leaves its
inner generators unclosed, which Trio reports as a ResourceWarning).
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
import trio
from openai.types.responses import ResponseFunctionToolCall, ResponseInputParam, ToolParam

from tests.conftest import StartDaemon
from tests.consumer_harness import BOUND_S, TOOL_SCRIPT, in_turn
from tests.fakes.provider import (
    Chunk,
    Complete,
    Fail,
    always,
    answer,
    content_chunk,
    finish_chunk,
    role_chunk,
)
from tests.sdk_harness import Sdk, open_sdk

TOOLS: list[ToolParam] = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Look a city up",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": False,
    }
]


@pytest.fixture
async def sdk(start_daemon: StartDaemon, nursery: trio.Nursery) -> Sdk:
    return await open_sdk(start_daemon, nursery, strict=True)


async def test_create_returns_a_response_with_output_text(sdk: Sdk) -> None:
    await sdk.connect(always(answer("Hello", ", ", "world")))
    async with sdk.async_client() as client:
        with trio.fail_after(BOUND_S):
            response = await client.responses.create(
                model="m", input="hi", instructions="Be brief.", max_output_tokens=32
            )
    assert response.id.startswith("resp_")
    assert (response.status, response.model, response.output_text) == (
        "completed",
        "m",
        "Hello, world",
    )
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 2)
    assert response.usage.total_tokens == 5


async def test_create_streams_typed_events(sdk: Sdk) -> None:
    await sdk.connect(always(answer("Hello", " world")))

    def stream(client: openai.OpenAI) -> list[Any]:
        return list(client.responses.create(model="m", input="hi", stream=True))

    events = await sdk.in_thread(stream)
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[-1].response.output_text == "Hello world"


async def test_the_stream_helper_gives_the_final_response(sdk: Sdk) -> None:
    await sdk.connect(always(answer("Hello", " world")))

    def stream(client: openai.OpenAI) -> tuple[list[str], Any]:
        with client.responses.stream(model="m", input="hi") as events:
            snapshots = [e.snapshot for e in events if e.type == "response.output_text.delta"]
            return snapshots, events.get_final_response()

    snapshots, final = await sdk.in_thread(stream)
    assert snapshots == ["Hello", "Hello world"]
    assert final.status == "completed" and final.output_text == "Hello world"


async def test_reasoning_and_a_length_stop_stream_as_typed_events(sdk: Sdk) -> None:
    thinking = '{"choices": [{"index": 0, "delta": {"reasoning_content": "Counting."}}]}'
    script = [
        role_chunk(),
        Chunk("data: " + thinking),
        content_chunk("One, two"),
        finish_chunk(reason="length"),
        Complete(3, 16),
    ]
    await sdk.connect(always(script))

    def stream(client: openai.OpenAI) -> list[Any]:
        return list(client.responses.create(model="m", input="hi", stream=True))

    events = await sdk.in_thread(stream)
    kinds = [event.type for event in events]
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    final = events[-1]
    assert final.type == "response.incomplete"
    assert final.response.incomplete_details.reason == "max_output_tokens"
    reasoning, message = final.response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Counting."
    assert message.type == "message" and message.status == "incomplete"
    assert final.response.output_text == "One, two"


async def test_a_function_call_round_trip(sdk: Sdk) -> None:
    fakes = await sdk.connect(in_turn(TOOL_SCRIPT, answer("Sunny, 21 °C.")))

    def round_trip(client: openai.OpenAI) -> tuple[list[ResponseFunctionToolCall], str]:
        question: ResponseInputParam = [{"role": "user", "content": "Weather in Paris?"}]
        with client.responses.stream(model="m", input=question, tools=TOOLS) as events:
            first = events.get_final_response()
        calls = [item for item in first.output if item.type == "function_call"]
        results: ResponseInputParam = [
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21"}
            for call in calls
        ]
        history: Any = [*question, *first.output, *results]
        second = client.responses.create(model="m", input=history, tools=TOOLS)
        return calls, second.output_text

    calls, answer_text = await sdk.in_thread(round_trip)
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_a", "lookup", '{"city": "Paris"}'),
        ("call_b", "convert", '{"unit": "c"}'),
    ]
    assert answer_text == "Sunny, 21 °C."
    messages = fakes[0].received[1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_a", "call_b"]
    assert messages[2] == {"role": "tool", "tool_call_id": "call_a", "content": "sunny, 21"}


async def test_a_non_streaming_function_call(sdk: Sdk) -> None:
    await sdk.connect(always(TOOL_SCRIPT))
    async with sdk.async_client() as client:
        with trio.fail_after(BOUND_S):
            response = await client.responses.create(
                model="m", input="Weather in Paris?", tools=TOOLS, tool_choice="auto"
            )
    message, *calls = response.output
    assert message.type == "message" and response.output_text == "Let me check."
    assert [(c.type, c.call_id) for c in calls] == [  # type: ignore[union-attr]
        ("function_call", "call_a"),
        ("function_call", "call_b"),
    ]


async def test_a_failure_after_content_is_a_failed_event(sdk: Sdk) -> None:
    await sdk.connect(always([role_chunk(), content_chunk("partial"), Fail(500, "oom")]))

    def stream(client: openai.OpenAI) -> list[Any]:
        return list(client.responses.create(model="m", input="hi", stream=True))

    events = await sdk.in_thread(stream)
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.error.code == "server_error"
    assert failed.response.error.message == "oom"
    assert failed.response.output_text == "partial"

    def final(client: openai.OpenAI) -> Any:
        with client.responses.stream(model="m", input="hi") as events:
            return events.get_final_response()

    # The SDK's helper says plainly that the response never completed.
    with pytest.raises(RuntimeError, match=r"response\.completed"):
        await sdk.in_thread(final)


async def test_refusals_are_the_sdk_s_typed_exceptions(sdk: Sdk) -> None:
    await sdk.connect(always(answer("unused")))
    async with sdk.async_client() as client:
        with pytest.raises(openai.BadRequestError) as hosted:
            await client.responses.create(model="m", input="hi", tools=[{"type": "web_search"}])
        assert (hosted.value.code, hosted.value.param) == ("unsupported_tool", "tools[0].type")
        with pytest.raises(openai.BadRequestError) as stateful:
            await client.responses.create(model="m", input="hi", previous_response_id="resp_1")
        assert stateful.value.param == "previous_response_id"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.create(model="nope", input="hi")
        assert missing.value.code == "model_not_found"
