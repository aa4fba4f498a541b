"""A scripted OpenAI-compatible model server over real loopback HTTP (HTTP/1.1 via h11).

Provider-node tests start one with `nursery.start(fake.run)` and point the node's httpx client
at `fake.url`. `GET /v1/models` lists `fake.models`; each `POST /v1/chat/completions` or
`/v1/completions` plays the next scripted `Reply`: a status, then steps (SSE lines, raw bytes,
waits on a test-controlled event, virtual-clock sleeps, a cut connection). Every request is
recorded as `Served`, whose `disconnected` event fires when the client hangs up before the reply
ended: that is how a test sees `cancel` reach the backend.

Two more routes exist only when a test asks for them, as on real servers: `GET /props`
(llama-server) answers `fake.props`, and `POST fake.tokenizer` (llama-server's `/tokenize`,
llama-cpp-python's `/extras/tokenize`) counts one token per whitespace-separated word of the
text it is sent, after `fake.tokenizer_gate` is set if there is one. Anything else is a 404.

The constructors below reproduce how real servers fail: llama-server and vLLM send an `error`
event mid-stream; llama-cpp-python answers 200 with an empty body when its template raises and
ends an interrupted stream with `[DONE]` but no finish reason; Ollama ends with an empty chunk
and EOF.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import h11
import trio

MODEL = "fake-model"

# Steps ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One SSE line, written with its blank separator (`text\\n\\n`)."""

    text: str


@dataclass(frozen=True)
class Raw:
    """Body bytes written as they are (odd framings, partial lines)."""

    data: bytes


@dataclass(frozen=True)
class Wait:
    """Hold the reply until the test sets `event` (a slow stream without wall-clock time)."""

    event: trio.Event


@dataclass(frozen=True)
class Sleep:
    """Pause for `seconds` of the Trio clock (virtual under `autojump_clock`)."""

    seconds: float


@dataclass(frozen=True)
class Cut:
    """Drop the connection without ending the body (a crashed or killed server)."""


Step = Line | Raw | Wait | Sleep | Cut


@dataclass(frozen=True)
class Reply:
    status: int = 200
    steps: tuple[Step, ...] = ()
    content_type: str = "text/event-stream"
    # Promise `connection: keep-alive`, then drop the client's next request on this connection
    # unanswered, closing after reading it or resetting under it (llama-cpp-python after its
    # stream generator raised does either).
    drops_next: Literal["close", "reset"] | None = None


# Reply constructors -----------------------------------------------------------------------------


def chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    model: str = MODEL,
    **delta: Any,
) -> dict[str, Any]:
    """A chat.completion.chunk with one choice (none when only `usage` is given)."""
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    event: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1764026918,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage is not None:
        event["usage"] = usage
        if not delta and finish_reason is None:
            event["choices"] = []
    return event


def data(event: dict[str, Any] | str) -> Line:
    payload = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return Line(f"data: {payload}")


DONE = Line("data: [DONE]")


def content_lines(pieces: Sequence[str], *, role: bool = True) -> list[Line]:
    lines = [data(chunk(role="assistant", content=""))] if role else []
    return lines + [data(chunk(piece)) for piece in pieces]


def stream_reply(
    pieces: Sequence[str] = ("Hello", " world"),
    *,
    finish_reason: str = "stop",
    usage: dict[str, int] | None = None,
    done: bool = True,
) -> Reply:
    """A healthy stream: role chunk, content, finish reason, optional usage chunk, `[DONE]`."""
    steps: list[Step] = [*content_lines(pieces), data(chunk(finish_reason=finish_reason))]
    if usage is not None:
        steps.append(data(chunk(usage=usage)))
    if done:
        steps.append(DONE)
    return Reply(steps=tuple(steps))


def error_event_reply(
    message: str = "model crashed",
    *,
    code: int | None = 500,
    pieces: Sequence[str] = (),
    then_done: bool = False,
) -> Reply:
    """llama-server / vLLM: a role chunk (and maybe content), then `data: {"error": ...}`."""
    error: dict[str, Any] = {"message": message, "type": "server_error"}
    if code is not None:
        error["code"] = code
    steps: list[Step] = [*content_lines(pieces), data({"error": error})]
    if then_done:
        steps.append(DONE)
    return Reply(steps=tuple(steps))


