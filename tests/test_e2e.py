"""End to end with a real model: the daemon, provider nodes and llama-cpp-python.

Every process is real and started by `scripts/localnet.py`: Gemma 3 270M served by
llama-cpp-python, `dinfer serve`, `dinfer provider`; faults are real too (a model server killed
with SIGKILL). The model is a *base* model: its words are gibberish and differ from run to run,
so the tests assert the shape of what a consumer sees (status, content present, finish reason,
usage, the serving provider, how a stream ends), never the words. Every request sets
`max_tokens` and forbids the end-of-turn tokens, so an answer is exactly as long as asked.

Each test starts its own small network (a few seconds); the model file is written once per
checkout under `.dinfer/e2e-cache`. When a test fails, the tails of every process's log are
printed. Run with `.venv/bin/pytest -m e2e tests/test_e2e.py`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar
from unittest.mock import ANY

import httpx
import openai
import pytest
import trio
from openai.types.chat import ChatCompletionMessageParam

REPO: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import localnet  # noqa: E402
from localnet import MODEL_ALIAS, Backend, Daemon, ProviderNode  # noqa: E402

pytestmark = pytest.mark.e2e

T = TypeVar("T")
CACHE: Final = REPO / ".dinfer" / "e2e-cache"
# Gemma 3's <eos> (1) and <end_of_turn> (106): a base model may otherwise stop at any token,
# and a test about a long generation needs it to run as long as asked.
NO_EOS: Final = {"1": -100, "106": -100}
HELLO: Final[list[ChatCompletionMessageParam]] = [
    {"role": "user", "content": "Count from one to one thousand."}
]
# The longest any one request may take here; real answers take well under a second or two.
BOUND_S: Final = 30.0
LONG_TOKENS: Final = 1500
LOG_TAIL_LINES: Final = 30


# The network ---------------------------------------------------------------------------------


@dataclass
class Net:
    """Starts the processes of one test in the test's nursery; logs go to `logs`."""

    nursery: trio.Nursery
    model: Path
    logs: Path

    async def backend(self, name: str, *, n_threads: int) -> Backend:
        start = partial(localnet.run_model_server, n_threads=n_threads)
        backend: Backend = await self.nursery.start(
            start, self.model, localnet.free_port(), self._log(name)
        )
        return backend

    async def daemon(self, env: dict[str, str] | None = None) -> Daemon:
        daemon: Daemon = await self.nursery.start(
            localnet.run_daemon, self.logs / "daemon", self._log("daemon"), env
        )
        return daemon

    async def node(self, daemon: Daemon, backend: Backend, name: str, *args: str) -> ProviderNode:
        # No drain grace: at the end of a test the node must stop at once, not finish requests.
        node: ProviderNode = await self.nursery.start(
            localnet.run_provider,
            daemon,
            backend.url,
            self.logs / name,
            self._log(name),
            ["--drain-grace", "0", *args],
        )
        return node

    def _log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


@asynccontextmanager
async def open_net(model: Path, logs: Path) -> AsyncIterator[Net]:
    """A nursery for a test's processes; on any failure, print the tail of every log."""
    try:
        async with trio.open_nursery() as nursery:
            yield Net(nursery, model, logs)
            nursery.cancel_scope.cancel(reason="test over")
    except BaseException:
        print_log_tails(logs)
        raise


