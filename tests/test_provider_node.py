"""The provider node against a minimal fake daemon (a real trio-websocket server) and a fake
backend over real loopback HTTP: registration, challenges, relayed requests, cancels, limits,
heartbeats, model updates, reconnects with backoff, and the drain on SIGTERM.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from protocol import crypto
from protocol.messages import (
    MAX_FRAME_BYTES,
    MULTI_SSE,
    AttestationChallenge,
    AttestationResponse,
    Cancel,
    Heartbeat,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    InferenceResponseChunk,
    ModelInfo,
    ModelsUpdate,
    ProtocolError,
    ProviderMessage,
    Register,
    TemplateRender,
    TrustStatus,
    Usage,
    decode_provider_frame,
    encode,
)
from provider.backend import Backend, open_client
from provider.backoff import GOING_AWAY_JITTER, Backoff
from provider.config import ProviderConfig, node_version
from provider.keys import load_or_create_keys
from provider.node import ProviderNode
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
    empty_reply,
    slow_reply,
    stream_reply,
)

SEED = 1234
TOKEN = "s3cret-provider-token"
CHAT = "/v1/chat/completions"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
M = TypeVar("M")

# The fake daemon ------------------------------------------------------------------------------


@dataclass
class Link:
    """One provider connection as the fake daemon sees it; the test drives it.

    A pump task reads every frame as it arrives, like a real daemon: a peer that stops reading
    would stall trio-websocket's reader and its answers to the node's pings.
    """

    ws: WebSocketConnection
    opened_at: float
    inbox: trio.MemoryReceiveChannel[ProviderMessage]
    heartbeats: list[tuple[float, Heartbeat]] = field(default_factory=list)
    closed_at: float | None = None
    close_reason: CloseReason | None = None
    done: trio.Event = field(default_factory=trio.Event)

    async def send(self, message: Any) -> None:
        await self.ws.send_message(encode(message))

    async def frame(self) -> ProviderMessage:
        """The next frame of any type; ConnectionClosed once the node has closed."""
        try:
            return await self.inbox.receive()
        except trio.EndOfChannel:
            raise ConnectionClosed(self.close_reason) from None

    async def receive(self) -> ProviderMessage:
        """The next frame that is not a heartbeat."""
        while isinstance(message := await self.frame(), Heartbeat):
            pass
        return message

    async def expect(self, kind: type[M]) -> M:
        message = await self.receive()
        assert isinstance(message, kind), message
        return message

    async def next_heartbeat(self) -> Heartbeat:
        message = await self.frame()
        assert isinstance(message, Heartbeat), f"expected a heartbeat, got {message}"
        return message

    async def close(self, code: int, reason: str | None = None) -> None:
        await self.ws.aclose(code, reason)
        self.closed_at = trio.current_time()
        self.done.set()

    async def trust(self, register: Register, extensions: list[str] | None = None) -> None:
        """Challenge the node and check its signature, as the daemon does; `extensions`: the
        ones to acknowledge (None: a daemon from before extensions)."""
        challenge = AttestationChallenge(
            nonce=crypto.new_challenge_nonce(), timestamp=crypto.challenge_timestamp()
        )
        await self.send(challenge)
        answer = await self.expect(AttestationResponse)
        identity = crypto.decode_identity_key(register.identity_key)
        assert answer.nonce == challenge.nonce
        assert crypto.verify_challenge(
            identity, challenge.nonce, challenge.timestamp, answer.signature
        )
        await self.send(TrustStatus(status="trusted", extensions=extensions))


class FakeDaemon:
    def __init__(self) -> None:
        self.url = ""
        self.pump = True  # False: never read the node's frames (a hung daemon)
        self._arrivals, self._links = trio.open_memory_channel[Link](8)

    async def run(self, *, task_status: trio.TaskStatus[FakeDaemon] = trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    self._handle,
                    "127.0.0.1",
                    0,
                    None,
                    max_message_size=MAX_FRAME_BYTES,
                    task_status=task_status,
                )
            )
            self.url = f"ws://127.0.0.1:{server.port}/ws/provider"
            task_status.started(self)

    async def _handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        inbox, frames = trio.open_memory_channel[ProviderMessage](math.inf)
        link = Link(ws, trio.current_time(), frames)
        await self._arrivals.send(link)
        async with trio.open_nursery() as nursery:
            if self.pump:
                nursery.start_soon(self._pump, link, inbox)
            await link.done.wait()  # the connection lives until the test closes it
            nursery.cancel_scope.cancel()

    @staticmethod
    async def _pump(link: Link, inbox: trio.MemorySendChannel[ProviderMessage]) -> None:
        async with inbox:
            while True:
                try:
                    frame = await link.ws.get_message()
                except ConnectionClosed as exc:
                    link.close_reason = exc.reason
                    return
                message = decode_provider_frame(frame)
                assert not isinstance(message, ProtocolError), message.reason
                if isinstance(message, Heartbeat):
                    link.heartbeats.append((trio.current_time(), message))
                await inbox.send(message)

    async def arrival(self) -> Link:
        return await self._links.receive()

    async def connection(self) -> tuple[Link, Register]:
        link = await self.arrival()
        return link, await link.expect(Register)


def sealed(
    register: Register, request_id: str = "r1", body: dict[str, Any] = BODY
) -> tuple[InferenceRequest, crypto.ChunkOpener]:
    plaintext = json.dumps({"endpoint": CHAT, "body": body}).encode()
    payload, opener = crypto.seal_request(plaintext, crypto.decode_public_key(register.public_key))
    return InferenceRequest(request_id=request_id, encrypted_body=payload), opener


# Fixtures -------------------------------------------------------------------------------------


@pytest.fixture
async def backend(nursery: trio.Nursery) -> FakeBackend:
    fake = FakeBackend()
    await nursery.start(fake.run)
    return fake


@pytest.fixture
async def daemon(nursery: trio.Nursery) -> FakeDaemon:
    fake = FakeDaemon()
    await nursery.start(fake.run)
    return fake


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(read_timeout=300) as http:
        yield http


@pytest.fixture
def make_node(tmp_path: Path, backend: FakeBackend, daemon: FakeDaemon, client: httpx.AsyncClient):
    def make(**options: Any) -> ProviderNode:
        config = ProviderConfig(
            coordinator=daemon.url, backend=backend.url, token=TOKEN, state_dir=tmp_path, **options
        )
        keys = load_or_create_keys(tmp_path)
        return ProviderNode(config, keys, Backend(client, backend.url), rng=random.Random(SEED))

    return make


@pytest.fixture
async def run_node(make_node) -> AsyncIterator[Callable[..., Awaitable[ProviderNode]]]:
    """Starts a node; stops it at teardown while the fake daemon still answers its close."""
    async with trio.open_nursery() as nursery:

        async def start(**options: Any) -> ProviderNode:
            node = make_node(**options)
            await nursery.start(node.run)
            return node

        yield start
        nursery.cancel_scope.cancel()


# A session ------------------------------------------------------------------------------------


async def test_full_session_registers_passes_the_challenge_and_relays_a_request(
    backend, daemon, run_node
) -> None:
    backend.script(
        stream_reply(["Hello", " world"], usage={"prompt_tokens": 3, "completion_tokens": 2})
    )
    node = await run_node()
    link, register = await daemon.connection()

    assert register.protocol == 1
    assert register.version == node_version()
    assert register.backend == "llama.cpp"
    assert register.auth_token == TOKEN
    assert register.models == [ModelInfo(id=MODEL)]
    assert register.max_concurrency == 4
    assert (
        crypto.provider_id(crypto.decode_identity_key(register.identity_key))
        == node.keys.provider_id
    )

    await link.trust(register)
    request, opener = sealed(register)
    await link.send(request)
    chunks = []
    while not isinstance(frame := await link.receive(), InferenceComplete):
        assert isinstance(frame, InferenceResponseChunk)
        assert frame.request_id == "r1"
        chunks.append(json.loads(opener.open(frame.encrypted_data).decode().removeprefix("data: ")))
    assert frame == InferenceComplete("r1", Usage(prompt_tokens=3, completion_tokens=2))
    assert [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]] == [
        "",
        "Hello",
        " world",
        None,
    ]
    assert backend.completions[0].json == BODY


# 5 words (5 tokens by the fake's tokenizer) in 24 characters (6 by the estimate).
SAY_HI = {**BODY, "messages": [{"role": "user", "content": "Say hi to everyone here."}]}


async def completed(link: Link, register: Register, request_id: str) -> InferenceComplete:
    """Send one request and read it to its terminal, which must be a completion."""
    request, _ = sealed(register, request_id, SAY_HI)
    await link.send(request)
    while isinstance(frame := await link.receive(), InferenceResponseChunk):
        pass
    assert isinstance(frame, InferenceComplete), frame
    return frame


async def test_a_backend_that_streams_no_usage_has_its_prompt_counted_by_its_tokenizer(
    backend, daemon, run_node
) -> None:
    backend.tokenizer = "/extras/tokenize"  # llama-cpp-python: no usage in its streams
    await run_node()
    link, register = await daemon.connection()
    await link.trust(register)
    frame = await completed(link, register, "r1")
    assert frame == InferenceComplete("r1", Usage(prompt_tokens=5, completion_tokens=2))


async def test_a_backend_without_a_tokenizer_is_asked_once_per_route_across_requests(
    backend, daemon, run_node
) -> None:
    await run_node()
    link, register = await daemon.connection()
    await link.trust(register)
    for n in range(4):
        frame = await completed(link, register, f"r{n}")
        assert frame.usage == Usage(prompt_tokens=6, completion_tokens=2, estimated=True)
    assert [s.path for s in backend.tokenized] == ["/extras/tokenize", "/tokenize"]


async def test_with_the_models_template_the_prompt_is_counted_as_the_backend_renders_it(
    backend, daemon, run_node, tmp_path
) -> None:
    # Not on the virtual clock: the self-check renders in child processes under a real bound.
    template = tmp_path / "chat_template.jinja"
    template.write_text(
        "{% for m in messages %}<turn> {{ m['role'] }} {{ m['content'] }} </turn>\n{% endfor %}"
        "<turn> model"
    )
    backend.tokenizer = "/extras/tokenize"
    await run_node(chat_templates=((MODEL, template),))
    link, register = await daemon.connection()
    await link.trust(register)
    frame = await completed(link, register, "r1")
    # "<turn> user" + 5 words + "</turn>", then "<turn> model": 10 tokens where the text is 5.
    assert frame == InferenceComplete("r1", Usage(prompt_tokens=10, completion_tokens=2))
    (count,) = backend.tokenized
    assert count.json["input"] == "<turn> user Say hi to everyone here. </turn>\n<turn> model"


# All of a reply's lines in one write: the node reads them together.
TOGETHER = [*content_lines(["Hello", " world"]), data(chunk(finish_reason="stop"))]
TOGETHER_REPLY = Reply(
    steps=(Raw("".join(f"{line.text}\n\n" for line in [*TOGETHER, DONE]).encode()),)
)


async def _relayed_frames(link: Link, register: Register) -> list[str]:
    """The plaintexts of the chunk frames of one request, until its `inference_complete`."""
    request, opener = sealed(register)
    await link.send(request)
    texts = []
    while not isinstance(frame := await link.receive(), InferenceComplete):
        assert isinstance(frame, InferenceResponseChunk)
        texts.append(opener.open(frame.encrypted_data).decode())
    return texts


async def test_with_multi_sse_acknowledged_lines_read_together_share_a_frame(
    backend, daemon, run_node
) -> None:
    backend.script(TOGETHER_REPLY)
    await run_node()
    link, register = await daemon.connection()
    assert register.extensions == [MULTI_SSE]
    await link.trust(register, extensions=[MULTI_SSE])
    texts = await _relayed_frames(link, register)
    assert "\n".join(texts).split("\n") == [line.text for line in TOGETHER]
    assert len(texts) < len(TOGETHER)


async def test_without_the_acknowledgement_each_line_is_its_own_frame(
    backend, daemon, run_node
) -> None:
    # A daemon from before the extension: its trust_status never acknowledges one.
    backend.script(TOGETHER_REPLY)
    await run_node()
    link, register = await daemon.connection()
    await link.trust(register)
    assert await _relayed_frames(link, register) == [line.text for line in TOGETHER]


async def test_heartbeats_every_five_seconds_with_active_requests(
    daemon, run_node, autojump_clock
) -> None:
    await run_node()
    link, _ = await daemon.connection()
    beats = [await link.next_heartbeat() for _ in range(4)]
    assert [t for t, _ in link.heartbeats] == [0.0, 5.0, 10.0, 15.0]
    assert all(beat == Heartbeat(active_requests=0, status="ok") for beat in beats)


async def test_a_request_over_the_limit_is_refused_with_503_at_once(
    backend, daemon, run_node
) -> None:
    gate = trio.Event()
    backend.script(slow_reply(gate))
    await run_node(max_concurrency=1)
    link, register = await daemon.connection()
    first, _ = sealed(register, "r1")
    second, _ = sealed(register, "r2")
    await link.send(first)
    assert (await link.expect(InferenceResponseChunk)).request_id == "r1"
    await link.send(second)
    while isinstance(refused := await link.receive(), InferenceResponseChunk):
        assert refused.request_id == "r1"  # r1's second chunk may come first
    assert refused == InferenceError(
        "r2", "provider at its concurrency limit (1)", 503, "at_capacity"
    )
    gate.set()
    while not isinstance(frame := await link.receive(), InferenceComplete):
        assert isinstance(frame, InferenceResponseChunk)
        assert frame.request_id == "r1"
    assert len(backend.completions) == 1


async def test_cancel_aborts_the_backend_request_and_frees_the_slot(
    backend, daemon, run_node
) -> None:
    gate = trio.Event()
    backend.script(slow_reply(gate), stream_reply(["again"]))
    await run_node(max_concurrency=1)
    link, register = await daemon.connection()
    request, _ = sealed(register, "r1")
    await link.send(request)
    await link.expect(InferenceResponseChunk)
    await link.send(Cancel(request_id="r1"))
    with trio.fail_after(5):  # a guard against a hang, not a timing assertion
        await backend.completions[0].disconnected.wait()
    # The slot is free: the next request is served. r1 may have had a chunk in flight when
    # the cancel left, but it never gets a terminal.
    retry, _ = sealed(register, "r2")
    await link.send(retry)
    frames = []
    while not isinstance(frame := await link.receive(), InferenceComplete):
        frames.append(frame)
    assert frame.request_id == "r2"
    assert all(isinstance(f, InferenceResponseChunk) for f in frames)


async def test_a_changed_model_list_is_advertised_at_the_next_poll(
    backend, daemon, run_node, autojump_clock
) -> None:
    await run_node(vision=frozenset({"llava"}))
    link, register = await daemon.connection()
    assert register.models == [ModelInfo(id=MODEL)]
    backend.set_models(MODEL, "llava")
    update = await link.expect(ModelsUpdate)
    assert trio.current_time() == 30.0
    assert update.models == [ModelInfo(id=MODEL), ModelInfo(id="llava", is_vision=True)]


async def test_an_unchanged_model_list_is_not_readvertised(
    daemon, run_node, autojump_clock
) -> None:
    await run_node()
    link, _ = await daemon.connection()
    with trio.move_on_after(95):
        frame = await link.receive()
        raise AssertionError(f"unexpected {frame}")
    assert len(link.heartbeats) == 19  # t = 0, 5, ..., 90: the session stayed quiet and alive


async def test_a_chat_template_verdict_is_advertised_with_an_explicit_false(
    daemon, run_node, tmp_path
) -> None:
    # Not on the virtual clock: the self-check renders in child processes under a real bound.
    template = tmp_path / "chat_template.jinja"
    template.write_text(
        "{% if tools %}{{ raise_exception('this template takes no tools') }}{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    await run_node(chat_templates=((MODEL, template),))
    _, register = await daemon.connection()
    render = TemplateRender(base=True, tools=False)
    assert register.models == [
        ModelInfo(id=MODEL, template_render_ok=False, template_render=render)
    ]


# A prompt longer than the model's context ---------------------------------------------------


async def terminal(link: Link) -> InferenceComplete | InferenceError:
    """The request's terminal, past the boilerplate chunks a broken stream may still carry."""
    while isinstance(frame := await link.receive(), InferenceResponseChunk):
        pass
    assert isinstance(frame, InferenceComplete | InferenceError), frame
    return frame


