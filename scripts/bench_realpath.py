"""What the path users run costs: HTTP client -> `dinfer serve` -> `dinfer provider` -> backend.

Run as `.venv/bin/python scripts/bench_realpath.py [--quick]` (the full run about 10 minutes,
`--quick` about 2). It rewrites its own sections of BENCHMARKS.md (between the
`bench-realpath` and the `bench-realpath-streams` markers, each only when its part ran) and
docs/benchmarks/realpath.png (with the `bench` extra, i.e.
matplotlib; without it the tables are still written). `--no-write` only prints.

Every process is real and its own: the mock backend (`scripts/mock_backend.py`, raw asyncio,
a role chunk, `max_tokens` content chunks, a finish chunk and `[DONE]`), the daemon
(`python -m dinfer serve`, i.e. `dinfer serve`, open provider auth) and the reference node
(`python -m dinfer provider`), each started under `taskset`. The code run is this checkout's
(`PYTHONPATH` is the repository), so a worktree benchmarks its own changes.

Layouts (2 cores):
- shared: the daemon, the node and the backend on CPU 0 ("everything that serves a request on
  one core"), the clients (this process, wrk) on CPU 1.
- alone: the daemon alone on CPU 0; the node, the backend and the clients on CPU 1.

Clients: this process's raw-socket HTTP/1.1 client (keep-alive, one connection per concurrent
stream; `bench_dispatch.RawConnection`) gives the time to first token (TTFT: request sent to the
chunk with the first content) of every request, and runs each phase as a closed loop that
stops issuing at the phase's end and lets what is in flight finish, so CPU per request is CPU
over completed requests with nothing cut off. `wrk` (`--no-wrk` skips it), with a Lua script
for the POST body, gives requests/s and whole-response latency from a C client: the only client
fast enough for the bare backend. wrk stops at a fixed time and cuts off what is in flight, so
through the daemon it runs the short answers only. Before each phase the servers must go idle
(under 5% of a core), so nothing an earlier phase left behind is counted in the next.

Daemon settings are the defaults but for `DINFER_QUEUE_MAX=20000` (5,000 streams queue) and
`DINFER_TTFT_BASE_S=300`: 256 long streams at once on one core wait longer than the default
5 s first-token deadline, and the benchmark measures cost, not load shedding. `--quick` runs
the long answers through the daemon at c=1 and 16 only (each round at c=256 takes minutes on
today's daemon).

CPU per request and per chunk, for the daemon and the node separately, is utime + stime from
/proc/<pid>/stat before and after each phase, divided by the requests completed. Per chunk:
(CPU per long request - CPU per short request) / (events per long - events per short), at the
same concurrency: what a request costs once cancels. Events per answer: role, content chunks,
finish, [DONE]: 7 for `max_tokens` 4, 259 for 256. CPU from /proc does not depend on what else
runs on the machine; requests/s and latencies do (a shared machine makes them pessimistic).

The bare-server baseline is the same clients against the mock backend directly. "Added TTFT" =
TTFT percentile through the daemon - the same percentile of the bare backend, same client and
concurrency, in the same run. `--litellm PATH` (a venv's `litellm` executable) adds LiteLLM's
proxy in front of the same mock, in the shared layout.

Many open streams: `--streams` (5,000; 1,000 with --quick) streams of a token every
`--stream-interval` seconds (1; `mock_backend.py --token-interval`) through one daemon alone on
CPU 0, served by `--stream-nodes` nodes of up to 1,024 slots each (the protocol's bound) on
CPU 1, opened at up to `--stream-ramp` a second with at most 64 waiting for their first token
(a daemon slower than the ramp would otherwise leave accepted connections unread past its 5 s
keep-alive timer, which resets them), by one trio task per connection in this process: the
daemon's RSS (VmRSS) before, while they are open and after they close, its CPU while they
trickle, and the node sessions lost meanwhile. The nodes run through
`scripts/realpath_node.py`: the node's backend pool (httpx's default, 100 connections) would
otherwise cap each node at 100 open streams. The soft RLIMIT_NOFILE is raised to the hard
limit, which the children inherit.

`--parts load,streams` picks what runs; `--logs DIR` keeps every process's log and state.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from bench_dispatch import (  # noqa: E402
    ADMIN_KEY,
    MARK,
    MODEL,
    REPO,
    HTTPError,
    RawConnection,
    create_api_key,
    free_port,
    request_body,
)
from realpath_stats import (  # noqa: E402
    WrkSummary,
    parse_wrk,
    per_chunk,
    percentile,
    stat_ticks,
    vm_rss_kib,
)

SERVE_CPU = 0
CLIENT_CPU = 1
SHORT = 4  # content chunks of a short answer: 7 events
LONG = 256  # content chunks of a long answer: 259 events
GOAL_LONG = 64  # the goals' "64-token streams, c=16"
CONCURRENCIES = (1, 16, 64, 256)
NODE_SLOTS = 1024  # protocol.messages.MAX_CONCURRENCY
REQUEST_TIMEOUT_S = 120.0
LITELLM_KEY = "sk-bench-0123456789abcdef0123456789abcdef"
OPENING_WINDOW = 64  # slow streams opening at once
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCHMARKS = REPO / "BENCHMARKS.md"
FIGURE = REPO / "docs" / "benchmarks" / "realpath.png"


def events_of(content_chunks: int) -> int:
    return content_chunks + 3


@dataclass(frozen=True)
class Plan:
    phase_s: float  # seconds a raw-client phase keeps issuing requests
    wrk_s: float  # seconds of each wrk run
    ttft_requests: int  # requests of the c=1 TTFT phase
    streams: int
    stream_hold_s: float  # seconds measured with every slow stream open
    long_concurrencies: tuple[int, ...]  # through the daemon, where each round is slow


FULL = Plan(
    phase_s=8.0,
    wrk_s=8.0,
    ttft_requests=2000,
    streams=5000,
    stream_hold_s=20.0,
    long_concurrencies=CONCURRENCIES,
)
QUICK = Plan(
    phase_s=2.0,
    wrk_s=2.0,
    ttft_requests=300,
    streams=1000,
    stream_hold_s=5.0,
    long_concurrencies=(1, 16),
)


# Processes ---------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    return stat_ticks(Path(f"/proc/{pid}/stat").read_text()) / CLK_TCK


def rss_mib(pid: int) -> float:
    return vm_rss_kib(Path(f"/proc/{pid}/status").read_text()) / 1024


def pin_all(pid: int, cpu: int) -> None:
    """Every thread of `pid` onto `cpu` (what `taskset -a -p` does)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), {cpu})


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