def print_log_tails(logs: Path) -> None:
    for log in sorted(logs.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        print(f"----- {log.name} (last {len(lines)} lines) -----", *lines, sep="\n")


@dataclass
class Pair:
    """A daemon with two provider nodes, each in front of its own model server."""

    daemon: Daemon
    nodes: tuple[ProviderNode, ProviderNode]
    backends: tuple[Backend, Backend]

    def backend_of(self, provider_id: str) -> Backend:
        (backend,) = (
            b
            for n, b in zip(self.nodes, self.backends, strict=True)
            if n.provider_id == provider_id
        )
        return backend

    def other_than(self, provider_id: str) -> ProviderNode:
        (node,) = (n for n in self.nodes if n.provider_id != provider_id)
        return node


async def start_pair(net: Net) -> Pair:
    # Two servers share the machine's two cores: one thread each.
    backends = (
        await net.backend("model-a", n_threads=1),
        await net.backend("model-b", n_threads=1),
    )
    daemon = await net.daemon()
    nodes = (
        await net.node(daemon, backends[0], "node-a"),
        await net.node(daemon, backends[1], "node-b"),
    )
    return Pair(daemon, nodes, backends)


async def kill(backend: Backend) -> None:
    """SIGKILL: the model server vanishes mid-whatever, as when it crashes or is OOM-killed."""
    backend.process.kill()
    with trio.fail_after(BOUND_S):
        await backend.process.wait()


@pytest.fixture(scope="session")
def model() -> Path:
    return localnet.model_file(CACHE)


# The consumer --------------------------------------------------------------------------------


def chat(max_tokens: int, *, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL_ALIAS,
        "messages": HELLO,
        "max_tokens": max_tokens,
        "logit_bias": NO_EOS,
        "stream": stream,
    }


@dataclass
class Consumer:
    client: httpx.AsyncClient

    async def complete(self, max_tokens: int) -> httpx.Response:
        with trio.fail_after(BOUND_S):
            return await self.client.post(
                "/v1/chat/completions", json=chat(max_tokens, stream=False)
            )

    @asynccontextmanager
    async def stream(self, max_tokens: int) -> AsyncIterator[Sse]:
        body = chat(max_tokens, stream=True)
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            sse = Sse(response)
            try:
                yield sse
            finally:
                await sse.finish()


@asynccontextmanager
async def consumer(daemon: Daemon) -> AsyncIterator[Consumer]:
    key = await daemon.create_key("e2e")
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=daemon.url, headers=headers, timeout=BOUND_S, trust_env=False
    ) as client:
        yield Consumer(client)