async def test_llama_cpp_python_breaking_off_on_an_over_long_prompt_is_a_400_not_a_fault(
    backend, daemon, run_node
) -> None:
    # llama-cpp-python reports no context size: the operator names it, as its --n_ctx.
    backend.models[0]["owned_by"] = "me"
    backend.tokenizer = "/extras/tokenize"
    backend.script(empty_reply(), cut_reply(pieces=()), empty_reply())
    await run_node(context_lengths=((MODEL, 64),))
    link, register = await daemon.connection()
    assert register.models == [ModelInfo(id=MODEL, context_length=64)]
    await link.trust(register)
    long_body = {**BODY, "messages": [{"role": "user", "content": " ".join(["w"] * 80)}]}

    for request_id in ("empty", "reset"):
        request, _ = sealed(register, request_id, long_body)
        await link.send(request)
        failure = await terminal(link)
        assert isinstance(failure, InferenceError)
        assert (failure.request_id, failure.status_code, failure.error_reason) == (
            request_id,
            400,
            "context_length_exceeded",
        )
        assert "80 tokens" in failure.error

    # The same empty answer to a prompt that fits is what it was: the backend failed.
    short, _ = sealed(register, "short")
    await link.send(short)
    assert await terminal(link) == InferenceError(
        "short", "backend sent no events (empty response)", 502, "empty_response"
    )


