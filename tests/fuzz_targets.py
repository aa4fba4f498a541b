"""The fuzz targets: one strategy and one check per parser or encoder, shared by the bounded
property tests (`tests/test_fuzz_*.py`) and the long runs (`scripts/fuzz.py`).

A check takes one drawn input, runs the code under test and raises AssertionError (or the
unexpected exception itself) when the outcome is not one the module documents:
- frames: a message or a `ProtocolError` value, never an exception;
- SSE chunks: a `Classified`, never an exception;
- tool-schema repair: bytes, the same object when nothing needed repair, repaired bodies
  stable under a second pass; the provider's `prepare`: a request or a 400 `RequestFailure`;
- request translators: a `Parsed` whose envelope the provider node accepts, or an `ApiError`
  with a 4xx status;
- stream encoders and collectors: whatever chunks the provider relayed, one HTTP response
  whose events follow the route's framing (`fuzz_framing.py`), ending exactly once, with
  every piece of text the chunks carried.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import msgspec
from hypothesis import strategies as st

from daemon.api.chat import ChatCodec
from daemon.api.completions import CompletionsCodec
from daemon.api.errors import ApiError
from daemon.api.handler import Parsed
from daemon.api.messages import MessagesCodec
from daemon.api.messages_request import MessagesOptions, count_input_tokens
from daemon.api.relay import StreamOptions
from daemon.api.responses import ResponsesCodec
from daemon.api.responses_request import ResponsesOptions
from daemon.nursery.attempt import Chunk
from daemon.nursery.dispatch import Finished, InBandError, RelayEvent
from protocol import messages
from protocol.sse import ChunkKind, Classified, classify, classify_line, parse_data_line
from protocol.toolschema import normalize_tools
from provider.failures import RequestFailure
from provider.request import prepare
from tests import fuzz_framing as framing
from tests import fuzz_inputs as inputs


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]


# Frames ---------------------------------------------------------------------------------------

_PROVIDER_TAGS = [cls.__struct_config__.tag for cls in messages.ProviderMessage.__args__]
_DAEMON_TAGS = [cls.__struct_config__.tag for cls in messages.DaemonMessage.__args__]
_frames = inputs.shaped(
    {"type": st.sampled_from([*_PROVIDER_TAGS, *_DAEMON_TAGS])},
    {
        name: inputs.json_values(8)
        for name in ("request_id", "models", "usage", "encrypted_data", "data", "status_code")
    },
)
frames: Final = st.one_of(
    inputs.documents(_frames),
    st.text(inputs._any_char, max_size=40),  # a text frame: may hold a lone surrogate
    _frames.map(lambda frame: msgspec.json.encode(inputs._scrub(frame)).decode() + "\ud800"),
)


def check_frame(frame: bytes | str) -> None:
    for decode, union in (
        (messages.decode_provider_frame, messages.ProviderMessage),
        (messages.decode_daemon_frame, messages.DaemonMessage),
    ):
        decoded = decode(frame)
        if isinstance(decoded, messages.ProtocolError):
            assert isinstance(decoded.reason, str) and decoded.reason
            continue
        assert isinstance(decoded, union.__args__), type(decoded)
        assert decode(messages.encode(decoded)) == decoded, "a message does not round-trip"


# SSE chunks -----------------------------------------------------------------------------------

sse_lines: Final = st.one_of(inputs.data_lines(), st.text(inputs._any_char, max_size=40))


def check_sse_line(line: str) -> None:
    payload = parse_data_line(line)
    classified = classify_line(line)
    if payload is None:
        assert classified is None
        return
    assert isinstance(classified, Classified)
    assert classified == classify(payload) == classify(payload.encode(errors="surrogatepass"))
    kind, event = classified
    assert isinstance(kind, ChunkKind)
    assert (kind is ChunkKind.DONE) == (payload.strip() == "[DONE]")
    assert event is None or isinstance(event, dict)
    if kind in (ChunkKind.BOILERPLATE, ChunkKind.ERROR):
        assert isinstance(event, dict), "boilerplate and errors are parsed objects"


# Tool-schema repair and the provider's request preparation ---------------------------------

_tool_bodies = st.one_of(
    inputs.documents(inputs.chat_bodies),
    inputs.documents(inputs.messages_bodies),
    inputs.documents(inputs.responses_bodies),
)


def check_toolschema(body: bytes) -> None:
    repaired = normalize_tools(body)
    assert isinstance(repaired, bytes)
    if repaired is body:
        return
    assert normalize_tools(repaired) is repaired, "a repaired body needs repair again"
    document = msgspec.json.decode(repaired)
    assert isinstance(document, dict) and isinstance(document["tools"], list)


_exact: Final = msgspec.json.Decoder(float_hook=Decimal)  # 1e400 is a number, not an error
_envelopes = st.one_of(
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/x"]), _tool_bodies).map(
        lambda pair: b'{"endpoint": "%s", "body": %s}' % (pair[0].encode(), pair[1])
    ),
    inputs.documents(inputs.json_objects()),
)


def check_prepare(plaintext: bytes) -> None:
    try:
        prepared = prepare(plaintext)
    except RequestFailure as failure:
        assert failure.status_code == 400, failure.status_code
        return
    body = _exact.decode(prepared.body)
    assert isinstance(body, dict) and body["stream"] is True
    assert prepared.prompt_chars >= 0 and isinstance(prepared.prompt_text(), str)


# Request translators --------------------------------------------------------------------------

_PROVIDER_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def _check_parse(parse: Callable[[bytes], Parsed], raw: bytes) -> None:
    try:
        parsed = parse(raw)
    except ApiError as error:
        assert 400 <= error.status < 500, error.status
        assert isinstance(error.message, str) and error.message
        return
    assert isinstance(parsed, Parsed)
    traits = parsed.traits
    assert isinstance(traits.model, str) and traits.model
    for count in (traits.prompt_tokens, traits.max_tokens, traits.context_tokens):
        assert isinstance(count, int) and count >= 0
    envelope = msgspec.json.decode(parsed.envelope)
    assert envelope["endpoint"] in _PROVIDER_ENDPOINTS
    prepare(parsed.envelope)  # what the daemon accepts, the provider node must too


def _parse_target(
    name: str, parse: Callable[[bytes], Parsed], bodies: st.SearchStrategy[Any]
) -> Target:
    def check(raw: bytes) -> None:
        _check_parse(parse, raw)

    return Target(name, inputs.documents(bodies), check)


def check_count_tokens(raw: bytes) -> None:
    try:
        tokens = count_input_tokens(raw)
    except ApiError as error:
        assert 400 <= error.status < 500, error.status
        return
    assert isinstance(tokens, int) and tokens >= 0


# Stream encoders and collectors ---------------------------------------------------------------


def provider_chunk(line: str) -> Chunk:
    """The chunk an attempt makes of a decrypted line (`attempt.Attempt._chunk`)."""
    data = parse_data_line(line)
    if data is None:
        return Chunk(ChunkKind.DONE, line, None)
    kind, event = classify(data)
    return Chunk(kind, line, event)


_plain = st.text(max_size=20)
_ends = st.one_of(
    st.builds(
        lambda p, c, r: Finished(messages.Usage(p, c, r)),
        st.integers(0, 2**40),
        st.integers(0, 2**40),
        st.one_of(st.none(), st.integers(0, 2**20)),
    ),
    st.builds(
        InBandError,
        st.one_of(st.sampled_from(["provider_error", "timeout", "server_shutting_down"]), _plain),
        _plain,
    ),
)


@dataclass(frozen=True)
class Relayed:
    """What a committed stream hands the route: chunks, then exactly one end."""

    chunks: tuple[Chunk, ...]
    end: Finished | InBandError
    polled: tuple[bool, ...]  # whether each event was already buffered (the relay batches)
    options: Any


class ScriptedCommitted:
    """`dispatch.Committed` as a route sees it, replaying a script; it never waits."""

    request_id = "0f8e2a4c-1111-4222-8333-944445555666"
    provider_id = "provider-1"

    def __init__(self, relayed: Relayed) -> None:
        # Committed._relayable keeps DONE and ERROR chunks from the route: ERROR ends the
        # stream, so the script stops at the first one.
        events: list[RelayEvent] = []
        for chunk in relayed.chunks:
            if chunk.kind is ChunkKind.ERROR:
                events.append(InBandError("provider_error", "the provider failed"))
                break
            if chunk.kind is not ChunkKind.DONE:
                events.append(chunk)
        else:
            events.append(relayed.end)
        self.events = events
        self._next = 0
        self._polled = relayed.polled
        self.closed = 0

    @property
    def end(self) -> RelayEvent:
        return self.events[-1]

    @property
    def chunks(self) -> list[Chunk]:
        return [event for event in self.events if isinstance(event, Chunk)]

    async def next_event(self) -> RelayEvent:
        return self._take()

    def poll(self) -> RelayEvent | None:
        buffered = self._polled[self._next % len(self._polled)] if self._polled else True
        return self._take() if buffered else None

    def close(self, ending: InBandError | None = None) -> None:
        self.closed += 1

    def _take(self) -> RelayEvent:
        assert self._next < len(self.events), "read past the end of the stream"
        self._next += 1
        return self.events[self._next - 1]


def run_now(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine whose every await completes at once (no event loop needed)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise AssertionError("the route waited on something other than the script")


def respond(codec: Any, relayed: Relayed) -> tuple[int, bytes, ScriptedCommitted]:
    """The status and whole body a codec answers for `relayed`."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    committed = ScriptedCommitted(relayed)
    run_now(codec.respond(send, committed, [], relayed.options))
    start, *bodies = sent
    assert start["type"] == "http.response.start"
    assert bodies and all(m["type"] == "http.response.body" for m in bodies)
    assert [m.get("more_body", False) for m in bodies] == [True] * (len(bodies) - 1) + [False]
    return start["status"], b"".join(m["body"] for m in bodies), committed


