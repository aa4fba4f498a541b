"""The official `anthropic` Python SDK, unmodified, against the real daemon and fake providers.

Non-streaming calls use `AsyncAnthropic` under Trio. Streaming uses the synchronous client in
a worker thread, for the reason `test_openai_sdk` gives: an async stream abandoned at its end
leaves async generators for the garbage collector, which Trio reports as a ResourceWarning.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anthropic
import httpx
import pytest
import trio
from anthropic.types import MessageParam, ToolParam

from daemon.api.serve import RunningDaemon
from tests.conftest import StartDaemon
from tests.consumer_harness import BOUND_S, DISPATCH_ENV, create_key, in_turn
from tests.fakes.provider import (
    Behaviour,
    Chunk,
    Complete,
    Fail,
    FakeProvider,
    Script,
    always,
    answer,
    content_chunk,
    finish_chunk,
    role_chunk,
)

T = TypeVar("T")
HELLO: list[MessageParam] = [{"role": "user", "content": "hi"}]
WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def _call_chunk(**call: Any) -> Chunk:
    delta = {"tool_calls": [{"index": 0, **call}]}
    event = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta}],
    }
    return Chunk("data: " + json.dumps(event))


WEATHER_CALL: Script = [
    role_chunk(),
    _call_chunk(id="call_w", type="function", function={"name": "get_weather"}),
    _call_chunk(function={"arguments": '{"city": "Paris"}'}),
    finish_chunk(reason="tool_calls"),
    Complete(prompt_tokens=30, completion_tokens=9),
]


@dataclass
class Sdk:
    daemon: RunningDaemon
    key: str
    nursery: trio.Nursery

    async def connect(self, *behaviours: Behaviour) -> list[FakeProvider]:
        fakes = [FakeProvider(self.daemon.provider_url, behaviour=b) for b in behaviours]
        return [await self.nursery.start(fake.run) for fake in fakes]

    def async_client(self, key: str | None = None) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            base_url=self.daemon.base_url, api_key=key or self.key, max_retries=0, timeout=BOUND_S
        )

    async def in_thread(self, call: Callable[[anthropic.Anthropic], T]) -> T:
        """Run `call` with a synchronous client in a worker thread."""

        def run() -> T:
            with anthropic.Anthropic(
                base_url=self.daemon.base_url, api_key=self.key, max_retries=0, timeout=BOUND_S
            ) as client:
                return call(client)

        with trio.fail_after(BOUND_S):
            return await trio.to_thread.run_sync(run)


@pytest.fixture
async def sdk(start_daemon: StartDaemon, nursery: trio.Nursery) -> Sdk:
    daemon = await start_daemon(**DISPATCH_ENV)
    async with httpx.AsyncClient(base_url=daemon.base_url, timeout=BOUND_S) as client:
        _, key = await create_key(client, "anthropic-sdk")
    return Sdk(daemon, key, nursery)


async def test_messages_create(sdk: Sdk) -> None:
    await sdk.connect(always(answer("Hello", " world")))
    async with sdk.async_client() as client:
        with trio.fail_after(BOUND_S):
            message = await client.messages.create(model="m", max_tokens=32, messages=HELLO)
    assert message.id.startswith("msg_")
    assert message.role == "assistant" and message.model == "m"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hello world"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 2)
    assert message._request_id is not None


async def test_messages_stream_and_its_final_message(sdk: Sdk) -> None:
    await sdk.connect(always(answer("Hello", ", ", "world")))

    def stream(client: anthropic.Anthropic) -> tuple[list[str], anthropic.types.Message]:
        with client.messages.stream(model="m", max_tokens=32, messages=HELLO) as events:
            texts = list(events.text_stream)
            return texts, events.get_final_message()

    texts, final = await sdk.in_thread(stream)
    assert texts == ["Hello", ", ", "world"]
    assert [block.type for block in final.content] == ["text"]
    assert final.content[0].text == "Hello, world"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 2)


async def test_a_tool_use_round_trip(sdk: Sdk) -> None:
    (fake,) = await sdk.connect(in_turn(WEATHER_CALL, answer("Sunny in Paris.")))
    ask: list[MessageParam] = [{"role": "user", "content": "Weather in Paris?"}]

    def first(client: anthropic.Anthropic) -> anthropic.types.Message:
        with client.messages.stream(model="m", max_tokens=64, messages=ask, tools=[WEATHER]) as s:
            return s.get_final_message()

    call = await sdk.in_thread(first)
    assert call.stop_reason == "tool_use"
    (tool_use,) = call.content
    assert tool_use.type == "tool_use"
    assert (tool_use.id, tool_use.name, tool_use.input) == (
        "call_w",
        "get_weather",
        {"city": "Paris"},
    )

    history: list[MessageParam] = [
        *ask,
        {"role": "assistant", "content": call.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}],
        },
    ]
    async with sdk.async_client() as client:
        with trio.fail_after(BOUND_S):
            answered = await client.messages.create(
                model="m", max_tokens=64, messages=history, tools=[WEATHER]
            )
    assert answered.content[0].text == "Sunny in Paris."  # type: ignore[union-attr]
    tool_message = fake.received[1]["body"]["messages"][-1]
    assert tool_message == {
        "role": "tool",
        "tool_call_id": "call_w",
        "content": "sunny",
        "name": "get_weather",
    }


async def test_a_failure_after_content_raises_in_the_stream(sdk: Sdk) -> None:
    await sdk.connect(always([role_chunk(), content_chunk("partial"), Fail(500, "oom")]))
    seen: list[str] = []

    def consume(client: anthropic.Anthropic) -> None:
        with client.messages.stream(model="m", max_tokens=32, messages=HELLO) as events:
            seen.extend(events.text_stream)

    with pytest.raises(anthropic.APIStatusError, match="oom"):
        await sdk.in_thread(consume)
    assert seen == ["partial"]


async def test_count_tokens(sdk: Sdk) -> None:
    async with sdk.async_client() as client:
        with trio.fail_after(BOUND_S):
            counted = await client.messages.count_tokens(model="m", messages=HELLO)
    assert counted.input_tokens == 4  # the daemon's estimate: 2 characters, one message


async def test_errors_are_the_sdk_s_typed_exceptions(sdk: Sdk) -> None:
    await sdk.connect(always(answer("unused")))
    async with sdk.async_client() as client:
        with pytest.raises(anthropic.NotFoundError) as not_found:
            await client.messages.create(model="claude-nope", max_tokens=8, messages=HELLO)
        assert "claude-nope" in not_found.value.message
        assert not_found.value.request_id is not None
        with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
            await client.messages.create(model="m", max_tokens=0, messages=HELLO)
    async with sdk.async_client("dk_wrong") as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(model="m", max_tokens=8, messages=HELLO)
