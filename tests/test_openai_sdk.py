"""The official `openai` Python SDK against the real daemon and fake providers.

Non-streaming calls use `AsyncOpenAI` directly under Trio (httpx runs on Trio through anyio).
Streaming calls use the synchronous `OpenAI` client in a worker thread: `AsyncStream` stops at
`[DONE]` without closing its inner async generators, which Trio reports as a ResourceWarning
(an error under `filterwarnings = error`); that is the SDK's leak, not the daemon's.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
import trio
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.conftest import StartDaemon
from tests.consumer_harness import (
    BOUND_S,
    TOOL_SCRIPT,
    in_turn,
    usage_chunk,
)
from tests.fakes.provider import (
    Fail,
    always,
    answer,
    content_chunk,
    role_chunk,
)
from tests.sdk_harness import Sdk, open_sdk

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def sdk(start_daemon: StartDaemon, nursery: trio.Nursery) -> Sdk:
    return await open_sdk(start_daemon, nursery, strict=False)


def _stream_text(
    client: openai.OpenAI, include_usage: bool = False
) -> tuple[str, list[ChatCompletionChunk]]:
    """Stream a chat completion; the text and every chunk."""
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    stream = client.chat.completions.create(
        model="m", messages=HELLO, stream=True, stream_options=options
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


async def test_a_non_streaming_completion_with_tool_calls(sdk: Sdk) -> None:
    await sdk.connect(always(TOOL_SCRIPT))
    tools: Any = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    async with sdk.async_client() as client:
        with trio.fail_after(BOUND_S):
            completion = await client.chat.completions.create(
                model="m", messages=HELLO, tools=tools
            )
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_a", "lookup", '{"city": "Paris"}'),
        ("call_b", "convert", '{"unit": "c"}'),
    ]
    assert completion.usage is not None and completion.usage.total_tokens == 21


async def test_a_streaming_completion_with_usage(sdk: Sdk) -> None:
    script = [*answer("Hello", ", ", "world")]
    script.insert(-2, usage_chunk(3, 2))  # before the provider's [DONE] and its terminal
    await sdk.connect(always(script))
    text, chunks = await sdk.in_thread(lambda client: _stream_text(client, include_usage=True))
    assert text == "Hello, world"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 21


async def test_a_stream_fails_over_invisibly(sdk: Sdk) -> None:
    behave = in_turn([role_chunk(), Fail(500)], answer("from the healthy one"))
    fakes = await sdk.connect(behave, behave)
    text, _ = await sdk.in_thread(_stream_text)
    assert text == "from the healthy one"
    assert sum(len(fake.received) for fake in fakes) == 2


async def test_a_failure_after_content_raises_in_the_stream(sdk: Sdk) -> None:
    await sdk.connect(always([role_chunk(), content_chunk("partial"), Fail(500, "oom")]))
    seen: list[str] = []

    def consume(client: openai.OpenAI) -> None:
        for chunk in client.chat.completions.create(model="m", messages=HELLO, stream=True):
            seen.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError, match="oom"):
        await sdk.in_thread(consume)
    assert "".join(seen) == "partial"


async def test_errors_surface_as_the_sdk_s_typed_exceptions(sdk: Sdk) -> None:
    await sdk.connect(always(answer("unused")))
    async with sdk.async_client() as client:
        with pytest.raises(openai.NotFoundError) as not_found:
            await client.chat.completions.create(model="nope", messages=HELLO)
        assert not_found.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="m", messages=HELLO, n=2)
        assert bad.value.param == "n"
    async with sdk.async_client("dk_wrong") as client:
        with pytest.raises(openai.AuthenticationError) as denied:
            await client.chat.completions.create(model="m", messages=HELLO)
        assert denied.value.code == "invalid_api_key"