class Processes:
    """Owns the children: each one is stopped (SIGINT, then SIGKILL) when the block ends."""

    def __init__(self, stack: contextlib.ExitStack, workdir: Path) -> None:
        self._stack = stack
        self.workdir = workdir

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], cpu: int) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                ["taskset", "-c", str(cpu), *argv],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only: we stop them in order
            )
        proc = Proc(name, popen, log)
        self._stack.callback(_stop, proc)
        return proc


def _stop(proc: Proc) -> None:
    if proc.popen.poll() is not None:
        return
    proc.popen.send_signal(signal.SIGTERM)  # the daemon and the node drain, 1 s of grace
    try:
        proc.popen.wait(timeout=8)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        proc.popen.wait()


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINFER_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def daemon_env(port: int, data_dir: Path) -> dict[str, str]:
    return {
        **base_env(),
        "DINFER_LISTEN": f"127.0.0.1:{port}",
        "DINFER_PROVIDER_AUTH": "open",
        "DINFER_ADMIN_KEY": ADMIN_KEY,
        "DINFER_DATA_DIR": str(data_dir),
        "DINFER_LOG_LEVEL": "warning",
        "DINFER_METRICS_LISTEN": "off",  # another daemon on this machine may hold the default
        "DINFER_DRAIN_GRACE_S": "1",
        "DINFER_QUEUE_MAX": "20000",  # 5,000 streams must queue, not be refused
        # A saturated core must slow requests down, not fail them: 256 long streams at once
        # wait longer than the default 5 s for their first token. The benchmark measures
        # cost, not load shedding.
        "DINFER_TTFT_BASE_S": "300",
    }


@dataclass
class Stack:
    """The serving processes of one layout; `node_pids` may be several."""

    backend: Proc
    daemon: Proc | None
    nodes: list[Proc]
    port: int  # where the client connects: the daemon's, or the backend's for the baseline
    backend_port: int
    token: str = "unused"

    @property
    def daemon_pid(self) -> int | None:
        return self.daemon.pid if self.daemon else None

    def check(self) -> None:
        for proc in [self.backend, *self.nodes, *([self.daemon] if self.daemon else [])]:
            proc.check()


async def start_stack(
    procs: Processes,
    *,
    nodes: int = 1,
    slots: int = NODE_SLOTS,
    token_interval: float = 0.0,
    daemon_cpu: int = SERVE_CPU,
    node_cpu: int = SERVE_CPU,
    lift_pool: bool = False,
) -> Stack:
    py = sys.executable
    backend_port, port = free_port(), free_port()
    backend = procs.start(
        "backend",
        [
            py,
            str(SCRIPTS / "mock_backend.py"),
            "--port",
            str(backend_port),
            "--model",
            MODEL,
            "--token-interval",
            str(token_interval),
        ],
        base_env(),
        node_cpu,
    )
    await wait_listening(backend_port, backend)
    data_dir = procs.workdir / f"daemon-{port}"
    daemon = procs.start(
        "daemon", [py, "-m", "dinfer", "serve"], daemon_env(port, data_dir), daemon_cpu
    )
    await wait_listening(port, daemon)
    stack = Stack(backend, daemon, [], port, backend_port)
    stack.token = await create_api_key(port)
    for index in range(nodes):
        argv = [
            *node_command(py, lift_pool),
            "--coordinator", f"ws://127.0.0.1:{port}/ws/provider",
            "--backend", f"http://127.0.0.1:{backend_port}",
            "--max-concurrency", str(slots),
            "--state-dir", str(procs.workdir / f"node-{port}-{index}"),
            "--backend-name", "vllm",
            "--log-level", "warning",
            "--drain-grace", "1",
        ]  # fmt: skip
        env = {**base_env(), "DINFER_BENCH_NODE_POOL": str(slots)}
        stack.nodes.append(procs.start(f"node{index}", argv, env, node_cpu))
    await wait_routable(stack, nodes)
    return stack


async def wait_listening(port: int, proc: Proc | None = None, bound_s: float = 30) -> None:
    """Until `port` accepts a connection; fails if `proc` exits first or after `bound_s`."""
    with trio.fail_after(bound_s):
        while True:
            if proc is not None:
                proc.check()
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.1)
                continue
            await stream.aclose()
            return


def node_command(py: str, lift_pool: bool) -> list[str]:
    if lift_pool:
        return [py, str(SCRIPTS / "realpath_node.py")]
    return [py, "-m", "dinfer", "provider"]


async def wait_routable(stack: Stack, providers: int) -> None:
    """Until /v1/models lists the model with `providers` routable providers."""
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.port}") as client:
        with trio.fail_after(60):
            while True:
                stack.check()
                response = await client.get(
                    "/v1/models", headers={"Authorization": f"Bearer {stack.token}"}
                )
                counts = [m.get("providers", 0) for m in response.json().get("data", [])]
                if counts and counts[0] >= providers:
                    return
                await trio.sleep(0.2)