class Sse:
    """The `data:` payloads of a streamed answer, read one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    @property
    def provider_id(self) -> str:
        return self.response.headers["x-provider-id"]

    async def next_data(self) -> str | None:
        with trio.fail_after(BOUND_S):
            async for line in self._lines:
                if line.startswith("data: "):
                    return line.removeprefix("data: ")
        return None

    async def first_content(self) -> str:
        """Read up to and including the first chunk that carries content; return its text."""
        while (data := await self.next_data()) is not None:
            if text := content_of(data):
                return text
        raise AssertionError("the stream ended before any content")

    async def rest(self) -> list[str]:
        payloads = []
        while (data := await self.next_data()) is not None:
            payloads.append(data)
        return payloads

    async def finish(self) -> None:
        # httpx's line reader is a chain of async generators; a cancelled read ends every one
        # of them, where leaving them suspended would have Trio warn when they are collected.
        with trio.CancelScope() as scope:
            scope.cancel(reason="done reading")
            async for _ in self._lines:
                pass


def content_of(data: str) -> str:
    if data == "[DONE]":
        return ""
    choices = json.loads(data).get("choices") or [{}]
    content: str = (choices[0].get("delta") or {}).get("content") or ""
    return content


def assert_whole_answer(response: httpx.Response, max_tokens: int) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    (choice,) = body["choices"]
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert_usage(body["usage"], max_tokens)


def assert_usage(usage: dict[str, Any], max_tokens: int) -> None:
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# The openai SDK ------------------------------------------------------------------------------


async def with_sdk(daemon: Daemon, call: Callable[[openai.OpenAI], T]) -> T:
    """Run `call` with the synchronous SDK client in a worker thread.

    The async client leaks its stream's async generators under Trio (see test_openai_sdk).
    """
    key = await daemon.create_key("e2e-sdk")

    def run() -> T:
        with openai.OpenAI(
            base_url=f"{daemon.url}/v1", api_key=key, max_retries=0, timeout=BOUND_S
        ) as client:
            return call(client)

    with trio.fail_after(BOUND_S):
        return await trio.to_thread.run_sync(run)


@dataclass
class SdkAnswer:
    status: int
    provider_id: str
    text: str
    finish_reasons: list[str]
    usage: dict[str, Any]


def sdk_complete(client: openai.OpenAI, max_tokens: int) -> SdkAnswer:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ALIAS, messages=HELLO, max_tokens=max_tokens, logit_bias=NO_EOS
    )
    completion = raw.parse()
    (choice,) = completion.choices
    assert completion.usage is not None
    return SdkAnswer(
        raw.status_code,
        raw.headers["x-provider-id"],
        choice.message.content or "",
        [choice.finish_reason],
        completion.usage.model_dump(),
    )


def sdk_stream(client: openai.OpenAI, max_tokens: int) -> SdkAnswer:
    with client.chat.completions.with_streaming_response.create(
        model=MODEL_ALIAS,
        messages=HELLO,
        max_tokens=max_tokens,
        logit_bias=NO_EOS,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        chunks = list(response.parse())
        usage = chunks[-1].usage
        assert usage is not None, "the last chunk carries the usage"
        choices = [choice for chunk in chunks for choice in chunk.choices]
        return SdkAnswer(
            response.status_code,
            response.headers["x-provider-id"],
            "".join(choice.delta.content or "" for choice in choices),
            [choice.finish_reason for choice in choices if choice.finish_reason],
            usage.model_dump(),
        )


# The tests -----------------------------------------------------------------------------------


async def test_the_openai_sdk_gets_whole_and_streamed_answers(model: Path, tmp_path: Path) -> None:
    async with open_net(model, tmp_path) as net:
        pair = await start_pair(net)
        served_by = {node.provider_id for node in pair.nodes}
        for ask in (sdk_complete, sdk_stream):
            answer = await with_sdk(pair.daemon, partial(ask, max_tokens=16))
            assert answer.status == 200
            assert answer.provider_id in served_by
            assert answer.text
            assert answer.finish_reasons == ["length"]
            assert_usage(answer.usage, max_tokens=16)


async def test_a_streamed_messages_request_is_anthropic_s_event_sequence(
    model: Path, tmp_path: Path
) -> None:
    """`POST /v1/messages` through the real model: the events' shape, a text block with text."""
    async with open_net(model, tmp_path) as net:
        backend = await net.backend("model", n_threads=2)
        daemon = await net.daemon()
        node = await net.node(daemon, backend, "node")
        key = await daemon.create_key("e2e-messages")
        body = {"model": MODEL_ALIAS, "max_tokens": 16, "stream": True, "messages": HELLO}
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
        async with httpx.AsyncClient(
            base_url=daemon.url, headers=headers, timeout=BOUND_S, trust_env=False
        ) as client:
            with trio.fail_after(BOUND_S):
                response = await client.post("/v1/messages", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-provider-id"] == node.provider_id
    events = [
        json.loads(block.split("\ndata: ", 1)[1]) for block in response.text.split("\n\n")[:-1]
    ]
    kinds = [event["type"] for event in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert set(kinds[3:-2]) <= {"content_block_start", "content_block_delta", "content_block_stop"}
    assert kinds.count("content_block_start") == kinds.count("content_block_stop")
    assert events[0]["message"]["usage"]["input_tokens"] > 0
    text = "".join(
        event["delta"].get("text", "") for event in events if event["type"] == "content_block_delta"
    )
    assert events[2]["content_block"]["type"] == "text" and text
    ended = events[-2]
    assert ended["delta"]["stop_reason"] in {"max_tokens", "end_turn"}
    assert 0 < ended["usage"]["output_tokens"] <= 16
    assert ended["usage"]["input_tokens"] > 0


async def test_a_dead_backend_is_invisible_to_consumers(model: Path, tmp_path: Path) -> None:
    async with open_net(model, tmp_path) as net:
        backend_a = await net.backend("model-a", n_threads=1)
        backend_b = await net.backend("model-b", n_threads=1)
        # One failure puts a provider in cooldown, so the admin view shows that A was tried.
        daemon = await net.daemon({"DINFER_BREAKER_THRESHOLD": "1"})
        node_a = await net.node(daemon, backend_a, "node-a")
        async with consumer(daemon) as user:
            # A served once and is measured fast; B, unmeasured, is estimated at the daemon's
            # slow default, so the next request goes to A first.
            warm = await user.complete(32)
            assert warm.headers["x-provider-id"] == node_a.provider_id
            node_b = await net.node(daemon, backend_b, "node-b")
            await kill(backend_a)

            for _ in range(2):
                answer = await user.complete(64)
                assert_whole_answer(answer, 64)
                assert answer.headers["x-provider-id"] == node_b.provider_id
                async with user.stream(64) as sse:
                    assert sse.response.status_code == 200
                    assert sse.provider_id == node_b.provider_id
                    assert await sse.first_content()
                    rest = await sse.rest()
                    assert rest[-1] == "[DONE]"
                    assert not any('"error"' in data for data in rest)

            cooldowns = {p["provider_id"]: p["cooldowns"] for p in await daemon.providers()}
            assert cooldowns[node_a.provider_id] == [
                {"model": MODEL_ALIAS, "shape": "base", "until": ANY, "seconds_left": ANY}
            ], "the first request after the kill was tried on A, and failed over to B"
            assert cooldowns[node_b.provider_id] == []


async def test_a_backend_killed_mid_stream_ends_it_with_an_in_band_error(
    model: Path, tmp_path: Path
) -> None:
    async with open_net(model, tmp_path) as net:
        pair = await start_pair(net)
        async with consumer(pair.daemon) as user, user.stream(LONG_TOKENS) as sse:
            assert sse.response.status_code == 200
            assert await sse.first_content()
            await kill(pair.backend_of(sse.provider_id))
            *content, error, done = await sse.rest()

            assert done == "[DONE]"
            assert json.loads(error)["error"]["type"] == "provider_error"
            assert json.loads(error)["error"]["message"]
            events = [json.loads(data) for data in content]
            assert all("error" not in event for event in events)
            assert all(
                choice.get("finish_reason") is None for e in events for choice in e["choices"]
            ), "the answer was cut short: nothing may say it finished"


async def test_a_consumer_hanging_up_stops_the_generation(model: Path, tmp_path: Path) -> None:
    async with open_net(model, tmp_path) as net:
        backend = await net.backend("model", n_threads=2)
        daemon = await net.daemon()
        await net.node(daemon, backend, "node", "--max-concurrency", "1")
        async with consumer(daemon) as user:
            per_token_s = await seconds_per_token(user)
            long_generation_s = LONG_TOKENS * per_token_s

            async with user.stream(LONG_TOKENS) as sse:
                assert await sse.first_content()
            # The backend serves one request at a time: unless the hang-up stopped the long
            # generation, this short one waits for it to end.
            started = time.monotonic()
            answer = await user.complete(4)
            elapsed = time.monotonic() - started

            assert_whole_answer(answer, 4)
            assert elapsed < long_generation_s / 5, (
                f"a 4-token answer took {elapsed:.1f} s; the abandoned generation of "
                f"{LONG_TOKENS} tokens would take about {long_generation_s:.0f} s"
            )
    print(f"4-token answer after a hang-up: {elapsed:.2f} s; {1 / per_token_s:.0f} tokens/s")


async def seconds_per_token(user: Consumer) -> float:
    """The backend's decoding speed: time between the first and last content of a stream."""
    async with user.stream(64) as sse:
        await sse.first_content()
        first = time.monotonic()
        tokens = sum(1 for data in await sse.rest() if content_of(data))
        return (time.monotonic() - first) / tokens


# ~3000 tokens (3001 by the model's tokenizer, 3009 with the chat template) for a 2048 context:
# the daemon's estimate (characters / 4) sees it too, and refuses it before any provider.
OVER_LONG: Final[list[ChatCompletionMessageParam]] = [
    {"role": "user", "content": " ".join(["word"] * 3000)}
]
# Digits tokenize one by one: about 2 tokens per 2 characters, four times the daemon's
# estimate, so this prompt passes the daemon's check and only the node can tell.
SLIPS_PAST_THE_ESTIMATE: Final[list[ChatCompletionMessageParam]] = [
    {"role": "user", "content": " 7" * 2600}
]


@asynccontextmanager
async def one_llama_cpp_python_provider(model: Path, logs: Path) -> AsyncIterator[Consumer]:
    """The only provider, cooled down by a single strike, its context given as the server's."""
    async with open_net(model, logs) as net:
        backend = await net.backend("model", n_threads=2)
        daemon = await net.daemon({"DINFER_BREAKER_THRESHOLD": "1"})
        node = await net.node(daemon, backend, "node")  # localnet gives it the context size
        async with consumer(daemon) as user:
            yield user
            cooldowns = {p["provider_id"]: p["cooldowns"] for p in await daemon.providers()}
            assert cooldowns[node.provider_id] == [], "a request's own fault is no strike"


async def ask_over_long(
    user: Consumer, *, stream: bool, messages: list[ChatCompletionMessageParam] = OVER_LONG
) -> httpx.Response:
    body = {**chat(8, stream=stream), "messages": messages}
    with trio.fail_after(BOUND_S):
        return await user.client.post("/v1/chat/completions", json=body)


async def test_a_prompt_longer_than_the_context_is_the_consumers_400_not_a_strike(
    model: Path, tmp_path: Path
) -> None:
    # llama-cpp-python fails an over-long prompt after its 200 headers (an empty body, then a
    # dropped connection): only the node, knowing the context, can tell it was the prompt.
    async with one_llama_cpp_python_provider(model, tmp_path) as user:
        for stream in (True, False):
            answer = await ask_over_long(user, stream=stream, messages=SLIPS_PAST_THE_ESTIMATE)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert (error["type"], error["code"]) == (
                "invalid_request_error",
                "context_length_exceeded",
            )
            assert "the model's context is 2048" in error["message"]
            assert "the backend ended the stream without an answer" in error["message"]
        assert_whole_answer(await user.complete(8), 8)


async def test_a_prompt_the_daemon_can_see_is_too_long_is_refused_before_any_provider(
    model: Path, tmp_path: Path
) -> None:
    async with one_llama_cpp_python_provider(model, tmp_path) as user:
        answer = await ask_over_long(user, stream=True)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert "2048 tokens" in error["message"]
        assert "x-provider-id" not in answer.headers
        assert_whole_answer(await user.complete(8), 8)


SAY_HI: Final[list[ChatCompletionMessageParam]] = [{"role": "user", "content": "Say hi."}]


async def streamed_payloads(user: Consumer, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with user.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        sse = Sse(response)
        try:
            payloads = await sse.rest()
        finally:
            await sse.finish()
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


async def say_hi(user: Consumer) -> tuple[list[dict[str, Any]], httpx.Response]:
    """ "Say hi." streamed with usage, then whole: the parsed chunks and the whole answer."""
    body = {**chat(4, stream=True), "messages": SAY_HI}
    with trio.fail_after(BOUND_S):
        streamed = await streamed_payloads(
            user, {**body, "stream_options": {"include_usage": True}}
        )
        whole = await user.client.post("/v1/chat/completions", json={**body, "stream": False})
    finishes = [c["finish_reason"] for chunk in streamed for c in chunk["choices"]]
    assert finishes[-1] == "length"  # counting after the stream never cut it short
    return streamed, whole


async def server_count(url: str, **request: Any) -> int:
    """The model server's own count: its tokenizer, or its usage of a whole answer."""
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=BOUND_S) as direct:
        if "input" in request:
            answer = await direct.post("/extras/tokenize", json=request)
            return len(answer.json()["tokens"])
        answer = await direct.post("/v1/chat/completions", json=request)
        count: int = answer.json()["usage"]["prompt_tokens"]
        return count


@pytest.mark.parametrize("template", [True, False], ids=["with-template", "text-only"])
async def test_a_prompt_streamed_without_usage_is_counted_by_the_models_tokenizer(
    model: Path, tmp_path: Path, template: bool
) -> None:
    # llama-cpp-python streams no usage; "Say hi." is 2 tokens by characters / 4. Given the
    # model's chat template the node counts the prompt as the server does (12 for Gemma 3);
    # without it, the server's tokenizer counts the text alone (4, with BOS).
    # The GGUF carries no template (the server is run with --chat_format gemma): this is the
    # same one as Jinja.
    gemma = REPO / "tests" / "data" / "templates" / "gemma3-it.jinja"
    args = ["--chat-template", f"{MODEL_ALIAS}={gemma}"] if template else []
    async with open_net(model, tmp_path) as net:
        backend = await net.backend("model", n_threads=2)
        # A test of counting, not of deadlines: a loaded machine must not time out its answer.
        daemon = await net.daemon({"DINFER_TTFT_BASE_S": str(BOUND_S)})
        await net.node(daemon, backend, "node", *args)
        async with consumer(daemon) as user:
            streamed, whole = await say_hi(user)
        if template:
            request = {"model": MODEL_ALIAS, "messages": SAY_HI, "max_tokens": 1}
            expected = await server_count(backend.url, **request)
            assert expected == 12
        else:
            expected = await server_count(backend.url, input="Say hi.")
            assert expected == 4
    assert streamed[-1]["usage"]["prompt_tokens"] == expected
    assert whole.json()["usage"]["prompt_tokens"] == expected


def sdk_responses_stream(client: openai.OpenAI, max_tokens: int) -> tuple[str, list[Any]]:
    """Stream a Responses API request; the serving provider and the typed events."""
    stream = client.responses.create(
        model=MODEL_ALIAS,
        input="Count from one to one thousand.",
        max_output_tokens=max_tokens,
        extra_body={"logit_bias": NO_EOS},  # a chat extension the daemon passes through
        stream=True,
    )
    with stream:
        return stream.response.headers["x-provider-id"], list(stream)


async def test_a_streamed_responses_request_is_the_responses_event_sequence(
    model: Path, tmp_path: Path
) -> None:
    async with open_net(model, tmp_path) as net:
        pair = await start_pair(net)
        provider_id, events = await with_sdk(
            pair.daemon, partial(sdk_responses_stream, max_tokens=16)
        )
    assert provider_id in {node.provider_id for node in pair.nodes}
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 0
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # NO_EOS: the answer runs to max_output_tokens
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.usage.input_tokens > 0 and 0 < final.usage.output_tokens <= 16