def _relayed(options: st.SearchStrategy[Any]) -> st.SearchStrategy[Relayed]:
    return st.builds(
        Relayed,
        st.lists(inputs.data_lines().map(provider_chunk), max_size=12).map(tuple),
        _ends,
        st.lists(st.booleans(), max_size=4).map(tuple),
        options,
    )


def _texts(chunks: list[Chunk], choices: Callable[[list[Any]], list[Any]], *fields: str) -> str:
    """The text a route must pass on: `fields` of the chosen choices (of their delta when
    the field is a delta's), in order."""
    pieces = []
    for chunk in chunks:
        listed = chunk.event.get("choices") if chunk.event else None
        for choice in choices(listed) if isinstance(listed, list) else ():
            if not isinstance(choice, dict):
                continue
            for field in fields:
                holder = choice if field == "text" else choice.get("delta")
                value = holder.get(field) if isinstance(holder, dict) else None
                pieces.append(value if isinstance(value, str) else "")
    return "".join(pieces)


def _every(choices: list[Any]) -> list[Any]:
    return choices


def _indexed_0(choices: list[Any]) -> list[Any]:
    return [c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0]


def _listed_first(choices: list[Any]) -> list[Any]:
    return choices[:1]


def _failed(committed: ScriptedCommitted) -> bool:
    return isinstance(committed.end, InBandError)