async def test_a_llama_cpp_python_model_of_unknown_context_is_warned_about_once(
    backend, daemon, run_node, caplog, autojump_clock
) -> None:
    backend.models[0]["owned_by"] = "me"
    await run_node()
    link, _ = await daemon.connection()
    await link.next_heartbeat()
    with trio.move_on_after(65):  # two more model polls
        await link.receive()
    hints = [r for r in caplog.records if "--context-length fake-model=N" in r.getMessage()]
    assert len(hints) == 1
    assert hints[0].levelno == logging.WARNING


async def test_llama_server_context_size_is_read_from_props_and_advertised(
    backend, daemon, run_node
) -> None:
    backend.props = {"default_generation_settings": {"n_ctx": 4096}, "total_slots": 4}
    await run_node()
    _, register = await daemon.connection()
    assert register.models == [ModelInfo(id=MODEL, context_length=4096)]


# Reconnects -----------------------------------------------------------------------------------


async def test_a_rejected_token_is_logged_and_retried_with_backoff(
    daemon, run_node, caplog, autojump_clock
) -> None:
    caplog.set_level(logging.INFO)
    await run_node()
    expected = Backoff(random.Random(SEED))
    previous: Link | None = None
    for _ in range(4):
        link, _ = await daemon.connection()
        if previous is not None:
            assert previous.closed_at is not None
            assert link.opened_at - previous.closed_at == pytest.approx(
                expected.next_delay(), abs=1e-9
            )
        await link.send(TrustStatus(status="rejected", reason="unknown provider token"))
        await link.close(1008, "authentication failed")
        previous = link
    rejections = [r for r in caplog.records if "unknown provider token" in r.getMessage()]
    assert any(r.levelno == logging.ERROR and "check --token" in r.getMessage() for r in rejections)
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (4001, "another node with this identity key connected"),
        (4002, "heard nothing from this node"),
        (1001, "daemon is shutting down"),
        (1008, "policy violation"),
    ],
)
async def test_the_log_says_why_the_daemon_closed(
    daemon, run_node, caplog, autojump_clock, code, words
) -> None:
    caplog.set_level(logging.INFO)
    await run_node()
    link, _ = await daemon.connection()
    await link.close(code)
    await daemon.connection()  # it reconnects
    assert words in caplog.text