def empty_reply() -> Reply:
    """llama-cpp-python when its chat template raises: 200 and not a byte of body."""
    return Reply()


def generator_raised_reply(drop: Literal["close", "reset"] = "close") -> Reply:
    """llama-cpp-python when its stream generator raises (a prompt over the context, say).

    Seen on the wire: `200`, `connection: keep-alive`, an empty chunked body (`0\\r\\n\\r\\n`),
    and the connection closed or reset under the next request sent on it.
    """
    return Reply(drops_next=drop)


def done_without_finish_reply(pieces: Sequence[str] = ("Hel",)) -> Reply:
    """llama-cpp-python cut short: content, then `[DONE]`, never a finish reason."""
    return Reply(steps=(*content_lines(pieces), DONE))


def ollama_eof_reply(pieces: Sequence[str] = ("Hel",)) -> Reply:
    """Ollama broken off: content, an empty chunk, then the body just ends."""
    return Reply(steps=(*content_lines(pieces), data(chunk(""))))


def cut_reply(pieces: Sequence[str] = ("Hel",)) -> Reply:
    """A server killed mid-answer: the connection drops inside the chunked body."""
    return Reply(steps=(*content_lines(pieces), Cut()))


def slow_reply(gate: trio.Event, pieces: Sequence[str] = ("Hel", "lo")) -> Reply:
    """The first piece at once, the rest only after the test sets `gate`."""
    first, rest = content_lines(pieces[:1]), [data(chunk(piece)) for piece in pieces[1:]]
    tail = [*rest, data(chunk(finish_reason="stop")), DONE]
    return Reply(steps=(*first, Wait(gate), *tail))


def stalled_reply(seconds: float, pieces: Sequence[str] = ("Hel",)) -> Reply:
    """Content, then silence for `seconds` (longer than the read timeout), then the rest."""
    steps: list[Step] = [*content_lines(pieces), Sleep(seconds)]
    return Reply(steps=(*steps, data(chunk(finish_reason="stop")), DONE))


def http_error(status: int, message: str = "backend says no") -> Reply:
    """An OpenAI-shaped JSON error body with `status`."""
    body = json.dumps({"error": {"message": message, "code": status, "type": "error"}})
    return Reply(status=status, steps=(Raw(body.encode()),), content_type="application/json")


# The server -------------------------------------------------------------------------------------


