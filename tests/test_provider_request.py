"""One request through the provider node against a fake backend over real loopback HTTP.

Each backend failure mode must end in the terminal PROTOCOL.md §6 names, and a stream counts as
a success only when a finish reason arrived.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from nacl.public import PrivateKey

from protocol.crypto import ChunkOpener, seal_request
from protocol.messages import (
    EncryptedPayload,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    InferenceResponseChunk,
    ProviderMessage,
    Usage,
)
from provider.backend import Backend, open_client
from provider.rendered import MAX_RENDERED_BYTES
from provider.request import serve_request
from provider.templates import TemplateSet
from provider.tokenizer import COUNT_TIMEOUT, ROUTE_RETRY, Tokenizer
from tests.fakes.backend import (
    DONE,
    MODEL,
    FakeBackend,
    Raw,
    Reply,
    chunk,
    content_lines,
    cut_reply,
    data,
    done_without_finish_reply,
    empty_reply,
    error_event_reply,
    generator_raised_reply,
    http_error,
    ollama_eof_reply,
    slow_reply,
    stalled_reply,
    stream_reply,
)

NODE_KEY = PrivateKey.generate()
CHAT = "/v1/chat/completions"
PROMPT = "Say hello to the world, politely."  # 33 characters: 9 estimated tokens
BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": PROMPT}],
    "stream": True,
    "stream_options": {"include_usage": True},
}


@dataclass
class Outcome:
    chunks: list[str]
    terminal: InferenceComplete | InferenceError


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeBackend:
    backend = FakeBackend()
    await nursery.start(backend.run)
    return backend


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(read_timeout=30) as http:
        yield http


def sealed(body: Any = BODY, endpoint: str = CHAT) -> tuple[InferenceRequest, ChunkOpener]:
    plaintext = json.dumps({"endpoint": endpoint, "body": body}).encode()
    payload, opener = seal_request(plaintext, NODE_KEY.public_key)
    return InferenceRequest(request_id="req-1", encrypted_body=payload), opener


async def serve(
    client: httpx.AsyncClient,
    url: str,
    body: Any = BODY,
    endpoint: str = CHAT,
    *,
    context: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> Outcome:
    request, opener = sealed(body, endpoint)
    frames: list[ProviderMessage] = []

    async def send(message: ProviderMessage) -> None:
        frames.append(message)

    def context_length(model: str | None) -> int | None:
        return context if model == MODEL else None

    backend = Backend(client, url) if tokenizer is None else tokenizer.backend
    await serve_request(
        request,
        box=NODE_KEY,
        backend=backend,
        send=send,
        context_length=context_length,
        tokenizer=tokenizer,
    )
    return outcome(frames, opener)


def outcome(frames: list[ProviderMessage], opener: ChunkOpener) -> Outcome:
    *chunks, terminal = frames
    assert isinstance(terminal, InferenceComplete | InferenceError)
    assert all(isinstance(frame, InferenceResponseChunk) for frame in chunks)
    opened = [opener.open(frame.encrypted_data).decode() for frame in chunks]  # type: ignore[union-attr]
    return Outcome(opened, terminal)


def lines_of(reply: Reply) -> list[str]:
    return [step.text for step in reply.steps if hasattr(step, "text")]


async def test_each_data_line_is_relayed_as_the_backend_wrote_it(fake, client) -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    reply = stream_reply(["Hello", " world"], usage=usage)
    fake.script(reply)
    result = await serve(client, fake.url)
    # `[DONE]` is not relayed: the terminal frame says the stream ended.
    assert result.chunks == [line for line in lines_of(reply) if line != DONE.text]
    assert result.terminal == InferenceComplete("req-1", Usage(12, 2))


async def test_the_backend_gets_the_request_body(fake, client) -> None:
    await serve(client, fake.url)
    (served,) = fake.completions
    assert served.path == CHAT
    assert served.json == BODY


async def test_completions_endpoint_is_served_too(fake, client) -> None:
    event = {
        "object": "text_completion",
        "choices": [{"index": 0, "text": "hi", "finish_reason": None}],
    }
    finish = {
        "object": "text_completion",
        "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
    }
    fake.script(Reply(steps=(data(event), data(finish), DONE)))
    result = await serve(
        client, fake.url, {"model": MODEL, "prompt": "12345678"}, "/v1/completions"
    )
    assert fake.completions[0].path == "/v1/completions"
    assert result.terminal == InferenceComplete(
        "req-1", Usage(prompt_tokens=2, completion_tokens=1, estimated=True)
    )


# --- the stream success rule and the error table ---------------------------------------------


def refused_url() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


FAILURES = [
    pytest.param(
        error_event_reply(code=500), 500, "backend_error_event", id="llama-server-error-event"
    ),
    pytest.param(
        error_event_reply(code=None, pieces=["Hi"], then_done=True),
        500,
        "backend_error_event",
        id="vllm-error-then-done",
    ),
    pytest.param(error_event_reply(code=400), 400, "bad_request", id="error-event-with-400"),
    pytest.param(empty_reply(), 502, "empty_response", id="llama-cpp-python-empty-200"),
    pytest.param(done_without_finish_reply(), 502, "incomplete_stream", id="done-without-finish"),
    pytest.param(ollama_eof_reply(), 502, "incomplete_stream", id="ollama-empty-chunk-eof"),
    pytest.param(cut_reply(), 502, "backend_disconnected", id="connection-cut-mid-body"),
    pytest.param(http_error(500), 500, "backend_error", id="http-500"),
    pytest.param(http_error(502), 500, "backend_error", id="http-502"),
    pytest.param(http_error(429), 503, "backend_busy", id="http-429"),
    pytest.param(http_error(503), 503, "backend_busy", id="http-503"),
    pytest.param(http_error(404), 503, "not_found", id="http-404-model-not-loaded"),
    pytest.param(http_error(401), 500, "backend_error", id="http-401-misconfigured"),
]


@pytest.mark.parametrize(("reply", "status", "reason"), FAILURES)
async def test_backend_failure_ends_in_the_right_error(fake, client, reply, status, reason) -> None:
    fake.script(reply)
    result = await serve(client, fake.url)
    assert isinstance(result.terminal, InferenceError)
    assert (result.terminal.status_code, result.terminal.error_reason) == (status, reason)


@pytest.mark.parametrize("status", [400, 413, 415, 422])
async def test_bad_request_codes_pass_through_with_the_backend_message(
    fake, client, status
) -> None:
    fake.script(http_error(status, "prompt exceeds the context window"))
    result = await serve(client, fake.url)
    assert result.terminal == InferenceError(
        "req-1", "prompt exceeds the context window", status, "bad_request"
    )


async def test_an_error_event_is_never_relayed(fake, client) -> None:
    fake.script(error_event_reply("out of memory", pieces=["Hel"]))
    result = await serve(client, fake.url)
    assert not any('"error"' in line for line in result.chunks)
    assert len(result.chunks) == 2  # the role chunk and "Hel"
    assert isinstance(result.terminal, InferenceError)
    assert "out of memory" in result.terminal.error


async def test_connection_refused_is_502(client) -> None:
    result = await serve(client, refused_url())
    assert isinstance(result.terminal, InferenceError)
    assert (result.terminal.status_code, result.terminal.error_reason) == (
        502,
        "backend_unreachable",
    )


async def test_a_silent_backend_times_out_with_504_at_the_read_timeout(
    fake, autojump_clock
) -> None:
    fake.script(stalled_reply(seconds=100))
    async with open_client(read_timeout=30) as client:
        result = await serve(client, fake.url)
    assert isinstance(result.terminal, InferenceError)
    assert (result.terminal.status_code, result.terminal.error_reason) == (504, "backend_timeout")
    assert trio.current_time() == 30.0


# --- a prompt longer than the model's context ----------------------------------------------------

CONTEXT = 64
# 80 words: 80 tokens by the fake's tokenizer; 399 characters: 100 tokens by the estimate.
LONG = " ".join(["word"] * 80)
LONG_BODY = {**BODY, "messages": [{"role": "user", "content": LONG}]}

# llama-cpp-python raises its context error inside the stream generator, after the 200 headers.
BROKE_OFF_BEFORE_CONTENT = [
    pytest.param(generator_raised_reply("close"), id="llama-cpp-python-empty-200-then-close"),
    pytest.param(generator_raised_reply("reset"), id="llama-cpp-python-empty-200-then-reset"),
    pytest.param(empty_reply(), id="empty-200"),
    pytest.param(cut_reply(pieces=()), id="role-chunk-then-reset"),
    pytest.param(done_without_finish_reply(pieces=()), id="role-chunk-then-done"),
]


def assert_context_exceeded(result: Outcome) -> InferenceError:
    assert isinstance(result.terminal, InferenceError)
    assert (result.terminal.status_code, result.terminal.error_reason) == (
        400,
        "context_length_exceeded",
    )
    return result.terminal


@pytest.mark.parametrize("reply", BROKE_OFF_BEFORE_CONTENT)
@pytest.mark.parametrize("tokenizer", ["/extras/tokenize", "/tokenize"])
async def test_a_stream_that_breaks_off_for_a_prompt_over_the_context_is_a_400(
    fake, client, reply, tokenizer
) -> None:
    fake.tokenizer = tokenizer
    fake.script(reply)
    error = assert_context_exceeded(await serve(client, fake.url, LONG_BODY, context=CONTEXT))
    assert error.error == (
        "the prompt is 80 tokens, the model's context is 64: "
        "the backend ended the stream without an answer"
    )
    *_, count = fake.tokenized  # llama-server first answers 404 to llama-cpp-python's route
    assert (count.path, count.json["model"]) == (tokenizer, MODEL)


async def test_without_a_tokenizer_the_prompt_size_is_estimated(fake, client) -> None:
    fake.script(empty_reply())
    error = assert_context_exceeded(await serve(client, fake.url, LONG_BODY, context=CONTEXT))
    assert error.error.startswith("the prompt is about 100 tokens (estimated)")


async def test_a_tokenizer_that_does_not_answer_falls_back_to_the_estimate(
    fake, client, autojump_clock
) -> None:
    fake.tokenizer = "/tokenize"
    fake.tokenizer_gate = trio.Event()  # never set: the count never comes
    fake.script(empty_reply())
    assert_context_exceeded(await serve(client, fake.url, LONG_BODY, context=CONTEXT))
    assert trio.current_time() == 10.0


@pytest.mark.parametrize("reply", BROKE_OFF_BEFORE_CONTENT)
async def test_the_same_failure_for_a_prompt_that_fits_is_still_a_backend_fault(
    fake, client, reply
) -> None:
    fake.tokenizer = "/extras/tokenize"
    fake.script(reply)
    result = await serve(client, fake.url, context=CONTEXT)
    assert isinstance(result.terminal, InferenceError)
    assert result.terminal.status_code == 502


async def test_without_a_known_context_a_broken_stream_stays_a_502(fake, client) -> None:
    fake.tokenizer = "/extras/tokenize"
    fake.script(empty_reply())
    result = await serve(client, fake.url, LONG_BODY, context=None)
    assert isinstance(result.terminal, InferenceError)
    assert (result.terminal.status_code, result.terminal.error_reason) == (502, "empty_response")
    assert fake.tokenized == []


async def test_a_stream_that_broke_off_after_content_is_never_blamed_on_the_prompt(
    fake, client
) -> None:
    fake.tokenizer = "/extras/tokenize"
    fake.script(cut_reply(pieces=["Hel"]))
    result = await serve(client, fake.url, LONG_BODY, context=CONTEXT)
    assert isinstance(result.terminal, InferenceError)
    assert (result.terminal.status_code, result.terminal.error_reason) == (
        502,
        "backend_disconnected",
    )
    assert fake.tokenized == []


async def test_a_request_served_with_the_backends_usage_never_pays_for_counting_its_prompt(
    fake, client
) -> None:
    fake.tokenizer = "/extras/tokenize"
    fake.script(stream_reply(usage={"prompt_tokens": 80, "completion_tokens": 2}))
    result = await serve(client, fake.url, LONG_BODY, context=CONTEXT)
    assert result.terminal == InferenceComplete("req-1", Usage(80, 2))
    assert fake.tokenized == []


@pytest.mark.parametrize("drop", ["close", "reset"])
async def test_the_request_after_a_stream_whose_connection_was_dropped_is_served(
    fake, client, drop
) -> None:
    # The next request goes out on the connection the server promised to keep and then drops:
    # it got no answer at all, so it is sent again rather than failed as a backend fault.
    fake.script(generator_raised_reply(drop), stream_reply(["again"]))
    first = await serve(client, fake.url)
    assert isinstance(first.terminal, InferenceError)
    assert first.terminal.error_reason == "empty_response"
    second = await serve(client, fake.url)
    assert isinstance(second.terminal, InferenceComplete)


async def test_llama_cpp_python_non_streaming_answer_passes_its_message_through(
    fake, client
) -> None:
    message = "This model's maximum context length is 64 tokens. However, you requested 80 tokens"
    error = {"message": message, "type": "invalid_request_error", "code": "context_length_exceeded"}
    body = json.dumps({"error": error}).encode()
    fake.script(Reply(status=400, steps=(Raw(body),), content_type="application/json"))
    result = await serve(client, fake.url, LONG_BODY)
    assert result.terminal == InferenceError("req-1", message, 400, "context_length_exceeded")


async def test_llama_server_error_event_is_a_context_overflow(fake, client) -> None:
    error = {"code": 400, "message": "request (80 tokens) exceeds the available context size "
             "(64 tokens), try increasing it", "type": "exceed_context_size_error"}  # fmt: skip
    fake.script(Reply(steps=(*content_lines([]), data({"error": error}))))
    result = await serve(client, fake.url, LONG_BODY)
    assert result.terminal == InferenceError(
        "req-1", error["message"], 400, "context_length_exceeded"
    )


# --- usage ------------------------------------------------------------------------------------


async def test_usage_is_estimated_when_the_backend_sends_none(fake, client) -> None:
    fake.script(stream_reply(["a", "b", "c"], usage=None))
    result = await serve(client, fake.url)
    assert result.terminal == InferenceComplete(
        "req-1", Usage(prompt_tokens=9, completion_tokens=3, estimated=True)
    )


# PROMPT is 6 words: 6 tokens by the fake's tokenizer, where the estimate says 9.


async def test_without_the_backends_usage_llama_cpp_python_counts_the_prompt(fake, client) -> None:
    fake.tokenizer = "/extras/tokenize"
    fake.script(stream_reply(["a", "b", "c"], usage=None))
    result = await serve(client, fake.url)
    assert result.terminal == InferenceComplete("req-1", Usage(6, 3))
    (count,) = fake.tokenized
    assert (count.path, count.json) == ("/extras/tokenize", {"model": MODEL, "input": PROMPT})


async def test_without_the_backends_usage_llama_server_counts_the_prompt_from_then_on(
    fake, client
) -> None:
    # One round trip per request at most: the first learns that /extras/tokenize is not here.
    fake.tokenizer = "/tokenize"
    tokenizer = Tokenizer(Backend(client, fake.url))
    first = await serve(client, fake.url, tokenizer=tokenizer)
    second = await serve(client, fake.url, tokenizer=tokenizer)
    assert first.terminal == InferenceComplete("req-1", Usage(9, 2, estimated=True))
    assert second.terminal == InferenceComplete("req-1", Usage(6, 2))
    assert [(s.path, s.json) for s in fake.tokenized] == [
        ("/extras/tokenize", {"model": MODEL, "input": PROMPT}),
        ("/tokenize", {"model": MODEL, "content": PROMPT, "add_special": True}),
    ]


async def test_a_backend_without_a_tokenizer_is_asked_once_per_route_then_left_alone(
    fake, client, autojump_clock
) -> None:
    tokenizer = Tokenizer(Backend(client, fake.url))
    for _ in range(5):
        result = await serve(client, fake.url, tokenizer=tokenizer)
        assert result.terminal == InferenceComplete("req-1", Usage(9, 2, estimated=True))
    assert [s.path for s in fake.tokenized] == ["/extras/tokenize", "/tokenize"]
    await trio.sleep(ROUTE_RETRY)  # it may have been replaced by a server with one
    fake.tokenizer = "/extras/tokenize"
    result = await serve(client, fake.url, tokenizer=tokenizer)
    assert result.terminal == InferenceComplete("req-1", Usage(6, 2))
    assert len(fake.tokenized) == 3


async def test_a_slow_tokenizer_delays_the_terminal_two_seconds_at_most(
    fake, client, autojump_clock
) -> None:
    fake.tokenizer = "/extras/tokenize"
    fake.tokenizer_gate = trio.Event()  # never set: the count never comes
    tokenizer = Tokenizer(Backend(client, fake.url))
    result = await serve(client, fake.url, tokenizer=tokenizer)
    assert result.terminal == InferenceComplete("req-1", Usage(9, 2, estimated=True))
    assert trio.current_time() == COUNT_TIMEOUT == 2.0
    # Slow is not absent: the next request asks the same route again.
    fake.tokenizer_gate.set()
    again = await serve(client, fake.url, tokenizer=tokenizer)
    assert again.terminal == InferenceComplete("req-1", Usage(6, 2))
    assert [s.path for s in fake.tokenized] == ["/extras/tokenize"] * 2


def with_template(client: httpx.AsyncClient, url: str, template: str) -> Tokenizer:
    tokenizer = Tokenizer(Backend(client, url))
    tokenizer.templates[MODEL] = TemplateSet(default=template)
    return tokenizer


async def test_a_chat_prompt_is_counted_as_its_template_renders_it(fake, client) -> None:
    fake.tokenizer = "/extras/tokenize"
    template = "{% for m in messages %}<turn> {{ m.content }} </turn> {% endfor %}<turn>"
    result = await serve(client, fake.url, tokenizer=with_template(client, fake.url, template))
    assert result.terminal == InferenceComplete("req-1", Usage(9, 2))  # 6 words and 3 markers
    (count,) = fake.tokenized
    assert count.json["input"] == f"<turn> {PROMPT} </turn> <turn>"


async def test_a_template_that_raises_on_a_request_leaves_the_text_to_count(fake, client) -> None:
    fake.tokenizer = "/extras/tokenize"
    template = "{{ raise_exception('not this one') }}"
    result = await serve(client, fake.url, tokenizer=with_template(client, fake.url, template))
    assert result.terminal == InferenceComplete("req-1", Usage(6, 2))


async def test_a_request_too_big_to_render_is_counted_as_its_text(fake, client) -> None:
    fake.tokenizer = "/extras/tokenize"
    words = " ".join(["word"] * (MAX_RENDERED_BYTES // 5 + 1))
    body = {**BODY, "messages": [{"role": "user", "content": words}]}
    tokenizer = with_template(client, fake.url, "{{ messages[0].content }} rendered")
    result = await serve(client, fake.url, body, tokenizer=tokenizer)
    assert isinstance(result.terminal, InferenceComplete)
    assert result.terminal.usage.prompt_tokens == MAX_RENDERED_BYTES // 5 + 1


async def test_a_reported_prompt_count_is_kept_when_only_completion_is_missing(
    fake, client
) -> None:
    fake.tokenizer = "/extras/tokenize"
    fake.script(stream_reply(["a", "b"], usage={"prompt_tokens": 12, "completion_tokens": 0}))
    result = await serve(client, fake.url)
    assert result.terminal == InferenceComplete("req-1", Usage(12, 2))
    assert fake.tokenized == []


async def test_zero_completion_usage_is_replaced_when_content_streamed(fake, client) -> None:
    fake.script(stream_reply(["a", "b"], usage={"prompt_tokens": 0, "completion_tokens": 0}))
    result = await serve(client, fake.url)
    assert result.terminal == InferenceComplete(
        "req-1", Usage(prompt_tokens=9, completion_tokens=2, estimated=True)
    )


async def test_tool_call_deltas_count_as_output(fake, client) -> None:
    call = [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]
    steps = (
        *content_lines([]),
        data(chunk(tool_calls=call)),
        data(chunk(finish_reason="tool_calls")),
    )
    fake.script(Reply(steps=steps))
    result = await serve(client, fake.url)
    assert result.terminal == InferenceComplete(
        "req-1", Usage(prompt_tokens=9, completion_tokens=1, estimated=True)
    )


# --- repairs reach the backend ----------------------------------------------------------------


async def test_null_content_beside_tool_calls_reaches_the_backend_as_empty_string(
    fake, client
) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    await serve(client, fake.url, {**BODY, "messages": messages})
    sent = fake.completions[0].json["messages"]
    assert sent[1] == {"role": "assistant", "content": "", "tool_calls": [call]}


async def test_tool_schemas_are_normalized_before_the_backend_sees_them(fake, client) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": ["string", "null"]}}},
        },
    }
    await serve(client, fake.url, {**BODY, "tools": [tool]})
    schema = fake.completions[0].json["tools"][0]["function"]["parameters"]
    assert schema["properties"]["q"] == {"type": "string", "nullable": True}


# --- requests the node cannot serve -----------------------------------------------------------


async def test_a_request_that_does_not_decrypt_is_a_provider_fault(fake, client) -> None:
    request, _ = sealed()
    other_key = PrivateKey.generate()
    frames: list[ProviderMessage] = []

    async def send(message: ProviderMessage) -> None:
        frames.append(message)

    await serve_request(request, box=other_key, backend=Backend(client, fake.url), send=send)
    assert [(f.status_code, f.error_reason) for f in frames] == [(500, "undecryptable")]  # type: ignore[union-attr]
    assert fake.completions == []


@pytest.mark.parametrize(
    ("body", "endpoint"),
    [
        pytest.param(BODY, "/v1/embeddings", id="unserved-endpoint"),
        pytest.param([1, 2], CHAT, id="body-not-an-object"),
    ],
)
async def test_a_malformed_request_is_400_and_never_reaches_the_backend(
    fake, client, body, endpoint
) -> None:
    result = await serve(client, fake.url, body, endpoint)
    assert isinstance(result.terminal, InferenceError)
    assert result.terminal.status_code == 400
    assert fake.completions == []


# --- cancel -----------------------------------------------------------------------------------


async def test_cancel_closes_the_backend_stream_and_sends_nothing_more(fake, client) -> None:
    gate = trio.Event()
    fake.script(slow_reply(gate))
    request, _ = sealed()
    frames: list[ProviderMessage] = []
    first_chunk = trio.Event()

    async def send(message: ProviderMessage) -> None:
        frames.append(message)
        first_chunk.set()

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            backend = Backend(client, fake.url)
            nursery.start_soon(
                lambda: serve_request(request, box=NODE_KEY, backend=backend, send=send)
            )
            await first_chunk.wait()
            scope.cancel(reason="cancelled by the daemon")
    (served,) = fake.completions
    with trio.fail_after(5):  # a guard against a hang, not a timing assertion
        await served.disconnected.wait()
    gate.set()
    assert all(isinstance(frame, InferenceResponseChunk) for frame in frames)
    assert not served.finished.is_set()


def test_fixture_payload_type_is_the_wire_type() -> None:
    request, _ = sealed()
    assert isinstance(request.encrypted_body, EncryptedPayload)