async def test_an_unreachable_daemon_is_retried_forever_on_the_backoff_schedule(
    backend, client, tmp_path, caplog, autojump_clock
) -> None:
    caplog.set_level(logging.INFO)
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/ws/provider"
    config = ProviderConfig(coordinator=url, backend=backend.url, state_dir=tmp_path)
    keys = load_or_create_keys(tmp_path)
    node = ProviderNode(config, keys, Backend(client, backend.url), rng=random.Random(SEED))
    with trio.move_on_after(300):
        await node.run()
    attempts, schedule, at = 1, Backoff(random.Random(SEED)), 0.0
    while (at := at + schedule.next_delay()) < 300:
        attempts += 1
    failures = [r.getMessage() for r in caplog.records if "daemon unreachable" in r.getMessage()]
    assert len(failures) == attempts
    assert f"cannot connect to 127.0.0.1:{port}" in failures[0]


async def test_a_daemon_that_stops_answering_pings_is_left_and_redialed(
    daemon, run_node, caplog, autojump_clock
) -> None:
    caplog.set_level(logging.INFO)
    daemon.pump = False  # the fake stops reading, so its WebSocket answers no ping
    await run_node()
    first = await daemon.arrival()
    second = await daemon.arrival()
    assert "no answer to a WebSocket ping within 20 s" in caplog.text
    # The first ping leaves at 15 s and is given up at 35 s; closing politely gets 5 s more.
    delay = Backoff(random.Random(SEED)).next_delay()
    assert second.opened_at - first.opened_at == pytest.approx(35 + 5 + delay, abs=1e-9)