def _check_error_answer(status: int, body: bytes, committed: ScriptedCommitted) -> None:
    assert status in (502, 503, 504), status
    error = framing.json_object(body.decode())
    assert isinstance(error["error"]["message"], str)


openai_options: Final = st.builds(StreamOptions, _plain, st.booleans(), st.booleans())


def check_openai_stream(codec: Any, relayed: Relayed) -> None:
    status, body, committed = respond(codec, relayed)
    if not relayed.options.stream:
        return _check_openai_answer(codec, status, body, committed)
    assert status == 200
    objects = framing.check_openai(framing.parse_sse(body), _failed(committed))
    include_usage = relayed.options.include_usage
    relayable = [c.event for c in committed.chunks if isinstance(c.event, dict)]
    # Only the usage-only chunk (no choices, a usage) is held back from a consumer who did
    # not ask for it.
    expected = [e for e in relayable if include_usage or e.get("choices") or e.get("usage") is None]
    assert objects[: len(expected)] == expected, "a chunk was lost or changed"


def _check_openai_answer(codec: Any, status: int, body: bytes, committed: Any) -> None:
    if _failed(committed):
        return _check_error_answer(status, body, committed)
    assert status == 200
    answer = framing.json_object(body.decode())
    (choice,) = answer["choices"]
    content = choice["message"]["content"] if codec is ChatCodec else choice["text"]
    assert isinstance(answer["id"], str) and isinstance(answer["created"], int)
    assert content == _texts(committed.chunks, _every, "text", "content"), "text lost"