# Measurements ------------------------------------------------------------------------------


@dataclass
class CpuMeter:
    """CPU seconds of each watched process over a block, and the wall time."""

    pids: dict[str, int]
    used: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    client: float = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        before = {name: cpu_s(pid) for name, pid in self.pids.items()}
        wall, client = time.perf_counter(), time.process_time()
        yield
        self.elapsed = time.perf_counter() - wall
        self.client = time.process_time() - client
        self.used = {name: cpu_s(pid) - before[name] for name, pid in self.pids.items()}


def watched(stack: Stack, *, bare: bool = False) -> dict[str, int]:
    if bare:
        return {"backend": stack.backend.pid}
    pids = {"backend": stack.backend.pid, "node": stack.nodes[0].pid}
    if stack.daemon is not None:
        pids["daemon"] = stack.daemon.pid
    return pids


@dataclass
class Phase:
    """One closed-loop run of the raw client: every request's TTFT, CPU per process."""

    target: str
    tokens: int
    concurrency: int
    ttfts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    meter: CpuMeter = field(default_factory=lambda: CpuMeter({}))
    wrk: WrkSummary | None = None

    @property
    def done(self) -> int:
        return len(self.ttfts)

    @property
    def rps(self) -> float:
        return self.done / self.meter.elapsed if self.meter.elapsed else 0.0

    def cpu_per_request(self, name: str) -> float:
        used = self.meter.used.get(name)
        return used / self.done if used is not None and self.done else math.nan

    @property
    def chunks_per_s(self) -> float:
        return self.rps * events_of(self.tokens)


async def closed_loop(
    stack: Stack,
    pids: dict[str, int],
    target: str,
    tokens: int,
    concurrency: int,
    seconds: float,
    *,
    count: int | None = None,
) -> Phase:
    """`concurrency` keep-alive connections issuing requests back to back for `seconds` (or
    `count` requests in all); requests in flight at the end finish and count."""
    phase = Phase(target, tokens, concurrency, meter=CpuMeter(pids))
    body = request_body(tokens)
    expected = events_of(tokens)
    conns = [await RawConnection.open(stack.port) for _ in range(concurrency)]
    remaining = [count if count is not None else 1 << 60]
    deadline = [math.inf]

    async def worker(conn: RawConnection) -> None:
        request = conn.request_bytes(body, stack.token)
        while remaining[0] > 0 and time.perf_counter() < deadline[0]:
            remaining[0] -= 1
            sent = time.perf_counter()
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    response = await conn.post(request)
                if response.in_band_errors or response.events != expected:
                    raise HTTPError(f"{response.events} events, {response.in_band_errors} errors")
            except (HTTPError, trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
                phase.errors += 1
                phase.first_error = phase.first_error or f"{type(exc).__name__}: {exc}"
                conn.closing = True
            else:
                phase.ttfts.append(response.ttft)
                phase.latencies.append(response.end_at - sent)
            if conn.closing:
                await conn.aclose()
                conn = await RawConnection.open(stack.port)
                request = conn.request_bytes(body, stack.token)
        await conn.aclose()

    with phase.meter.measure():
        deadline[0] = time.perf_counter() + seconds
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(worker, conn)
    return phase


WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"connect": %d, "read": %d, "write": %d, "timeout": %d, "status": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.timeout, e.status))
end
"""


async def run_wrk(
    stack: Stack, workdir: Path, tokens: int, concurrency: int, seconds: float
) -> WrkSummary:
    script = workdir / f"wrk-{tokens}.lua"
    script.write_text(WRK_LUA.format(body=request_body(tokens).decode(), token=stack.token))
    argv = [
        "taskset", "-c", str(CLIENT_CPU), "wrk", "-t1", f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--timeout", "60s", "-s", str(script), f"http://127.0.0.1:{stack.port}/v1/chat/completions",
    ]  # fmt: skip
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return parse_wrk(result.stdout.decode())


# The phases --------------------------------------------------------------------------------


@dataclass
class Options:
    plan: Plan
    concurrencies: tuple[int, ...]
    wrk: bool
    litellm: str | None
    streams: int
    stream_nodes: int
    stream_ramp: float
    stream_interval: float
    parts: frozenset[str]
    workdir: Path
    lift_pool: bool


def say(text: str) -> None:
    print(text, flush=True)


async def load_phases(
    stack: Stack, opts: Options, target: str, bare: bool
) -> dict[tuple[int, int], Phase]:
    """Short and long answers at every concurrency, plus the goals' 64-token c=16."""
    pids = watched(stack, bare=bare)
    long_cs = opts.concurrencies if bare else opts.plan.long_concurrencies
    shapes = [(SHORT, c) for c in opts.concurrencies]
    shapes += [(LONG, c) for c in opts.concurrencies if c in long_cs]
    if 16 in opts.concurrencies:
        shapes.append((GOAL_LONG, 16))
    await closed_loop(stack, pids, target, SHORT, 4, 1.0)  # warm-up: connections, caches
    phases: dict[tuple[int, int], Phase] = {}
    for tokens, concurrency in shapes:
        await settle(pids)
        phase = await closed_loop(stack, pids, target, tokens, concurrency, opts.plan.phase_s)
        # wrk runs for a fixed time and cuts off what is in flight: short answers only (and
        # the bare backend's long ones, each a fraction of a millisecond).
        if opts.wrk and (tokens == SHORT or bare):
            await settle(pids)
            phase.wrk = await run_wrk(stack, opts.workdir, tokens, concurrency, opts.plan.wrk_s)
        stack.check()
        phases[(tokens, concurrency)] = phase
        say(describe(phase))
    return phases