async def test_a_session_that_stayed_up_resets_the_backoff(
    run_node, daemon, autojump_clock
) -> None:
    await run_node()
    expected = Backoff(random.Random(SEED))
    for _ in range(3):  # three quick failures climb the schedule to a 4 s ceiling
        link, _ = await daemon.connection()
        await link.close(4002)
        expected.next_delay()
    link, _ = await daemon.connection()
    await trio.sleep(32)  # past the 30 s that prove the daemon works (and off the ping beat)
    await link.close(4002)
    expected.session_ended(uptime=32)
    closed_at = link.closed_at
    link, _ = await daemon.connection()
    assert closed_at is not None
    assert expected.attempt == 0
    assert link.opened_at - closed_at == pytest.approx(expected.next_delay(), abs=1e-9)


async def test_a_1001_moves_the_node_within_a_second_whatever_the_schedule(
    run_node, daemon, autojump_clock
) -> None:
    """A deploy or a rebalance (docs/cluster.md): the balancer sends the node elsewhere."""
    await run_node()
    expected = Backoff(random.Random(SEED))
    for _ in range(3):  # three quick failures climb the schedule to a 4 s ceiling
        link, _ = await daemon.connection()
        await link.close(4002)
        expected.next_delay()
    link, _ = await daemon.connection()
    await trio.sleep(5)  # a young session, far from the 30 s that reset the schedule
    await link.close(1001, "rebalancing")
    closed_at = link.closed_at
    link, _ = await daemon.connection()
    assert closed_at is not None
    delay = expected.going_away(uptime=5)
    assert link.opened_at - closed_at == pytest.approx(delay, abs=1e-9)
    assert delay <= GOING_AWAY_JITTER and expected.attempt == 0
    # Sent away again the moment it arrived (a draining daemon still in the balancer):
    # that is a failure to find a home, on the schedule.
    await link.close(1001, "daemon shutting down")
    closed_at = link.closed_at
    link, _ = await daemon.connection()
    assert closed_at is not None
    assert link.opened_at - closed_at == pytest.approx(expected.going_away(0), abs=1e-9)
    assert expected.attempt == 1


