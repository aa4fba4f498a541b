"""What one daemon process adds to a streamed chat completion: latency, requests/s, chunks/s.

Run as `.venv/bin/python scripts/bench_dispatch.py [--quick]` (about 65 s; `--quick` about 20 s).

Layout (the machine has 2 cores): the daemon runs as its own process (`python -m dinfer
serve`, i.e. `dinfer serve`) pinned to one core; this process runs the load generator and the
fake providers (`tests.fakes.provider.FakeProvider`, answering instantly over the real
encrypted WebSocket protocol) pinned to the other. The direct baseline is a trivial Hypercorn
ASGI app (this file with `--serve-baseline PORT`, its own process on the daemon's core) that
streams the same SSE events at once: the same client, HTTP server stack and loopback hop, with
no dispatch, no provider hop and no crypto. "Added" = daemon figure - baseline figure, both
measured in this run (for percentiles: the difference of the percentiles).

Phases: `c1` (one connection, back to back), `c64` (64 connections, back to back: a closed
loop, so the daemon is saturated and TTFT is mostly queueing, about 64 x CPU per request),
`open` (64 connections offering half the daemon's c64 rate: TTFT under load, unsaturated),
`badkeys` (random, distinct bad keys alone, for the CPU one costs; then c64 with good keys,
alone and while `--bad-key-rate` (1,000) bad-key requests/s arrive on other connections:
what a flood of unknown keys costs the real consumers; beyond the daemon's capacity the
flood's backlog grows, and the report shows it in its latency and connections), `stream`
and `parallel` (long streams), `client` (the client check below).

The client is a minimal raw-socket HTTP/1.1 client (keep-alive, chunked decoding); the
`client` phase compares it with httpx on the baseline to show what the client itself costs.
CPU seconds per request and per chunk come from /proc, so they hold whichever side was the
bottleneck; "busy" is CPU time / wall time of the phase (1.00 = one core saturated).

Long streams: the fakes send them in batches of frames, paced by the client (at most
`WINDOW` frames ahead of what the consumer has received). Unpaced, a provider that outruns the
daemon's relay is cut off by the session after 1024 frames (`STREAM_BUFFER`), and an
unbatched fake in this process tops out below the daemon's relay rate.

`--py-spy FILE` records the daemon with py-spy (raw collapsed stacks; summarise with
`scripts/profile_summary.py FILE`); `--phases c1,stream` runs a subset; `--daemon-command`
runs another daemon command line (to compare a change).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
import trio_websocket
from wsproto.events import TextMessage

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from protocol import crypto  # noqa: E402
from protocol.messages import (  # noqa: E402
    InferenceComplete,
    InferenceRequest,
    InferenceResponseChunk,
    ModelInfo,
    Usage,
    encode,
)
from tests.fakes.provider import (  # noqa: E402
    Chunk,
    Complete,
    FakeProvider,
    Step,
    content_chunk,
    finish_chunk,
    role_chunk,
)

ADMIN_KEY = "bench-admin-key"
MODEL = "bench-model"
MARK = b"MARK0"  # the first content chunk's text: time-to-first-token stops when it arrives
EVENT = b"data: "
IN_BAND_ERROR = b'data: {"error"'
PATH = "/v1/chat/completions"
FAKES = 4
SLOTS_PER_FAKE = 32  # 128 slots: concurrency 64 never waits in the admission queue
DAEMON_CPU = 1
CLIENT_CPU = 0
WINDOW = 512  # frames a paced fake may run ahead of the consumer (the session drops at 1024)
BATCH = 64  # frames per socket write of a paced fake
REQUEST_TIMEOUT_S = 30.0  # bounds every request, so a stuck daemon cannot hang the benchmark
PHASES = ("c1", "c64", "open", "badkeys", "stream", "parallel", "client")
# The bad-key flood: requests/s offered in an open loop, started every FLOOD_TICK_S, each on
# an idle connection or a new one, with at most FLOOD_MAX_CONNECTIONS in flight.
BAD_KEY_RATE = 1000.0
FLOOD_TICK_S = 0.005
FLOOD_MAX_CONNECTIONS = 4000
# Bad keys alone, back to back on this many connections: the CPU one costs the daemon.
BAD_KEY_CONCURRENCY = 16
# The open-loop phase offers this fraction of the daemon's closed-loop requests/s (or
# OPEN_RATE when c64 did not run): TTFT under load without a saturated daemon.
OPEN_LOAD = 0.5
OPEN_RATE = 400.0


@dataclass(frozen=True)
class Plan:
    """How much of each phase to run."""

    warmup: int
    serial: int  # requests at concurrency 1
    burst_s: float  # seconds at concurrency 64
    long_chunks: int  # content chunks in the single long stream
    parallel_streams: int
    parallel_chunks: int  # content chunks in each parallel stream
    httpx_requests: int
    bad_key_rate: float = BAD_KEY_RATE  # `--bad-key-rate`


FULL = Plan(
    warmup=300,
    serial=3000,
    burst_s=8.0,
    long_chunks=20_000,
    parallel_streams=4,
    parallel_chunks=20_000,
    httpx_requests=500,
)
QUICK = Plan(
    warmup=100,
    serial=500,
    burst_s=2.5,
    long_chunks=5_000,
    parallel_streams=4,
    parallel_chunks=5_000,
    httpx_requests=150,
)


# The answers: identical SSE lines from the fake providers and from the baseline -----------


@functools.cache
def script(content_chunks: int) -> tuple[Step, ...]:
    """role, MARK, (n - 1) more content chunks, finish, [DONE], complete."""
    filler = content_chunk("x", MODEL)
    return (
        role_chunk(MODEL),
        content_chunk(MARK.decode(), MODEL),
        *([filler] * (content_chunks - 1)),
        finish_chunk(MODEL),
        Chunk("data: [DONE]"),
        Complete(prompt_tokens=3, completion_tokens=content_chunks),
    )


def expected_events(content_chunks: int) -> int:
    """SSE events the consumer gets: role, the content, finish, one [DONE]."""
    return content_chunks + 3


def requested_chunks(body: dict[str, Any]) -> int:
    return int(body.get("max_tokens") or 1)


def request_body(content_chunks: int, flow_tag: str | None = None) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": True,
        "max_tokens": content_chunks,
    }
    if flow_tag is not None:
        body["user"] = flow_tag  # relayed to the provider untouched: the fake finds its Flow
    return json.dumps(body).encode()


# The fake providers ------------------------------------------------------------------------


@dataclass(eq=False)
class Flow:
    """Credit between a consumer and a paced fake: how many events the consumer has read."""

    received: int = 0
    _moved: trio.Event = field(default_factory=trio.Event)

    def advance(self, received: int) -> None:
        self.received = received
        self._moved.set()
        self._moved = trio.Event()

    async def room_for(self, sent: int, more: int) -> None:
        while sent + more - self.received > WINDOW:
            await self._moved.wait()


FLOWS: dict[str, Flow] = {}
# Per short request: from the fake's reading the request to its sending the MARK chunk. The
# provider's own share of the daemon's TTFT (a real provider has at least this much).
FAKE_TIMES: list[float] = []


class BenchFake(FakeProvider):
    """The scripted fake, minus per-request bookkeeping; tagged long answers go out paced."""

    async def _serve_request(
        self, ws: trio_websocket.WebSocketConnection, request: InferenceRequest
    ) -> None:
        received = time.perf_counter()
        plaintext, sealer = crypto.open_request(request.encrypted_body, self.box_key)
        body = json.loads(plaintext)["body"]
        steps = script(requested_chunks(body))
        flow = FLOWS.get(body.get("user", ""))
        with trio.CancelScope() as scope:
            self._streams[request.request_id] = scope
            if flow is not None:
                await _paced(ws, request.request_id, sealer, steps, flow)
            else:
                for index, step in enumerate(steps):
                    await self._play(ws, request.request_id, sealer, step)
                    if index == 1:  # MARK is out
                        FAKE_TIMES.append(time.perf_counter() - received)
        self._streams.pop(request.request_id, None)


async def _paced(
    ws: trio_websocket.WebSocketConnection,
    request_id: str,
    sealer: crypto.ChunkSealer,
    steps: Sequence[Step],
    flow: Flow,
) -> None:
    """Each frame sealed and framed as usual, written `BATCH` frames per socket write."""
    for start in range(0, len(steps), BATCH):
        batch = steps[start : start + BATCH]
        await flow.room_for(start, len(batch))
        data = b"".join(
            ws._wsproto.send(TextMessage(data=_frame(request_id, sealer, step))) for step in batch
        )
        async with ws._stream_lock:
            await ws._stream.send_all(data)


def _frame(request_id: str, sealer: crypto.ChunkSealer, step: Step) -> str:
    if isinstance(step, Chunk):
        payload = sealer.seal(step.line.encode())
        return encode(InferenceResponseChunk(request_id=request_id, encrypted_data=payload))
    assert isinstance(step, Complete)
    usage = Usage(prompt_tokens=step.prompt_tokens, completion_tokens=step.completion_tokens)
    return encode(InferenceComplete(request_id=request_id, usage=usage))


@contextlib.asynccontextmanager
async def fake_providers(port: int) -> AsyncIterator[list[BenchFake]]:
    url = f"ws://127.0.0.1:{port}/ws/provider"
    fakes = [
        BenchFake(url, models=[ModelInfo(id=MODEL)], max_concurrency=SLOTS_PER_FAKE)
        for _ in range(FAKES)
    ]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            for fake in fakes:
                await nursery.start(fake.run)
        if not all(fake.trusted.is_set() for fake in fakes):
            raise RuntimeError("a fake provider was not trusted by the daemon")
        yield fakes
        nursery.cancel_scope.cancel()


# The baseline server (a subprocess: `--serve-baseline PORT`) ------------------------------


@functools.cache
def baseline_events(content_chunks: int) -> tuple[bytes, ...]:
    """The data lines the daemon relays for this answer (its own [DONE] comes last)."""
    lines = [step.line for step in script(content_chunks) if isinstance(step, Chunk)]
    return tuple(line.encode() + b"\n\n" for line in lines if line != "data: [DONE]")


async def baseline_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the body, stream the canned answer at once: HTTP and nothing else."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body", False):
            break
    body = json.loads(raw)
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for event in baseline_events(requested_chunks(body)):
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def serve_baseline(port: int) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.graceful_timeout = 1
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(functools.partial(serve, baseline_app, config, mode="asgi"))  # type: ignore[arg-type]


# Processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pin(pid: int, cpu: int) -> None:
    with contextlib.suppress(OSError, ValueError):
        if (os.cpu_count() or 1) > cpu:
            os.sched_setaffinity(pid, {cpu})


@contextlib.contextmanager
def child(argv: Sequence[str], env: dict[str, str], log: Path, cpu: int | None) -> Iterator[int]:
    """Run a process for the duration of the block; SIGINT, then SIGKILL, at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        if cpu is not None:
            pin(proc.pid, cpu)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def daemon_env(port: int, data_dir: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("DINFER_")},
        "PYTHONPATH": str(REPO),
        "DINFER_LISTEN": f"127.0.0.1:{port}",
        "DINFER_METRICS_LISTEN": "127.0.0.1:0",  # on, as in production, on a free port
        "DINFER_PROVIDER_AUTH": "open",
        "DINFER_ADMIN_KEY": ADMIN_KEY,
        "DINFER_DATA_DIR": str(data_dir),
        "DINFER_LOG_LEVEL": "warning",
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_listening(port: int) -> None:
    with trio.fail_after(20):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