messages_options: Final = st.builds(
    MessagesOptions,
    _plain,
    st.booleans(),
    st.lists(_plain, max_size=2).map(tuple),
    st.integers(0, 2**31),
)


def check_messages_stream(relayed: Relayed) -> None:
    status, body, committed = respond(MessagesCodec(), relayed)
    failed = _failed(committed)
    if not relayed.options.stream:
        return _check_message_answer(status, body, committed)
    assert status == 200
    events = framing.check_anthropic(framing.parse_sse(body), failed)
    texts = [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"
             and e["delta"]["type"] == "text_delta"]  # fmt: skip
    assert "".join(texts) == _texts(committed.chunks, _indexed_0, "content"), "text lost"


def _check_message_answer(status: int, body: bytes, committed: ScriptedCommitted) -> None:
    if _failed(committed):
        assert status in (502, 503, 504), status
        error = framing.json_object(body.decode())
        assert error["type"] == "error" and isinstance(error["error"]["type"], str)
        return
    assert status == 200
    message = framing.json_object(body.decode())
    assert message["type"] == "message" and message["role"] == "assistant"
    for block in message["content"]:
        match block["type"]:
            case "text":
                assert isinstance(block["text"], str) and block["text"]
            case "thinking":
                assert isinstance(block["thinking"], str)
            case "tool_use":
                assert isinstance(block["id"], str) and isinstance(block["name"], str)
                assert isinstance(block["input"], dict)
            case other:
                raise AssertionError(f"unexpected block {other!r}")


responses_options: Final = st.builds(
    ResponsesOptions, _plain, st.booleans(), st.dictionaries(_plain, _plain, max_size=3)
)


def check_responses_stream(relayed: Relayed) -> None:
    status, body, committed = respond(ResponsesCodec(), relayed)
    failed = _failed(committed)
    if not relayed.options.stream:
        if failed:
            return _check_error_answer(status, body, committed)
        assert status == 200
        response = framing.json_object(body.decode())
        assert response["object"] == "response"
        assert response["status"] in ("completed", "incomplete")
        return
    assert status == 200
    events = framing.check_responses(framing.parse_sse(body), failed)
    texts = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(texts) == _texts(committed.chunks, _listed_first, "content"), "text lost"


# The registry ---------------------------------------------------------------------------------

TARGETS: Final = {
    target.name: target
    for target in (
        Target("frames", frames, check_frame),
        Target("sse", sse_lines, check_sse_line),
        Target("toolschema", _tool_bodies, check_toolschema),
        Target("provider_prepare", _envelopes, check_prepare),
        _parse_target("chat_request", ChatCodec.parse, inputs.chat_bodies),
        _parse_target("completions_request", CompletionsCodec.parse, inputs.completion_bodies),
        _parse_target("messages_request", MessagesCodec().parse, inputs.messages_bodies),
        _parse_target("responses_request", ResponsesCodec().parse, inputs.responses_bodies),
        Target("count_tokens", inputs.documents(inputs.messages_bodies), check_count_tokens),
        Target(
            "chat_stream",
            _relayed(openai_options),
            lambda relayed: check_openai_stream(ChatCodec, relayed),
        ),
        Target(
            "completions_stream",
            _relayed(openai_options),
            lambda relayed: check_openai_stream(CompletionsCodec, relayed),
        ),
        Target("messages_stream", _relayed(messages_options), check_messages_stream),
        Target("responses_stream", _relayed(responses_options), check_responses_stream),
    )
}