# Draining -------------------------------------------------------------------------------------


async def test_drain_finishes_in_flight_requests_then_closes_going_away(
    backend, daemon, make_node, nursery
) -> None:
    gate = trio.Event()
    backend.script(slow_reply(gate))
    node = make_node()
    stopped = trio.Event()

    async def run() -> None:
        await node.run()
        stopped.set()

    nursery.start_soon(run)
    link, register = await daemon.connection()
    request, _ = sealed(register, "r1")
    await link.send(request)
    await link.expect(InferenceResponseChunk)
    node.drain()
    while not isinstance(frame := await link.frame(), Heartbeat):
        assert isinstance(frame, InferenceResponseChunk)  # r1 streams on meanwhile
    assert frame == Heartbeat(active_requests=1, status="draining")
    late, _ = sealed(register, "r2")
    await link.send(late)
    refusal = InferenceError("r2", "provider is draining", 503, "draining")
    while (frame := await link.receive()) != refusal:
        assert isinstance(frame, InferenceResponseChunk)  # r1 streams on meanwhile
    gate.set()
    while not isinstance(frame := await link.receive(), InferenceComplete):
        assert isinstance(frame, InferenceResponseChunk)
        assert frame.request_id == "r1"
    with pytest.raises(ConnectionClosed) as closed:
        await link.receive()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1001
    await stopped.wait()  # the node returns by itself: no reconnect after a drain
    assert backend.completions[0].finished.is_set()