# A minimal HTTP/1.1 client: keep-alive, chunked decoding, the first-token timestamp ---------


class HTTPError(Exception):
    pass


@dataclass
class Response:
    ttft: float  # seconds from sending the request to the arrival of the chunk carrying MARK
    events: int  # SSE events (`data: ` lines; an HTTP chunk may carry several)
    in_band_errors: int
    first_at: float
    end_at: float


class RawConnection:
    def __init__(self, stream: trio.SocketStream, port: int) -> None:
        self._stream = stream
        self._host = f"127.0.0.1:{port}"
        self._buf = bytearray()
        self.closing = False

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        return cls(await trio.open_tcp_stream("127.0.0.1", port), port)

    async def aclose(self) -> None:
        await self._stream.aclose()

    def request_bytes(self, body: bytes, token: str) -> bytes:
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: {self._host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def _more(self) -> None:
        data = await self._stream.receive_some(262_144)
        if not data:
            raise HTTPError("connection closed mid-response")
        self._buf += data

    async def post(self, request: bytes, flow: Flow | None = None) -> Response:
        started = time.perf_counter()
        await self._stream.send_all(request)
        buf = self._buf
        while (head_end := buf.find(b"\r\n\r\n")) < 0:
            await self._more()
        head = bytes(buf[:head_end]).lower()
        status = int(head[9:12])
        # Hypercorn closes a connection after keep_alive_max_requests (1000) responses.
        self.closing = b"\r\nconnection: close" in head
        pos = head_end + 4
        if b"transfer-encoding: chunked" not in head:
            await self._refused(head, pos, status)
        events = errors = 0
        first_at = 0.0
        while True:
            line_end = buf.find(b"\r\n", pos)
            end = -1 if line_end < 0 else line_end + 4 + int(buf[pos:line_end], 16)
            if line_end < 0 or len(buf) < end:
                del buf[:pos]
                pos = 0
                if flow is not None:
                    flow.advance(events)
                await self._more()
                continue
            if end == line_end + 4:  # the zero-length chunk: end of the response
                del buf[:end]
                break
            if not first_at and buf.find(MARK, line_end, end) >= 0:
                first_at = time.perf_counter()
            errors += buf.count(IN_BAND_ERROR, line_end, end)
            events += buf.count(EVENT, line_end, end)
            pos = end
        if not first_at:
            raise HTTPError(f"status {status}: no first token in the stream")
        return Response(first_at - started, events, errors, first_at, time.perf_counter())

    async def status_of(self, request: bytes) -> int:
        """Send `request` and read its whole unstreamed answer (an error); its status."""
        await self._stream.send_all(request)
        buf = self._buf
        while (head_end := buf.find(b"\r\n\r\n")) < 0:
            await self._more()
        head = bytes(buf[:head_end]).lower()
        self.closing = b"\r\nconnection: close" in head
        pos = head_end + 4
        if b"transfer-encoding: chunked" in head:
            size = -1
            while size != 0:
                while (line_end := buf.find(b"\r\n", pos)) < 0:
                    await self._more()
                size = int(buf[pos:line_end], 16)
                pos = line_end + 2 + size + 2
                while len(buf) < pos:
                    await self._more()
        else:
            pos += int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            while len(buf) < pos:
                await self._more()
        del buf[:pos]
        return int(head[9:12])

    async def _refused(self, head: bytes, pos: int, status: int) -> None:
        length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(self._buf) < pos + length:
            await self._more()
        body = bytes(self._buf[pos : pos + length])
        del self._buf[: pos + length]
        raise HTTPError(f"status {status}: {body[:200]!r}")


# Measurements ------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    pid: int
    token: str = ""


@dataclass
class Cost:
    """Wall time and CPU time of the server and of this process over one phase."""

    elapsed: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0

    @contextlib.contextmanager
    def measure(self, pid: int) -> Iterator[None]:
        wall, server, client = time.perf_counter(), cpu_seconds(pid), time.process_time()
        yield
        self.elapsed = time.perf_counter() - wall
        self.server_cpu = cpu_seconds(pid) - server
        self.client_cpu = time.process_time() - client


def percentile(data: Sequence[float], q: float) -> float:
    return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


@dataclass
class Run:
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    usage: Cost = field(default_factory=Cost)
    fake_times: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        return percentile(sorted(self.ttfts), q)

    @property
    def rps(self) -> float:
        return len(self.ttfts) / self.usage.elapsed if self.usage.elapsed else 0.0


async def requests_loop(
    target: Target,
    concurrency: int,
    *,
    count: int | None = None,
    seconds: float | None = None,
    rate: float | None = None,
) -> Run:
    """`concurrency` keep-alive connections issuing short requests: back to back (a closed
    loop), or with `rate`, each connection on its own schedule so that together they start
    `rate` requests a second (an open loop; a late connection starts its next at once)."""
    run = Run()
    conns = [await RawConnection.open(target.port) for _ in range(concurrency)]
    remaining = [count if count is not None else 1 << 60]
    start = time.perf_counter()
    deadline = start + seconds if seconds is not None else float("inf")

    async def worker(index: int, conn: RawConnection) -> None:
        request = conn.request_bytes(request_body(1), target.token)
        due = start + (index / rate if rate else 0.0)
        while remaining[0] > 0 and time.perf_counter() < deadline:
            if rate:
                await trio.sleep_until(trio.current_time() + due - time.perf_counter())
                due += concurrency / rate
            remaining[0] -= 1
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    response = await conn.post(request)
            except (HTTPError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                _failed(run, target, exc)
                conn.closing = True
                continue
            finally:
                if conn.closing:  # the server said so, or the connection is in a bad state
                    await conn.aclose()
                    conn = await RawConnection.open(target.port)
            if response.in_band_errors or response.events != expected_events(1):
                _failed(run, target, HTTPError(f"{response.events} events, in-band error"))
                continue
            run.ttfts.append(response.ttft)
        await conn.aclose()

    FAKE_TIMES.clear()
    with run.usage.measure(target.pid):
        async with trio.open_nursery() as nursery:
            for index, conn in enumerate(conns):
                nursery.start_soon(worker, index, conn)
    run.fake_times = sorted(FAKE_TIMES)
    return run


@dataclass
class Flood:
    """The bad-key requests of one flood: how many were answered 401, and how fast."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0  # answered anything but 401, or not at all
    unsent: int = 0  # due while FLOOD_MAX_CONNECTIONS requests were already in flight
    connections: int = 0  # the most connections the flood had open at once
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0


async def bad_key_flood(target: Target, rate: float, stop: trio.Event) -> Flood:
    """Requests with random, distinct bad keys, `rate` a second whatever the daemon does (an
    open loop: a request due while every connection is busy gets a new one, as an attacker's
    would), until `stop`; each should be refused with 401."""
    flood = Flood()
    body = request_body(1)
    idle: list[RawConnection] = []
    busy = [0]

    async def one() -> None:
        busy[0] += 1
        try:
            conn = idle.pop() if idle else await RawConnection.open(target.port)
        except OSError:  # the daemon's accept queue overflowed: the flood outran it
            busy[0] -= 1
            flood.errors += 1
            return
        flood.connections = max(flood.connections, busy[0] + len(idle))
        request = conn.request_bytes(body, "dk_" + secrets.token_urlsafe(32))
        sent = time.perf_counter()
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                status = await conn.status_of(request)
        except (HTTPError, OSError, trio.BrokenResourceError, trio.TooSlowError):
            status, conn.closing = 0, True
        busy[0] -= 1
        if status == 401:
            flood.latencies.append(time.perf_counter() - sent)
        else:
            flood.errors += 1
        if conn.closing:
            await conn.aclose()
        else:
            idle.append(conn)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        due = 0
        while not stop.is_set():
            for _ in range(int((time.perf_counter() - start) * rate) - due):
                due += 1
                if busy[0] >= FLOOD_MAX_CONNECTIONS:
                    flood.unsent += 1
                else:
                    nursery.start_soon(one)
            await trio.sleep(FLOOD_TICK_S)
        flood.elapsed = time.perf_counter() - start
    for conn in idle:
        await conn.aclose()
    return flood


async def bad_keys_loop(target: Target, concurrency: int, seconds: float) -> Run:
    """Only bad keys, back to back on `concurrency` connections: what one costs the daemon."""
    run = Run()
    body = request_body(1)
    conns = [await RawConnection.open(target.port) for _ in range(concurrency)]
    deadline = time.perf_counter() + seconds

    async def worker(conn: RawConnection) -> None:
        while time.perf_counter() < deadline:
            request = conn.request_bytes(body, "dk_" + secrets.token_urlsafe(32))
            sent = time.perf_counter()
            with trio.fail_after(REQUEST_TIMEOUT_S):
                status = await conn.status_of(request)
            if status == 401:
                run.ttfts.append(time.perf_counter() - sent)
            else:
                _failed(run, target, HTTPError(f"a bad key got {status}"))
            if conn.closing:
                await conn.aclose()
                conn = await RawConnection.open(target.port)
        await conn.aclose()

    with run.usage.measure(target.pid):
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(worker, conn)
    return run


async def under_flood(target: Target, seconds: float, rate: float) -> tuple[Run, Flood]:
    """Good-key requests at concurrency 64 for `seconds`, while the bad-key flood runs."""
    stop = trio.Event()
    floods: list[Flood] = []

    async def flood() -> None:
        floods.append(await bad_key_flood(target, rate, stop))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        run = await requests_loop(target, 64, seconds=seconds)
        stop.set()
    return run, floods[0]


def _failed(run: Run, target: Target, exc: BaseException) -> None:
    run.errors += 1
    if run.errors == 1:
        print(f"  {target.name}: {type(exc).__name__}: {exc}", file=sys.stderr)


@dataclass
class StreamRun:
    chunks: int = 0
    span: float = 0.0  # first token of the first stream to the end of the last stream
    incomplete: int = 0  # streams cut short or ended by an in-band error
    usage: Cost = field(default_factory=Cost)

    @property
    def rate(self) -> float:
        return self.chunks / self.span if self.span else 0.0


async def long_streams(target: Target, streams: int, content_chunks: int) -> StreamRun:
    """`streams` parallel requests of `content_chunks` content chunks each, paced."""
    conns = [await RawConnection.open(target.port) for _ in range(streams)]
    responses: list[Response] = []
    run = StreamRun()

    async def one(index: int, conn: RawConnection) -> None:
        tag = f"long-{time.monotonic_ns()}-{index}"
        flow = FLOWS[tag] = Flow()
        try:
            request = conn.request_bytes(request_body(content_chunks, tag), target.token)
            responses.append(await conn.post(request, flow))
        finally:
            del FLOWS[tag]

    with run.usage.measure(target.pid), trio.fail_after(REQUEST_TIMEOUT_S * 2):
        async with trio.open_nursery() as nursery:
            for index, conn in enumerate(conns):
                nursery.start_soon(one, index, conn)
    for conn in conns:
        await conn.aclose()
    run.chunks = sum(r.events for r in responses)
    run.span = max(r.end_at for r in responses) - min(r.first_at for r in responses)
    run.incomplete = sum(
        1 for r in responses if r.in_band_errors or r.events != expected_events(content_chunks)
    )
    return run


async def httpx_loop(target: Target, concurrency: int, count: int) -> Run:
    """The same short requests through httpx.AsyncClient, for the client-cost comparison."""
    import httpx

    run = Run()
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"}
    remaining = [count]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    url = f"http://127.0.0.1:{target.port}{PATH}"
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                started = time.perf_counter()
                ttft = None
                async with client.stream(
                    "POST", url, content=request_body(1), headers=headers
                ) as r:
                    async for line in r.aiter_lines():
                        if ttft is None and MARK.decode() in line:
                            ttft = time.perf_counter() - started
                if r.status_code != 200 or ttft is None:
                    run.errors += 1
                    continue
                run.ttfts.append(ttft)

        with run.usage.measure(target.pid), trio.fail_after(REQUEST_TIMEOUT_S * 2):
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker)
    return run


# Limits on the benchmark's key, every one checked per request and none ever reached: the cost
# of a limited key, which a daemon with accounts pays on every request.
KEY_LIMITS: Final = {"rpm": 10**9, "tpm": 10**12, "daily_tokens": 10**15, "max_concurrency": 10**6}


async def create_api_key(port: int, limits: bool = False) -> str:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        response = await client.post(
            "/v1/admin/keys",
            json={"name": "bench", **(KEY_LIMITS if limits else {})},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        response.raise_for_status()
        key: str = response.json()["key"]
        return key


# Report ------------------------------------------------------------------------------------


@dataclass
class Results:
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, baseline: str, daemon: str, added: str, target: str = "") -> None:
        self.rows.append((metric, baseline, daemon, added, target))

    def print(self) -> None:
        header = ("metric", "baseline", "daemon", "added / ratio", "target")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(5)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        print()
        print(line.format(*header).rstrip())
        print(line.format(*("-" * w for w in widths)))
        for row in self.rows:
            print(line.format(*row).rstrip())
        print()
        for note in self.notes:
            print(note)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us"


def us1(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def busy(usage: Cost) -> str:
    return f"{usage.server_cpu / usage.elapsed:.2f} (client {usage.client_cpu / usage.elapsed:.2f})"


def report_requests(res: Results, name: str, base: Run, dmn: Run) -> None:
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        added = dmn.pct(q) - base.pct(q)
        target = ""
        if (name, label) == ("c=1", "p50"):
            target = f"< 1 ms ({verdict(added < 0.001)})"
        if (name, label) == ("c=64", "p99"):
            target = f"< 30 ms ({verdict(added < 0.030)})"
        res.add(f"TTFT {label} {name}", ms(base.pct(q)), ms(dmn.pct(q)), ms(added), target)
    if dmn.fake_times:
        fake = [percentile(dmn.fake_times, q) for q in (0.5, 0.99)]
        res.add(f"  of which fake provider {name}", "", f"{ms(fake[0])} / {ms(fake[1])}", "",
                "p50 / p99")  # fmt: skip
    target = f">= 1,000 ({verdict(dmn.rps >= 1000)})" if name == "c=64" else ""
    res.add(f"requests/s {name}", f"{base.rps:,.0f}", f"{dmn.rps:,.0f}", "", target)
    per_request = [r.usage.server_cpu / max(1, len(r.ttfts)) for r in (base, dmn)]
    res.add(f"server CPU/request {name}", us(per_request[0]), us(per_request[1]),
            us(per_request[1] - per_request[0]))  # fmt: skip
    res.add(f"server busy {name}", busy(base.usage), busy(dmn.usage), "")
    if name == "c=64":
        _check_saturated(res, name, dmn.usage)
    if base.errors or dmn.errors:
        res.notes.append(f"{name}: {base.errors} baseline, {dmn.errors} daemon request(s) failed")


def report_flood(
    res: Results, offered: float, bad: Run, alone: Run, flooded: Run, flood: Flood
) -> None:
    rate = f"{offered:,.0f}"
    res.add(f"bad-key requests/s alone c={BAD_KEY_CONCURRENCY}", "", f"{bad.rps:,.0f}", "")
    res.add(f"server CPU/bad-key request c={BAD_KEY_CONCURRENCY}", "",
            us(bad.usage.server_cpu / max(1, len(bad.ttfts))), "")  # fmt: skip
    res.add(f"server busy bad keys c={BAD_KEY_CONCURRENCY}", "", busy(bad.usage), "")
    res.add("requests/s c=64, good keys alone", "", f"{alone.rps:,.0f}", "")
    res.add(
        f"requests/s c=64, good keys + {rate} bad keys/s",
        "",
        f"{flooded.rps:,.0f}",
        f"{flooded.rps / alone.rps:.2f}x" if alone.rps else "",
        "same run, no flood = 1.00x",
    )
    res.add(f"TTFT p50 / p99 c=64 + {rate} bad keys/s", "",
            f"{ms(flooded.pct(0.5))} / {ms(flooded.pct(0.99))}", "")  # fmt: skip
    answered = sorted(flood.latencies)
    res.add("bad-key requests/s answered 401", "", f"{flood.rate:,.0f}", "", f"offered {rate}")
    res.add("  connections the flood needed", "", f"{flood.connections:,}", "")
    res.add("bad-key 401 p50 / p99", "",
            f"{ms(percentile(answered, 0.5))} / {ms(percentile(answered, 0.99))}", "")  # fmt: skip
    per_request = flooded.usage.server_cpu / max(1, len(flooded.ttfts) + len(answered))
    res.add("server CPU/request, good + bad", "", us(per_request), "")
    if alone.errors or flooded.errors or flood.errors:
        res.notes.append(
            f"badkeys: {alone.errors} + {flooded.errors} good-key request(s) failed, "
            f"{flood.errors} bad-key request(s) not answered 401"
        )
    if flood.rate < 0.95 * offered:
        res.notes.append(
            f"badkeys: the daemon answered {flood.rate:,.0f} of the {rate} bad-key requests/s "
            "offered: the flood exceeded its capacity, so the flooded figures measure an "
            "overload and its backlog; the CPU a bad key costs is the figure that compares"
        )
    if flood.unsent:
        res.notes.append(
            f"badkeys: {flood.unsent} bad-key request(s) not sent: "
            f"{FLOOD_MAX_CONNECTIONS} already in flight"
        )


def report_stream(res: Results, name: str, base: StreamRun, dmn: StreamRun) -> None:
    res.add(
        f"chunks/s {name}",
        f"{base.rate:,.0f}",
        f"{dmn.rate:,.0f}",
        f"{dmn.rate / base.rate:.2f}x" if base.rate else "",
        f">= 30,000 ({verdict(dmn.rate >= 30_000)})",
    )
    base_chunk, dmn_chunk = (r.usage.server_cpu / max(1, r.chunks) for r in (base, dmn))
    res.add(
        f"server CPU/chunk {name}", us1(base_chunk), us1(dmn_chunk), us1(dmn_chunk - base_chunk)
    )
    res.add(f"server busy {name}", busy(base.usage), busy(dmn.usage), "")
    _check_saturated(res, name, dmn.usage)
    if base.incomplete or dmn.incomplete:
        res.notes.append(
            f"{name}: {dmn.incomplete} daemon / {base.incomplete} baseline stream(s) incomplete"
        )


def _check_saturated(res: Results, name: str, usage: Cost) -> None:
    """A throughput phase should keep the daemon's core busy; if not, something else ran."""
    share = usage.server_cpu / usage.elapsed
    if share < 0.9:
        res.notes.append(
            f"warning: {name}: the daemon used only {share:.0%} of its core while it should "
            "have been saturated; other load on the machine took the rest, so its figures "
            "are pessimistic (compare CPU per request/chunk, which holds up better)"
        )


# Main --------------------------------------------------------------------------------------


def phase(title: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {title}", flush=True)


async def bench(plan: Plan, phases: set[str], daemon: Target, base: Target, res: Results) -> None:
    phase("warm-up")
    for target in (base, daemon):
        await requests_loop(target, 1, count=plan.warmup)
        await requests_loop(target, 64, count=plan.warmup * 2)
    if "c1" in phases:
        phase(f"concurrency 1: {plan.serial} requests each")
        b1 = await requests_loop(base, 1, count=plan.serial)
        d1 = await requests_loop(daemon, 1, count=plan.serial)
        report_requests(res, "c=1", b1, d1)
    if "c64" in phases:
        phase(f"concurrency 64: {plan.burst_s:g} s each")
        b64 = await requests_loop(base, 64, seconds=plan.burst_s)
        d64 = await requests_loop(daemon, 64, seconds=plan.burst_s)
        report_requests(res, "c=64", b64, d64)
    if "open" in phases:
        rate = round(d64.rps * OPEN_LOAD, -1) if "c64" in phases else OPEN_RATE
        phase(f"64 connections, open loop at {rate:g} requests/s: {plan.burst_s:g} s each")
        bo = await requests_loop(base, 64, seconds=plan.burst_s, rate=rate)
        do = await requests_loop(daemon, 64, seconds=plan.burst_s, rate=rate)
        report_requests(res, f"c=64 at {rate:g}/s", bo, do)
    if "badkeys" in phases:
        phase(
            f"bad keys alone at concurrency {BAD_KEY_CONCURRENCY}, then concurrency 64 with good "
            f"keys, alone and with {plan.bad_key_rate:,.0f} bad-key requests/s: "
            f"{plan.burst_s:g} s each"
        )
        bad = await bad_keys_loop(daemon, BAD_KEY_CONCURRENCY, plan.burst_s)
        alone = await requests_loop(daemon, 64, seconds=plan.burst_s)
        flooded, flood = await under_flood(daemon, plan.burst_s, plan.bad_key_rate)
        report_flood(res, plan.bad_key_rate, bad, alone, flooded, flood)
    if "stream" in phases:
        phase(f"one stream of {plan.long_chunks:,} chunks")
        bl = await long_streams(base, 1, plan.long_chunks)
        dl = await long_streams(daemon, 1, plan.long_chunks)
        report_stream(res, "1 stream", bl, dl)
    if "parallel" in phases:
        n, k = plan.parallel_streams, plan.parallel_chunks
        phase(f"{n} parallel streams of {k:,} chunks")
        bp = await long_streams(base, n, k)
        dp = await long_streams(daemon, n, k)
        report_stream(res, f"{n} streams", bp, dp)
    if "client" in phases:
        phase("client check: httpx vs raw sockets, on the baseline")
        r1 = await requests_loop(base, 1, count=plan.httpx_requests)
        h1 = await httpx_loop(base, 1, plan.httpx_requests)
        r64 = await requests_loop(base, 64, count=plan.httpx_requests * 4)
        h64 = await httpx_loop(base, 64, plan.httpx_requests * 4)
        res.notes.append(
            f"client check (baseline server): TTFT p50 at c=1 raw {ms(r1.pct(0.5))}, httpx "
            f"{ms(h1.pct(0.5))}; req/s at c=64 raw {r64.rps:,.0f} (client CPU "
            f"{r64.usage.client_cpu / r64.usage.elapsed:.2f}), httpx {h64.rps:,.0f} (client CPU "
            f"{h64.usage.client_cpu / h64.usage.elapsed:.2f})"
        )


async def main_async(
    plan: Plan, phases: set[str], daemon: Target, base: Target, res: Results, limits: bool
) -> None:
    await wait_listening(daemon.port)
    await wait_listening(base.port)
    # The same token for both: identical request bytes.
    daemon.token = base.token = await create_api_key(daemon.port, limits)
    async with fake_providers(daemon.port):
        await bench(plan, phases, daemon, base, res)


@contextlib.contextmanager
def profiled(out: Path | None, pid: int) -> Iterator[None]:
    if out is None:
        yield
        return
    spy = Path(sys.executable).with_name("py-spy")
    # Blocking mode (the default) pauses the daemon per sample: slower, but the coroutine
    # stacks come out whole; --nonblocking lost most of them here.
    argv = [str(spy), "record", "--pid", str(pid), "--rate", "500", "--format", "raw",
            "-o", str(out)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def daemon_warnings(log: Path) -> str | None:
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [line for line in text.splitlines() if "WARNING" in line or "ERROR" in line]
    return "daemon log warnings:\n  " + "\n  ".join(lines[-10:]) if lines else None


def daemon_command(line: str | None) -> list[str]:
    """The daemon's argv; a leading `python` means this interpreter."""
    if not line:
        return [sys.executable, "-m", "dinfer", "serve"]
    argv = shlex.split(line)
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (under 30 s)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--py-spy", type=Path, metavar="FILE", help="profile the daemon")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}"
    )
    parser.add_argument(
        "--daemon-command",
        help="run the daemon with this command line instead of `python -m dinfer serve`",
    )
    parser.add_argument(
        "--bad-key-rate",
        type=float,
        default=BAD_KEY_RATE,
        help=f"bad-key requests/s of the badkeys flood (default {BAD_KEY_RATE:g})",
    )
    parser.add_argument(
        "--no-key-limits",
        action="store_true",
        help="a key without limits (a daemon from before per-key limits takes no others)",
    )
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return 0
    plan = dataclasses.replace(QUICK if args.quick else FULL, bad_key_rate=args.bad_key_rate)
    phases = set(args.phases.split(","))
    started, load = time.perf_counter(), os.getloadavg()[0]
    res = Results()
    cpu = None if args.no_pin else DAEMON_CPU
    if cpu is not None:
        pin(0, CLIENT_CPU)
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        work = Path(tmp)
        dport, bport = free_port(), free_port()
        daemon_argv = daemon_command(args.daemon_command)
        base_argv = [sys.executable, __file__, "--serve-baseline", str(bport)]
        with (
            child(daemon_argv, daemon_env(dport, work / "data"), work / "daemon.log", cpu) as dpid,
            child(base_argv, daemon_env(bport, work / "b"), work / "baseline.log", cpu) as bpid,
            profiled(args.py_spy, dpid),
        ):
            daemon, base = Target("daemon", dport, dpid), Target("baseline", bport, bpid)
            try:
                trio.run(main_async, plan, phases, daemon, base, res, not args.no_key_limits)
            except BaseException:
                print((work / "daemon.log").read_text(errors="replace")[-3000:], file=sys.stderr)
                raise
            if warnings := daemon_warnings(work / "daemon.log"):
                res.notes.append(warnings)
    res.print()
    where = (
        "unpinned"
        if cpu is None
        else f"daemon and baseline on CPU {DAEMON_CPU}, client and fakes on CPU {CLIENT_CPU}"
    )
    print(
        f"{FAKES} fake providers x {SLOTS_PER_FAKE} slots; {where}; load average at start "
        f"{load:.2f}; took {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