async def settle(pids: dict[str, int]) -> None:
    """Until the watched processes are idle (under 5% of a core over 0.3 s), at most 60 s:
    what an earlier phase left behind (wrk's cut-off requests) must not count in the next."""
    with trio.move_on_after(60):
        while True:
            meter = CpuMeter(pids)
            with meter.measure():
                await trio.sleep(0.3)
            if sum(meter.used.values()) < 0.05 * meter.elapsed:
                return
    say("  (the servers did not go idle within 60 s)")


async def ttft_phase(stack: Stack, opts: Options, target: str, bare: bool) -> Phase:
    phase = await closed_loop(
        stack, watched(stack, bare=bare), target, SHORT, 1, math.inf,
        count=opts.plan.ttft_requests,
    )  # fmt: skip
    say(describe(phase))
    return phase


def describe(phase: Phase) -> str:
    parts = [
        f"{phase.target:8} tokens={phase.tokens:<3} c={phase.concurrency:<3}",
        f"{phase.rps:8.1f} req/s",
        f"ttft p50 {ms(percentile(phase.ttfts, 0.5))} p99 {ms(percentile(phase.ttfts, 0.99))}",
    ]
    for name in ("daemon", "node", "litellm", "backend"):
        if name in phase.meter.used:
            parts.append(f"{name} {ms(phase.cpu_per_request(name))}/req")
    parts.append(f"client busy {phase.meter.client / phase.meter.elapsed:.2f}")
    if phase.wrk:
        parts.append(f"| wrk {phase.wrk.rps:.1f} req/s p50 {ms(phase.wrk.p50_s)}")
        if phase.wrk.errors:
            parts.append(f"wrk errors {phase.wrk.errors}")
    if phase.errors:
        parts.append(f"ERRORS {phase.errors}: {phase.first_error}")
    return "  ".join(parts)


@dataclass
class StreamsResult:
    requested: int
    opened: int = 0
    failed: int = 0
    first_error: str = ""
    ramp_s: float = 0.0
    rss_before_mib: float = 0.0
    rss_open_mib: float = 0.0
    rss_after_mib: float = 0.0
    node_rss_mib: float = 0.0
    cpu_open: float = 0.0  # daemon CPU seconds per second while every stream is open
    node_cpu_open: float = 0.0  # the nodes together
    chunks_per_s: float = 0.0  # received by the client while every stream is open
    nofile: int = 0
    nodes: int = 0
    interval_s: float = 1.0
    sessions_lost: int = 0  # node sessions that ended during the phase (from the nodes' logs)