async def test_drain_gives_up_on_stuck_requests_after_the_grace(
    backend, daemon, make_node, nursery, autojump_clock
) -> None:
    backend.script(slow_reply(trio.Event()))  # never released
    node = make_node(drain_grace=12.0)
    stopped = trio.Event()

    async def run() -> None:
        await node.run()
        stopped.set()

    nursery.start_soon(run)
    link, register = await daemon.connection()
    request, _ = sealed(register)
    await link.send(request)
    await link.expect(InferenceResponseChunk)
    start = trio.current_time()
    node.drain()
    with pytest.raises(ConnectionClosed):
        while True:
            await link.receive()
    await stopped.wait()
    assert trio.current_time() - start == 12.0
    await backend.completions[0].disconnected.wait()  # the abandoned stream was closed


# The process ----------------------------------------------------------------------------------

PROVIDER_MAIN = (
    "import argparse, sys\n"
    "from provider.cli import add_subcommand\n"
    "parser = argparse.ArgumentParser(prog='dinfer')\n"
    "add_subcommand(parser.add_subparsers(dest='command'))\n"
    "args = parser.parse_args(['provider'])\n"
    "sys.exit(args.run(args))\n"
)


async def test_the_provider_process_prints_its_id_and_drains_on_sigterm(
    backend, daemon, nursery, tmp_path
) -> None:
    env = {
        **os.environ,
        "DINFER_PROVIDER_COORDINATOR": daemon.url,
        "DINFER_PROVIDER_BACKEND": backend.url,
        "DINFER_PROVIDER_STATE_DIR": str(tmp_path / "state"),
        "DINFER_PROVIDER_TOKEN": TOKEN,
    }
    command = [sys.executable, "-c", PROVIDER_MAIN]
    process = await nursery.start(
        functools.partial(trio.run_process, command, env=env, stdout=subprocess.PIPE, check=False)
    )
    with trio.fail_after(30):  # a guard against a hang: the child needs real time to start
        link, register = await daemon.connection()
        printed = await process.stdout.receive_some()
        process.send_signal(signal.SIGTERM)
        while (beat := await link.next_heartbeat()).status == "ok":
            pass
        assert beat == Heartbeat(active_requests=0, status="draining")
        with pytest.raises(ConnectionClosed) as closed:
            await link.receive()
        assert await process.wait() == 0
    identity = crypto.decode_identity_key(register.identity_key)
    assert f"provider id {crypto.provider_id(identity)}" in printed.decode()
    assert closed.value.reason is not None and closed.value.reason.code == 1001
