"""A fast mock OpenAI-compatible model server for the real-path benchmark (`bench_realpath.py`).

Run as `python scripts/mock_backend.py --port PORT [--token-interval S] [--usage]`. It is raw
asyncio (a `Protocol`, no framework) so that it costs far less CPU per request than the daemon
and the node it stands behind; it has no dependency beyond the standard library.

- `GET /v1/models`: one model (`--model`), `owned_by: vllm` with `max_model_len`, so the
  reference node takes it for vLLM and probes nothing else.
- `POST /v1/chat/completions` with `"stream": true`: HTTP/1.1 chunked SSE, one HTTP chunk per
  event: a role chunk, `max_tokens` content chunks (the first one's text is `MARK0`, which the
  benchmark's client watches for: time to first token; the others are `x`), a finish chunk,
  with `--usage` a usage chunk, and `data: [DONE]`. With `--token-interval 0` (the default)
  the whole answer goes out in one write; otherwise the role and first content chunks go at
  once and each further content chunk after the interval (slow streams).
- Without `"stream"`: one `chat.completion` JSON document with the same text.

Keep-alive: any number of requests per connection, one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import signal
from typing import Any

MARK = "MARK0"
FILLER = "x"
DEFAULT_MAX_TOKENS = 16
HEAD_LIMIT = 65_536


def _event(document: dict[str, Any]) -> bytes:
    data = b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
DONE = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"


class Answers:
    """Every byte string the server sends, built once per shape."""

    def __init__(self, model: str, usage: bool) -> None:
        self.model = model
        self.usage = usage
        self.role = _event(_chunk(model, {"role": "assistant", "content": ""}))
        self.mark = _event(_chunk(model, {"content": MARK}))
        self.filler = _event(_chunk(model, {"content": FILLER}))
        self.finish = _event(_chunk(model, {}, "stop"))
        models = {
            "object": "list",
            "data": [{"id": model, "object": "model", "owned_by": "vllm", "max_model_len": 32768}],
        }
        self.models = _json_response(200, models)
        self.not_found = _json_response(404, {"error": {"message": "not found"}})

    def usage_event(self, tokens: int) -> bytes:
        usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3}
        return _event({**_chunk(self.model, {}), "choices": [], "usage": usage})

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one instance, living as long as the server
    def whole_stream(self, tokens: int) -> bytes:
        return b"".join([STREAM_HEAD, self.role, *self.contents(tokens), *self.tail(tokens), DONE])

    def contents(self, tokens: int) -> list[bytes]:
        return [self.mark, *([self.filler] * (tokens - 1))] if tokens > 0 else []

    def tail(self, tokens: int) -> list[bytes]:
        return [self.finish, self.usage_event(tokens)] if self.usage else [self.finish]

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def completion(self, tokens: int) -> bytes:
        text = (MARK + FILLER * (tokens - 1)) if tokens > 0 else ""
        document = {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3},
        }
        return _json_response(200, document)


def _json_response(status: int, document: Any) -> bytes:
    body = json.dumps(document).encode()
    reason = b"OK" if status == 200 else b"Not Found"
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % (status, reason, len(body)) + body


def _content_length(head: bytes) -> int:
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    line_end = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : line_end if line_end > 0 else None])


class Connection(asyncio.Protocol):
    """One client connection: parse a request, answer it, parse the next."""

    def __init__(self, answers: Answers, interval: float) -> None:
        self.answers = answers
        self.interval = interval
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.slow: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slow is not None:
            self.slow.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.slow is None and self._one():
            pass

    def _one(self) -> bool:
        """Answer the first complete request in the buffer; False if there is none yet."""
        buf = self.buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buf) > HEAD_LIMIT and self.transport is not None:
                self.transport.close()
            return False
        head = bytes(buf[:head_end]).lower()
        length = _content_length(head)
        end = head_end + 4 + length
        if len(buf) < end:
            return False
        body = bytes(buf[head_end + 4 : end])
        del buf[:end]
        self._answer(head, body)
        return True

    def _answer(self, head: bytes, body: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method == b"get" and path == b"/v1/models":
            transport.write(self.answers.models)
        elif method == b"post" and path == b"/v1/chat/completions":
            document = json.loads(body)
            tokens = int(document.get("max_tokens") or DEFAULT_MAX_TOKENS)
            if not document.get("stream"):
                transport.write(self.answers.completion(tokens))
            elif self.interval <= 0:
                transport.write(self.answers.whole_stream(tokens))
            else:
                self.slow = asyncio.get_running_loop().create_task(self._slowly(tokens))
        else:
            transport.write(self.answers.not_found)

    async def _slowly(self, tokens: int) -> None:
        answers = self.answers
        contents = answers.contents(tokens)
        try:
            self._write(STREAM_HEAD + answers.role + b"".join(contents[:1]))
            for content in contents[1:]:
                await asyncio.sleep(self.interval)
                self._write(content)
            self._write(b"".join(answers.tail(tokens)) + DONE)
        except ConnectionError:
            return
        self.slow = None
        if self.buf:
            self.data_received(b"")

    def _write(self, data: bytes) -> None:
        if self.transport is None:
            raise ConnectionResetError
        self.transport.write(data)


async def serve(port: int, model: str, interval: float, usage: bool) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers(model, usage)
    server = await loop.create_server(
        lambda: Connection(answers, interval), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--token-interval", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--usage", action="store_true", help="send a usage chunk at the end")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.model, args.token_interval, args.usage))


if __name__ == "__main__":
    main()