async def many_streams(procs: Processes, opts: Options) -> StreamsResult:
    """`opts.streams` slow streams held open through one daemon alone on its core."""
    result = StreamsResult(requested=opts.streams)
    result.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    nodes = max(opts.stream_nodes, math.ceil(opts.streams / NODE_SLOTS))
    slots = min(NODE_SLOTS, math.ceil(opts.streams / nodes))
    result.nodes = nodes
    result.interval_s = opts.stream_interval
    stack = await start_stack(
        procs,
        nodes=nodes,
        slots=slots,
        token_interval=opts.stream_interval,
        node_cpu=CLIENT_CPU,
        lift_pool=True,
    )
    assert stack.daemon is not None
    daemon = stack.daemon.pid
    await trio.sleep(1.0)
    result.rss_before_mib = rss_mib(daemon)
    body = request_body(3600)  # one token a second: an hour, longer than any run
    received = [0]
    # At most OPENING_WINDOW streams between request and first token: a daemon slower than
    # the ramp would otherwise leave accepted connections unread past its 5 s keep-alive
    # timer, which then closes them (with a reset, the request unread).
    window = trio.Semaphore(OPENING_WINDOW)
    settled = [0]
    all_settled = trio.Event()

    def done_opening() -> None:
        window.release()
        settled[0] += 1
        if settled[0] == opts.streams:
            all_settled.set()

    async def stream() -> None:
        try:
            conn = await trio.open_tcp_stream("127.0.0.1", stack.port)
        except OSError as exc:
            _stream_failed(result, exc)
            done_opening()
            return
        async with conn:
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {stack.token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            first = True
            start = b""
            try:
                await conn.send_all(head + body)
                while data := await conn.receive_some(16384):
                    if first:
                        start += data
                        if not start.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" in start:
                            raise HTTPError(start[:300].decode(errors="replace"))
                        if MARK not in start:
                            continue
                        first = False
                        result.opened += 1
                        done_opening()
                    received[0] += data.count(b"data: ")
                raise HTTPError("closed")
            except (HTTPError, OSError, trio.BrokenResourceError) as exc:
                if first:
                    done_opening()
                _stream_failed(result, exc)

    async with trio.open_nursery() as nursery:
        start = time.perf_counter()
        with trio.move_on_after(opts.streams / opts.stream_ramp + 300):
            for index in range(opts.streams):
                await trio.sleep_until(
                    trio.current_time()
                    + max(0.0, start + index / opts.stream_ramp - time.perf_counter())
                )
                await window.acquire()
                nursery.start_soon(stream)
            await all_settled.wait()
        result.ramp_s = time.perf_counter() - start
        say(f"streams: {result.opened} open, {result.failed} failed after {result.ramp_s:.1f} s")
        await trio.sleep(2.0)  # the ramp's last requests settle
        meter = CpuMeter(
            {"daemon": daemon, **{f"node{i}": n.pid for i, n in enumerate(stack.nodes)}}
        )
        first_count = received[0]
        with meter.measure():
            await trio.sleep(opts.plan.stream_hold_s)
        result.chunks_per_s = (received[0] - first_count) / meter.elapsed
        result.rss_open_mib = rss_mib(daemon)
        result.node_rss_mib = sum(rss_mib(n.pid) for n in stack.nodes)
        result.cpu_open = meter.used["daemon"] / meter.elapsed
        result.node_cpu_open = (
            sum(v for k, v in meter.used.items() if k != "daemon") / meter.elapsed
        )
        nursery.cancel_scope.cancel(reason="streams measured")
    await trio.sleep(5.0)  # the daemon notices the closed connections and ends each stream
    result.rss_after_mib = rss_mib(daemon)
    result.sessions_lost = sum(
        node.log.read_text(errors="replace").count("session ended") for node in stack.nodes
    )
    stack.check()
    say(
        f"streams: daemon RSS {result.rss_before_mib:.0f} -> {result.rss_open_mib:.0f} -> "
        f"{result.rss_after_mib:.0f} MiB, CPU {result.cpu_open:.2f} core, "
        f"{result.chunks_per_s:.0f} chunks/s, nodes {result.node_cpu_open:.2f} core"
    )
    return result


def _stream_failed(result: StreamsResult, exc: BaseException) -> None:
    result.failed += 1
    result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"[:300]


@dataclass
class Results:
    shared: dict[tuple[int, int], Phase] = field(default_factory=dict)
    bare: dict[tuple[int, int], Phase] = field(default_factory=dict)
    alone: dict[tuple[int, int], Phase] = field(default_factory=dict)
    litellm: dict[tuple[int, int], Phase] = field(default_factory=dict)
    ttft: dict[str, Phase] = field(default_factory=dict)
    streams: StreamsResult | None = None
    litellm_version: str = ""
    load_start: str = ""
    load_end: str = ""
    started: str = ""
    elapsed_s: float = 0.0


async def bench(opts: Options, results: Results) -> None:
    if "load" in opts.parts:
        await load_parts(opts, results)
    if opts.litellm:
        results.litellm = await litellm_phases(opts)
        version = await trio.run_process(
            [str(Path(opts.litellm).parent / "python"), "-c",
             "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_stdout=True, check=False,
        )  # fmt: skip
        results.litellm_version = version.stdout.decode().strip() or "unknown version"
    if "streams" in opts.parts and opts.streams > 0:
        say(f"== {opts.streams} slow streams through one daemon alone on CPU 0")
        with contextlib.ExitStack() as stack_owner:
            results.streams = await many_streams(Processes(stack_owner, opts.workdir), opts)


async def load_parts(opts: Options, results: Results) -> None:
    with contextlib.ExitStack() as stack_owner:
        procs = Processes(stack_owner, opts.workdir)
        say("== shared layout: daemon, node and backend on CPU 0; clients on CPU 1")
        stack = await start_stack(procs, lift_pool=opts.lift_pool)
        bare = dataclasses.replace(stack, daemon=None, nodes=[], port=stack.backend_port)
        results.ttft["bare"] = await ttft_phase(bare, opts, "bare", bare=True)
        results.ttft["daemon"] = await ttft_phase(stack, opts, "daemon", bare=False)
        results.bare = await load_phases(bare, opts, "bare", bare=True)
        results.shared = await load_phases(stack, opts, "daemon", bare=False)
        say("== alone layout: the daemon alone on CPU 0; node, backend, clients on CPU 1")
        for proc in (stack.backend, *stack.nodes):
            pin_all(proc.pid, CLIENT_CPU)
        pids = watched(stack)
        for tokens, concurrency in ((SHORT, 64), (GOAL_LONG, 16), (LONG, 16)):
            await settle(pids)
            phase = await closed_loop(stack, pids, "alone", tokens, concurrency, opts.plan.phase_s)
            if opts.wrk and tokens == SHORT:
                phase.wrk = await run_wrk(stack, opts.workdir, tokens, concurrency, opts.plan.wrk_s)
            results.alone[(tokens, concurrency)] = phase
            say(describe(phase))


async def litellm_phases(opts: Options) -> dict[tuple[int, int], Phase]:
    """LiteLLM's proxy in front of the same mock, on CPU 0 with it; short and 64-token."""
    assert opts.litellm is not None
    with contextlib.ExitStack() as stack_owner:
        procs = Processes(stack_owner, opts.workdir)
        backend_port, port = free_port(), free_port()
        backend = procs.start(
            "litellm-backend",
            [sys.executable, str(SCRIPTS / "mock_backend.py"), "--port", str(backend_port)],
            base_env(),
            SERVE_CPU,
        )
        await wait_listening(backend_port)
        config = opts.workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: http://127.0.0.1:{backend_port}/v1\n"
            "      api_key: none\n"
        )
        env = {
            **base_env(),
            "LITELLM_LOG": "ERROR",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map at start
            "LITELLM_MASTER_KEY": LITELLM_KEY,
        }
        proxy = procs.start(
            "litellm",
            [opts.litellm, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", "1"],
            env,
            SERVE_CPU,
        )  # fmt: skip
        await wait_listening(port, proxy, bound_s=180)
        stack = Stack(backend, None, [], port, backend_port, token=LITELLM_KEY)
        pids = {"litellm": proxy.pid, "backend": backend.pid}
        await closed_loop(stack, pids, "litellm", SHORT, 4, 2.0)
        phases = {}
        for tokens, concurrency in ((SHORT, 1), (SHORT, 16), (GOAL_LONG, 16)):
            phase = await closed_loop(
                stack, pids, "litellm", tokens, concurrency, opts.plan.phase_s
            )
            phases[(tokens, concurrency)] = phase
            say(describe(phase))
        return phases


# Report ------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.2f} ms"


def us(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e6:.0f} µs"


def num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}"


def met(ok: bool) -> str:
    return "met" if ok else "not met"


def chunk_cost(
    phases: dict[tuple[int, int], Phase], name: str, long: int, c: int, short: int = SHORT
) -> float:
    if (long, c) not in phases or (short, c) not in phases:
        return math.nan
    return per_chunk(
        phases[(long, c)].cpu_per_request(name),
        phases[(short, c)].cpu_per_request(name),
        events_of(long),
        events_of(short),
    )


def inverse(value: float) -> float:
    return 1 / value if value > 0 else math.nan


def added(phase: Phase, base: Phase, q: float) -> float:
    return percentile(phase.ttfts, q) - percentile(base.ttfts, q)


def run_line(results: Results, opts: Options, command: str) -> str:
    return (
        f"A {'quick' if opts.plan is QUICK else 'full'} run of {results.started}, "
        f"{results.elapsed_s:.0f} s: 2 cores, load average {results.load_start} at the start "
        f"and {results.load_end} at the end. Command: `{command}`. The machine was shared "
        "with other work: CPU per request and per chunk (from /proc, per process) hold "
        "whatever else runs; requests/s and latencies are pessimistic.\n"
    )


def report(results: Results, opts: Options, command: str) -> dict[str, str]:
    """The Markdown blocks this run rewrites, by marker: the load phases, the open streams."""
    blocks = {}
    if results.shared or results.litellm:
        blocks["bench-realpath"] = load_report(results, opts, command)
    if results.streams:
        out: list[str] = []
        write_streams(out.append, results, opts, command)
        blocks["bench-realpath-streams"] = "\n".join(out)
    return blocks


def load_report(results: Results, opts: Options, command: str) -> str:
    out: list[str] = []
    write = out.append
    write("## The real path (`scripts/bench_realpath.py`)\n")
    write(run_line(results, opts, command))
    write(
        "Path: raw-socket HTTP/1.1 keep-alive client (and wrk) on CPU 1 -> `dinfer serve` -> "
        "`dinfer provider` (the reference node, over the encrypted WebSocket protocol) -> "
        "`scripts/mock_backend.py` (raw asyncio, answers at once). Shared layout: daemon, node "
        "and backend on CPU 0. Answers: `max_tokens` 4 (7 events) and 256 (259 events). "
        "How each figure is made is in the script's docstring.\n"
    )
    write_goals(write, results)
    write_ttft(write, results)
    write_load(write, results)
    if results.litellm:
        write(
            f"LiteLLM ({results.litellm_version}) rows: its proxy (one worker) in front of the "
            "same mock on CPU 0, its CPU in the daemon column.\n"
        )
    write_notes(write, results, opts)
    write(f"![overhead against concurrency](docs/benchmarks/{FIGURE.name})\n")
    return "\n".join(out)


def row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def write_goals(write: Any, r: Results) -> None:
    s16 = r.shared.get((SHORT, 16))
    d_req = s16.cpu_per_request("daemon") if s16 else math.nan
    n_req = s16.cpu_per_request("node") if s16 else math.nan
    d_chunk = chunk_cost(r.shared, "daemon", GOAL_LONG, 16)
    n_chunk = chunk_cost(r.shared, "node", GOAL_LONG, 16)
    alone = r.alone.get((SHORT, 64))
    alone_rps = alone.rps if alone else math.nan
    alone_cap = inverse(alone.cpu_per_request("daemon")) if alone else math.nan
    relay = r.alone.get((LONG, 16))
    relay_cps = relay.chunks_per_s if relay else math.nan
    # Alone, per chunk from the 256- and 64-token phases at c=16 (no short one runs there).
    relay_cap = inverse(chunk_cost(r.alone, "daemon", LONG, 16, short=GOAL_LONG))
    ttft = added(r.ttft["daemon"], r.ttft["bare"], 0.5) if r.ttft else math.nan
    write("### Goals (issue 13)\n")
    write(row("figure", "goal", "measured", ""))
    write(row("---", "---", "---", "---"))
    write(
        row(
            "daemon CPU per short request (7 events), c=16", "≤ 1 ms", ms(d_req), met(d_req <= 1e-3)
        )
    )
    write(
        row(
            "short requests/s, daemon alone on its core, c=64",
            "≥ 1,000",
            f"{num(alone_rps)} measured; {num(alone_cap)} from its CPU",
            met(alone_cap >= 1000),
        )
    )
    write(
        row(
            "daemon CPU per relayed chunk, 64-token streams, c=16",
            "≤ 15 µs",
            us(d_chunk),
            met(d_chunk <= 15e-6),
        )
    )
    write(
        row(
            "relayed chunks/s, daemon alone on its core, real node (256-token streams, c=16)",
            "≥ 60,000",
            f"{num(relay_cps)} measured; {num(relay_cap)} from its CPU per chunk",
            met(relay_cap >= 60000),
        )
    )
    write(
        row(
            "added TTFT p50 at concurrency 1, daemon + node on one core",
            "≤ 1.5 ms",
            ms(ttft),
            met(ttft <= 1.5e-3),
        )
    )
    write(row("5,000 idle open streams", "< 1 GiB RSS", "in the next section", ""))
    write(
        row(
            "provider node CPU per short request / per chunk (c=16)",
            "≤ 0.7 ms / ≤ 20 µs",
            f"{ms(n_req)} / {us(n_chunk)}",
            met(n_req <= 0.7e-3 and n_chunk <= 20e-6),
        )
        + "\n"
    )
    write(
        '"From its CPU" is 1 / the daemon\'s CPU per request (or per chunk): what one core '
        "would carry with nothing else on it. Measured rates in the alone layout are bounded "
        "by the node and the client sharing the other core.\n"
    )


def write_ttft(write: Any, r: Results) -> None:
    if not r.ttft:
        return
    bare, dmn = r.ttft["bare"], r.ttft["daemon"]
    write("### Time to first token at concurrency 1 (raw client, short answers)\n")
    write("| | requests | p50 | p99 | daemon CPU/request | node CPU/request |")
    write("|---|---|---|---|---|---|")
    p50, p99 = percentile(bare.ttfts, 0.5), percentile(bare.ttfts, 0.99)
    write(row("bare backend", f"{bare.done:,}", ms(p50), ms(p99), "", ""))
    write(
        f"| through daemon + node | {dmn.done:,} | {ms(percentile(dmn.ttfts, 0.5))} | "
        f"{ms(percentile(dmn.ttfts, 0.99))} | {ms(dmn.cpu_per_request('daemon'))} | "
        f"{ms(dmn.cpu_per_request('node'))} |"
    )
    write(f"| added | | {ms(added(dmn, bare, 0.5))} | {ms(added(dmn, bare, 0.99))} | | |\n")


def write_load(write: Any, r: Results) -> None:
    write("### Load phases (shared layout; closed loop at each concurrency)\n")
    write(
        "| target | tokens | c | req/s | TTFT p50 / p99 | added TTFT p50 | daemon CPU/req | "
        "node CPU/req | chunks/s | wrk req/s | wrk latency p50 / p99 | errors |"
    )
    write("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, phases in (
        ("bare", r.bare),
        ("daemon", r.shared),
        ("alone", r.alone),
        ("litellm", r.litellm),
    ):
        for (tokens, c), p in phases.items():
            base = r.bare.get((tokens, c))
            add = ms(added(p, base, 0.5)) if base and name != "bare" else ""
            cpu_d = (
                ms(p.cpu_per_request("daemon" if name != "litellm" else "litellm"))
                if name != "bare"
                else ""
            )
            cpu_n = ms(p.cpu_per_request("node")) if name not in ("bare", "litellm") else ""
            w = p.wrk
            wrk_rps = f"{w.rps:,.0f}" if w else ""
            wrk_lat = f"{ms(w.p50_s)} / {ms(w.p99_s)}" if w else ""
            errors = p.errors + (w.errors if w else 0)
            write(
                f"| {name} | {tokens} | {c} | {p.rps:,.0f} | {ms(percentile(p.ttfts, 0.5))} / "
                f"{ms(percentile(p.ttfts, 0.99))} | {add} | {cpu_d} | {cpu_n} | "
                f"{p.chunks_per_s:,.0f} | {wrk_rps} | {wrk_lat} | {errors} |"
            )
    write("")
    write("Per relayed chunk ((CPU per long request - per short) / (259 - 7) events):\n")
    write("| c | daemon µs/chunk | node µs/chunk |")
    write("|---|---|---|")
    for c in sorted({c for (_, c) in r.shared}):
        write(
            row(
                c,
                us(chunk_cost(r.shared, "daemon", LONG, c)),
                us(chunk_cost(r.shared, "node", LONG, c)),
            )
        )
    write(
        f"| 16 (64-token) | {us(chunk_cost(r.shared, 'daemon', GOAL_LONG, 16))} | "
        f"{us(chunk_cost(r.shared, 'node', GOAL_LONG, 16))} |\n"
    )
    write(
        "Reading it: at c ≥ 16 the closed loop saturates CPU 0, so TTFT there is mostly "
        "queueing behind the other streams (about c x CPU per request).\n"
    )


def write_streams(write: Any, r: Results, opts: Options, command: str) -> None:
    s = r.streams
    if s is None:
        return
    write("## Open slow streams (`scripts/bench_realpath.py --parts streams`)\n")
    write(run_line(r, opts, command))
    ok = s.opened >= s.requested and s.rss_open_mib < 1024
    write(
        f"Goal (issue 13): {s.requested:,} idle open streams in < 1 GiB of daemon RSS: "
        f"{s.rss_open_mib:,.0f} MiB with {s.opened:,} open ({met(ok)}).\n"
    )
    write(
        f"One daemon alone on CPU 0; {s.nodes} nodes, the backend and the client "
        f"on CPU 1; streams opened at {opts.stream_ramp:.0f}/s; RLIMIT_NOFILE {s.nofile}.\n"
    )
    write(
        "| streams open / failed | ramp | daemon RSS before / open / after close | "
        "daemon CPU while open | chunks/s relayed | daemon µs/chunk | nodes RSS / CPU |"
    )
    write("|---|---|---|---|---|---|---|")
    per = s.cpu_open / s.chunks_per_s if s.chunks_per_s else math.nan
    write(
        f"| {s.opened:,} / {s.failed:,} | {s.ramp_s:.1f} s | {s.rss_before_mib:.0f} / "
        f"{s.rss_open_mib:.0f} / {s.rss_after_mib:.0f} MiB | {s.cpu_open:.2f} core | "
        f"{s.chunks_per_s:,.0f} | {us(per)} | "
        f"{s.node_rss_mib:.0f} MiB / {s.node_cpu_open:.2f} core |\n"
    )
    offered = s.opened / s.interval_s
    write(
        f"Offered while open: {offered:,.0f} chunks/s ({s.opened:,} streams / {s.interval_s:g} s); "
        f"node sessions lost during the phase: {s.sessions_lost}.\n"
    )
    if s.first_error:
        write(f"First failure: `{s.first_error}`\n")


def node_pool() -> tuple[int, int] | None:
    """The node's backend connection pool (connections, kept alive), if httpx says."""
    try:
        from provider.backend import open_client

        pool = open_client(1.0)._transport._pool  # type: ignore[attr-defined]
        return int(pool._max_connections), int(pool._max_keepalive_connections)
    except Exception:
        return None


def write_notes(write: Any, r: Results, opts: Options) -> None:
    notes = []
    pool = node_pool()
    if pool is not None and pool[0] < NODE_SLOTS and not opts.lift_pool:
        notes.append(
            f"The node's backend client has a pool of {pool[0]} connections ({pool[1]} kept "
            f"alive): above {pool[1]} concurrent requests it opens and closes backend "
            f"connections, above {pool[0]} requests wait in the node. The load phases use it "
            "as it is; the streams phase lifts it (`scripts/realpath_node.py`)."
        )
    for name, phases in (("daemon", r.shared), ("alone", r.alone), ("bare", r.bare)):
        for (tokens, c), p in phases.items():
            if p.errors:
                notes.append(
                    f"{name}, max_tokens {tokens}, c={c}: {p.errors} failed requests "
                    f"(first: `{p.first_error[:160]}`); CPU per request counts successes only."
                )
    if notes:
        write("### Notes\n")
        write("\n".join(f"- {note}" for note in notes) + "\n")


def plot(results: Results) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for tokens, style in ((SHORT, "o-"), (LONG, "s--")):
        cs = sorted(c for (t, c) in results.shared if t == tokens and (t, c) in results.bare)
        adds = [
            added(results.shared[(tokens, c)], results.bare[(tokens, c)], 0.5) * 1e3 for c in cs
        ]
        left.plot(cs, adds, style, label=f"added TTFT p50, max_tokens {tokens}")
        for name in ("daemon", "node"):
            cpu = [results.shared[(tokens, c)].cpu_per_request(name) * 1e3 for c in cs]
            right.plot(cs, cpu, style, label=f"{name}, max_tokens {tokens}")
    for axis, label in (
        (left, "ms (through daemon - bare backend)"),
        (right, "CPU ms per request"),
    ):
        axis.set_xscale("log", base=2)
        ticks = sorted({c for (_, c) in results.shared})
        axis.set_xticks(ticks, [str(c) for c in ticks])
        axis.set_yscale("log")
        axis.set_xlabel("concurrency")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    left.set_title("Added time to first token")
    right.set_title("CPU per request (shared layout)")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    return True


def write_section(marker: str, section: str) -> None:
    """Replace the block between `<!-- marker:begin -->` and `:end` (appended if absent)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


# Main --------------------------------------------------------------------------------------


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per phase")
    parser.add_argument("--no-write", action="store_true", help="print only; touch no file")
    parser.add_argument("--no-wrk", action="store_true", help="the raw client only")
    parser.add_argument(
        "--concurrency", default=",".join(map(str, CONCURRENCIES)), help="comma-separated"
    )
    parser.add_argument(
        "--streams", type=int, help="slow streams held open (5000; quick 1000); 0 skips"
    )
    parser.add_argument("--stream-nodes", type=int, default=5, help="nodes serving them")
    parser.add_argument("--stream-ramp", type=float, default=250.0, help="streams opened a second")
    parser.add_argument(
        "--lift-node-pool",
        action="store_true",
        help="load phases too through scripts/realpath_node.py (the node's pool as its slots)",
    )
    parser.add_argument(
        "--parts", default="load,streams", help="load (shared and alone layouts), streams"
    )
    parser.add_argument("--logs", metavar="DIR", help="keep the processes' logs and state here")
    parser.add_argument(
        "--stream-interval", type=float, default=1.0, help="seconds between a stream's tokens"
    )
    parser.add_argument("--litellm", metavar="PATH", help="a `litellm` executable to compare with")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    streams = args.streams if args.streams is not None else plan.streams
    command = shlex.join([sys.executable, *sys.argv])
    raise_nofile()
    os.sched_setaffinity(0, {CLIENT_CPU})
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    with (
        contextlib.nullcontext(args.logs)
        if args.logs
        else tempfile.TemporaryDirectory(prefix="bench-realpath-")
    ) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        opts = Options(
            plan=plan,
            concurrencies=tuple(int(c) for c in args.concurrency.split(",")),
            wrk=not args.no_wrk,
            litellm=args.litellm,
            streams=streams,
            stream_nodes=args.stream_nodes,
            stream_ramp=args.stream_ramp,
            stream_interval=args.stream_interval,
            parts=frozenset(args.parts.split(",")),
            workdir=Path(tmp),
            lift_pool=args.lift_node_pool,
        )
        results = Results(
            load_start=loadavg(), started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        )
        say(f"command: {command}")
        wall = time.perf_counter()
        interrupted = False
        try:
            trio.run(bench, opts, results)
        except* KeyboardInterrupt:  # raised in a task, it may come wrapped in a group
            interrupted = True
        if interrupted:
            say("interrupted: every process this run started has been stopped")
            return 130
        results.elapsed_s = time.perf_counter() - wall
        results.load_end = loadavg()
    blocks = report(results, opts, command)
    for block in blocks.values():
        print("\n" + block)
    if not args.no_write:
        for marker, block in blocks.items():
            write_section(marker, block)
        if not results.shared:
            say(f"wrote {BENCHMARKS.relative_to(REPO)}")
        elif plot(results):
            say(f"wrote {BENCHMARKS.relative_to(REPO)} and {FIGURE.relative_to(REPO)}")
        else:
            say(f"wrote {BENCHMARKS.relative_to(REPO)} (no matplotlib: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
