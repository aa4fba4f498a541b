"""The consumer-API test harness: a real daemon, scripted fake providers, HTTP helpers.

Shared by the chat, SDK and review-finding tests; `open_api` and `api` are fixtures
(re-exported by conftest).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx
import pytest
import trio

from daemon.api.serve import RunningDaemon
from tests.conftest import ADMIN_KEY, StartDaemon
from tests.fakes.provider import (
    Behaviour,
    Chunk,
    Complete,
    FakeProvider,
    Script,
    content_chunk,
    finish_chunk,
    role_chunk,
    start_fakes,
)

# Deadlines short enough that a stalled test fails fast, long enough that no hedge starts
# while a healthy request is being served.
DISPATCH_ENV = {"ttft_base_s": "3", "preamble_timeout_s": "2", "inference_timeout_s": "5"}
BOUND_S = 5
HELLO = [{"role": "user", "content": "hi"}]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# Helpers ------------------------------------------------------------------------------------


def in_turn(*scripts: Script) -> Behaviour:
    """Shared by several fakes: the n-th dispatch overall plays the n-th script (the last
    repeats), so a test controls what the first attempt sees whichever provider gets it."""
    played = 0

    def behave(_body: dict[str, Any]) -> Script:
        nonlocal played
        script = scripts[min(played, len(scripts) - 1)]
        played += 1
        return script

    return behave


def sse_data(text: str) -> list[str]:
    """The payloads of the `data:` lines of an SSE body, in order."""
    return [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(data) for data in sse_data(text) if data != "[DONE]"]


def streamed_text(events: Sequence[dict[str, Any]]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        for choice in event.get("choices", ())
    )


def role_deltas(events: Sequence[dict[str, Any]]) -> int:
    return sum(
        1 for event in events for choice in event.get("choices", ()) if "role" in choice["delta"]
    )


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": HELLO, **extra}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The error has the OpenAI shape; returns its `error` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"type", "message", "code", "param"}
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


async def poll_until(condition: Callable[[], bool], *, bound: float = BOUND_S) -> None:
    """Wait until `condition()` holds, checking every 10 ms, failing after `bound` seconds.

    For state no event announces (a queue's length, a count of file descriptors).
    """
    with trio.fail_after(bound):
        while not condition():  # noqa: ASYNC110 - nothing to wait on: the state is polled
            await trio.sleep(0.01)


def dispatches(*fakes: FakeProvider) -> int:
    return sum(len(fake.received) for fake in fakes)


def tool(parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "lookup", "parameters": parameters}}


async def create_key(client: httpx.AsyncClient, name: str = "tests") -> tuple[str, str]:
    """Issue a consumer key through the admin API; (id, key)."""
    response = await client.post("/v1/admin/keys", json={"name": name}, headers=ADMIN)
    assert response.status_code == 201, response.text
    issued = response.json()
    return issued["id"], issued["key"]


@dataclass
class Api:
    """One daemon, a consumer key for it, and an httpx client pointed at it."""

    daemon: RunningDaemon
    client: httpx.AsyncClient
    key: str
    nursery: trio.Nursery
    fakes: list[FakeProvider] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def fake(self, behaviour: Behaviour | None = None, **kwargs: Any) -> FakeProvider:
        if behaviour is not None:
            kwargs["behaviour"] = behaviour
        return FakeProvider(self.daemon.provider_url, **kwargs)

    async def connect(self, *fakes: FakeProvider) -> list[FakeProvider]:
        """Start the fakes and wait until each is trusted (routable)."""
        started = await start_fakes(self.nursery, fakes)
        assert all(fake.trusted.is_set() for fake in started)
        self.fakes.extend(started)
        return started

    async def chat(self, body: dict[str, Any] | None = None, **extra: Any) -> httpx.Response:
        with trio.fail_after(BOUND_S):
            return await self.client.post(
                "/v1/chat/completions", json=body or chat_body(**extra), headers=self.auth
            )

    async def post_raw(
        self, content: bytes, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        with trio.fail_after(BOUND_S):
            return await self.client.post(
                "/v1/chat/completions",
                content=content,
                headers={**self.auth, "content-type": "application/json", **(headers or {})},
            )


OpenApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def open_api(start_daemon: StartDaemon, nursery: trio.Nursery) -> AsyncIterator[OpenApi]:
    """`await open_api(**env)`: a daemon with DISPATCH_ENV plus `env`, a key and a client."""
    async with AsyncExitStack() as stack:

        async def open_(**env: str) -> Api:
            daemon = await start_daemon(**{**DISPATCH_ENV, **env})
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=daemon.base_url, timeout=BOUND_S)
            )
            _, key = await create_key(client)
            return Api(daemon, client, key, nursery)

        yield open_


@pytest.fixture
async def api(open_api: OpenApi) -> Api:
    return await open_api()


class RawConnection:
    """One HTTP/1.1 connection driven by hand with h11: the test sees exactly whether the
    server kept it open and answered the next request on the same socket."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self._stream = stream
        self._host = host
        self._h11 = h11.Connection(our_role=h11.CLIENT)

    @classmethod
    async def open(cls, base_url: str) -> RawConnection:
        url = urlsplit(base_url)
        assert url.hostname is not None and url.port is not None
        stream = await trio.open_tcp_stream(url.hostname, url.port)
        return cls(stream, url.netloc)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request on this connection and read its whole response."""
        if self._h11.our_state is h11.DONE:
            self._h11.start_next_cycle()  # raises unless both sides left the connection open
        head = {"host": self._host, "content-length": str(len(body)), **(headers or {})}
        with trio.fail_after(BOUND_S):
            await self._send(h11.Request(method=method, target=path, headers=list(head.items())))
            if body:
                await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
            return await self._read_response()

    async def stream_until(
        self, marker: bytes, path: str, body: bytes, headers: dict[str, str]
    ) -> int:
        """POST, then read the streamed response only until `marker` arrives; its status."""
        head = {"host": self._host, "content-length": str(len(body)), **headers}
        await self._send(h11.Request(method="POST", target=path, headers=list(head.items())))
        await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())
        status, seen = 0, b""
        while marker not in seen:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                self._h11.receive_data(await self._stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                seen += bytes(event.data)
            else:
                raise AssertionError(f"the stream ended before {marker!r}: {event!r}")
        return status

    async def _send(self, event: Any) -> None:
        data = self._h11.send(event)
        assert data is not None
        await self._stream.send_all(data)

    async def _read_response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers, parts = 0, {}, []
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                self._h11.receive_data(await self._stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, b"".join(parts)
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the server closed the connection")

    @property
    def reusable(self) -> bool:
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE


def error_of(body: bytes) -> dict[str, Any]:
    parsed = json.loads(body)
    assert set(parsed) == {"error"} and set(parsed["error"]) == {"type", "message", "code", "param"}
    return dict(parsed["error"])


def _tool_call_chunk(index: int, **call: Any) -> Chunk:
    delta = {"tool_calls": [{"index": index, **call}]}
    event = {
        "id": "chatcmpl-tools",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    return Chunk("data: " + json.dumps(event))


def usage_chunk(prompt: int, completion: int) -> Chunk:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    event = {"id": "chatcmpl-tools", "object": "chat.completion.chunk", "choices": []}
    return Chunk("data: " + json.dumps({**event, "usage": {**usage, "total_tokens": 21}}))


TOOL_SCRIPT: Script = [
    role_chunk(),
    content_chunk("Let me check."),
    _tool_call_chunk(0, id="call_a", type="function", function={"name": "lookup"}),
    _tool_call_chunk(1, id="call_b", type="function", function={"name": "convert"}),
    _tool_call_chunk(0, function={"arguments": '{"city": '}),
    _tool_call_chunk(1, function={"arguments": '{"unit": "c"}'}),
    _tool_call_chunk(0, function={"arguments": '"Paris"}'}),
    finish_chunk(reason="tool_calls"),
    usage_chunk(17, 4),
    Chunk("data: [DONE]"),
    Complete(prompt_tokens=17, completion_tokens=4),
]