@dataclass
class Served:
    """One request as the fake received it."""

    method: str
    path: str
    body: bytes
    # Set when the client hung up before the reply ended.
    disconnected: trio.Event = field(default_factory=trio.Event)
    # Set when every step of the reply was played (or the script cut the connection).
    finished: trio.Event = field(default_factory=trio.Event)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class FakeBackend:
    def __init__(self, models: Sequence[str] = (MODEL,), *, owned_by: str = "llamacpp") -> None:
        self.models = [{"id": m, "object": "model", "owned_by": owned_by} for m in models]
        self.models_reply: Reply | None = None  # set to make /v1/models fail
        self.replies: deque[Reply] = deque()
        self.default_reply = stream_reply()
        self.served: list[Served] = []
        self.props: dict[str, Any] | None = None  # set to serve llama-server's GET /props
        self.tokenizer: str | None = None  # a path that answers POST {"tokens": [...]}
        self.tokenizer_gate: trio.Event | None = None  # set: the tokenizer waits for it
        self.url = ""

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def set_models(self, *ids: str) -> None:
        self.models = [{"id": m, "object": "model", "owned_by": "llamacpp"} for m in ids]

    @property
    def completions(self) -> list[Served]:
        return [s for s in self.served if s.method == "POST" and _is_completion(s.path)]

    @property
    def tokenized(self) -> list[Served]:
        return [s for s in self.served if s.method == "POST" and not _is_completion(s.path)]

    async def run(self, *, task_status: trio.TaskStatus[FakeBackend] = trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            port = listeners[0].socket.getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
            task_status.started(self)

    async def _handle(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        async with stream:
            request = await _read_request(stream, connection)
            if request is None:
                return
            served = Served(request[0], request[1], request[2])
            self.served.append(served)
            reply = self._reply_for(served)
            await _play(stream, connection, reply, served)
            await _drop_next(stream, connection, reply.drops_next)

    def _reply_for(self, served: Served) -> Reply:
        if served.method == "GET" and served.path == "/v1/models":
            if self.models_reply is not None:
                return self.models_reply
            body = json.dumps({"object": "list", "data": self.models}).encode()
            return Reply(steps=(Raw(body),), content_type="application/json")
        if served.method == "POST" and _is_completion(served.path):
            return self.replies.popleft() if self.replies else self.default_reply
        if served.method == "GET" and served.path == "/props" and self.props is not None:
            return _json_reply(self.props)
        if served.method == "POST" and served.path == self.tokenizer:
            answer = _json_reply({"tokens": list(range(_words(served.json)))})
            gate = () if self.tokenizer_gate is None else (Wait(self.tokenizer_gate),)
            return Reply(steps=(*gate, *answer.steps), content_type=answer.content_type)
        return http_error(404, f"no route {served.method} {served.path}")


def _is_completion(path: str) -> bool:
    return path.endswith("completions")


def _json_reply(document: dict[str, Any]) -> Reply:
    return Reply(steps=(Raw(json.dumps(document).encode()),), content_type="application/json")


def _words(request: dict[str, Any]) -> int:
    # llama-server names the text `content`, llama-cpp-python `input`.
    text = request.get("content", request.get("input", ""))
    return len(text.split())


async def _read_request(
    stream: trio.SocketStream, connection: h11.Connection
) -> tuple[str, str, bytes] | None:
    target: tuple[str, str] | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Request):
            target = (event.method.decode(), event.target.decode())
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage) and target is not None:
            return target[0], target[1], bytes(body)
        else:  # the client closed before sending a whole request
            return None


async def _play(
    stream: trio.SocketStream, connection: h11.Connection, reply: Reply, served: Served
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_hang_up, stream, served, nursery.cancel_scope)
        try:
            await _write_reply(stream, connection, reply, served)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            _hung_up(served)
        nursery.cancel_scope.cancel()


async def _drop_next(
    stream: trio.SocketStream, connection: h11.Connection, how: Literal["close", "reset"] | None
) -> None:
    if how is None:
        return
    # The whole next request is read first: a reset under a half-sent body would fail the
    # client's write, not the read this fake is here to fail.
    with contextlib.suppress(h11.ProtocolError):  # the client hung up instead: nothing to drop
        connection.start_next_cycle()
        await _read_request(stream, connection)
    if how == "reset":
        # A zero linger time makes the close a reset (RST) rather than an orderly FIN.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _watch_hang_up(
    stream: trio.SocketStream, served: Served, scope: trio.CancelScope
) -> None:
    # The client sends nothing after its request, so any read that returns is the hang-up.
    try:
        await stream.receive_some(1)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    _hung_up(served)
    scope.cancel()


def _hung_up(served: Served) -> None:
    # Once the last step was played, a client closing is the normal end, not a cancel.
    if not served.finished.is_set():
        served.disconnected.set()


async def _write_reply(
    stream: trio.SocketStream, connection: h11.Connection, reply: Reply, served: Served
) -> None:
    keep = "keep-alive" if reply.drops_next is not None else "close"
    headers = [("content-type", reply.content_type), ("connection", keep)]
    await stream.send_all(connection.send(h11.Response(status_code=reply.status, headers=headers)))
    for step in reply.steps:
        match step:
            case Line(text=text):
                await stream.send_all(connection.send(h11.Data(data=f"{text}\n\n".encode())))
            case Raw(data=raw):
                await stream.send_all(connection.send(h11.Data(data=raw)))
            case Wait(event=event):
                await event.wait()
            case Sleep(seconds=seconds):
                await trio.sleep(seconds)
            case Cut():
                served.finished.set()
                return
    served.finished.set()
    await stream.send_all(connection.send(h11.EndOfMessage()))
