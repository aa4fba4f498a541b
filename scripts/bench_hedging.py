"""What hedging does for the tail of first-token latency, and how fast the daemon fails over.

Run as `.venv/bin/python scripts/bench_hedging.py [--quick]` (about 4 minutes; `--quick` about
80 s). The plots need matplotlib (`pip install -e '.[bench]'`); without it the tables are
still written. The run rewrites its own section of BENCHMARKS.md (between the
`bench-hedging` markers) and the PNGs in docs/benchmarks/.

Layout, as in `bench_dispatch.py` (whose helpers this reuses): the daemon is its own process
pinned to one core; this process (the fake providers and the client) is pinned to the other.
Everything is seeded: the daemon's tie-breaks, the arrivals, each fake's draws. Timing on a
shared machine is not: run it on an idle one.

1. Tail latency with stragglers. Eight fake providers speak the real protocol; each answer's
   first token comes after a draw: mostly fast (log-normal, median 50 ms, kept within 30-90
   ms), but 5% of answers are 10-50x slower (0.3 to 4.5 s), whichever provider draws them.
   An open loop of short streamed requests (Poisson arrivals, `RATE` a second) runs against
   three daemons, one per hedging mode:
     off      `DINFER_HEDGE_MODE=off`: no backup; a straggler is waited out.
     fixed    `DINFER_HEDGE_MODE=fixed DINFER_HEDGE_BUDGET=1`: the rule before this change,
              a backup at half the first-token deadline (2.5 s), unbounded.
     learned  the defaults: a backup at the 95th percentile of recent first-token times,
              at most 5% more dispatches (`DINFER_HEDGE_BUDGET`).
   TTFT is what the client sees (request sent to first content received). Extra dispatches
   are the requests the fakes received beyond one per consumer request (backups, cancelled
   or not). The first `warmup` requests of each mode teach the daemon and are not counted.
   Goal: learned p99 at least 10x lower than off, at no more than 5% extra dispatches.
2. Failover delay. Each request's first provider answers at once with an error before
   content (a 503, which is no breaker strike); the figure is the time from that fake
   sending its error to the next fake receiving the request. It includes two loopback
   WebSocket hops and both fakes' frame handling, so the daemon's own share is smaller.
   One request at a time. Goal: p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio_websocket

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from bench_dispatch import (  # noqa: E402
    ADMIN_KEY,
    CLIENT_CPU,
    DAEMON_CPU,
    MODEL,
    REPO,
    HTTPError,
    RawConnection,
    child,
    create_api_key,
    daemon_env,
    expected_events,
    free_port,
    percentile,
    pin,
    request_body,
    script,
    wait_listening,
)

from protocol import crypto  # noqa: E402
from protocol.messages import InferenceRequest, ModelInfo  # noqa: E402
from tests.fakes.provider import Fail, FakeProvider  # noqa: E402

SEED = 12
FAKES = 8
SLOTS_PER_FAKE = 16
RATE = 100.0  # requests a second, offered
STRAGGLER_SHARE = 0.05
STRAGGLER_FACTOR = (10.0, 50.0)
FAST_MEDIAN_S = 0.050
FAST_SIGMA = 0.2
FAST_RANGE_S = (0.030, 0.090)  # 50 x 90 ms stays under the 5 s first-token deadline
REQUEST_TIMEOUT_S = 30.0
MODES: dict[str, dict[str, str]] = {
    "off": {"DINFER_HEDGE_MODE": "off"},
    "fixed": {"DINFER_HEDGE_MODE": "fixed", "DINFER_HEDGE_BUDGET": "1"},
    "learned": {},
}
SETTINGS_SHOWN = {
    "off": "`DINFER_HEDGE_MODE=off`",
    "fixed": "`DINFER_HEDGE_MODE=fixed DINFER_HEDGE_BUDGET=1`",
    "learned": "defaults (`learned`, p95, budget 5%)",
}
BENCHMARKS = REPO / "BENCHMARKS.md"
FIGURES = REPO / "docs" / "benchmarks"
BEGIN, END = "<!-- bench-hedging:begin -->", "<!-- bench-hedging:end -->"


@dataclass(frozen=True)
class Plan:
    warmup: int
    requests: int  # measured, per mode
    failovers: int


FULL = Plan(warmup=1000, requests=6000, failovers=2000)
QUICK = Plan(warmup=600, requests=1500, failovers=500)


# The fake providers ------------------------------------------------------------------------

# Failover: when the first fake sent its error, per request tag; the delays the second saw.
FAILED_AT: dict[str, float] = {}
FAILOVER_DELAYS: list[float] = []


@dataclass
class StragglerFake(FakeProvider):
    """Answers `tail-N` after a fast-or-straggler draw, fails the first try of `fo-N` at once."""

    rng: random.Random = field(default_factory=random.Random)
    tags: Counter[str] = field(default_factory=Counter)

    def draw(self) -> float:
        fast = self.rng.lognormvariate(math.log(FAST_MEDIAN_S), FAST_SIGMA)
        fast = min(max(fast, FAST_RANGE_S[0]), FAST_RANGE_S[1])
        if self.rng.random() < STRAGGLER_SHARE:
            return fast * self.rng.uniform(*STRAGGLER_FACTOR)
        return fast

    async def _serve_request(
        self, ws: trio_websocket.WebSocketConnection, request: InferenceRequest
    ) -> None:
        received = time.perf_counter()
        plaintext, sealer = crypto.open_request(request.encrypted_body, self.box_key)
        tag = json.loads(plaintext)["body"].get("user", "")
        self.tags[tag] += 1
        with trio.CancelScope() as scope:
            self._streams[request.request_id] = scope
            if tag.startswith("fo-") and tag not in FAILED_AT:
                FAILED_AT[tag] = time.perf_counter()
                await self._play(ws, request.request_id, sealer, Fail(503, "bench: fail over"))
            else:
                if tag in FAILED_AT:
                    FAILOVER_DELAYS.append(received - FAILED_AT[tag])
                if tag.startswith("tail-"):
                    await trio.sleep(self.draw())
                for step in script(1):
                    await self._play(ws, request.request_id, sealer, step)
        self._streams.pop(request.request_id, None)


@contextlib.asynccontextmanager
async def fake_providers(port: int) -> AsyncIterator[list[StragglerFake]]:
    url = f"ws://127.0.0.1:{port}/ws/provider"
    fakes = [
        StragglerFake(
            url,
            models=[ModelInfo(id=MODEL)],
            max_concurrency=SLOTS_PER_FAKE,
            rng=random.Random(SEED * 100 + index),
        )
        for index in range(FAKES)
    ]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            for fake in fakes:
                await nursery.start(fake.run)
        if not all(fake.trusted.is_set() for fake in fakes):
            raise RuntimeError("a fake provider was not trusted by the daemon")
        yield fakes
        nursery.cancel_scope.cancel()


# The client ----------------------------------------------------------------------------------


@dataclass
class Load:
    ttfts: dict[int, float] = field(default_factory=dict)  # by request index
    errors: int = 0


async def open_loop(port: int, token: str, first: int, count: int, rng: random.Random) -> Load:
    """`count` requests tagged `tail-<index>`, Poisson arrivals at RATE, connections reused."""
    load = Load()
    idle: list[RawConnection] = []

    async def one(index: int) -> None:
        conn = idle.pop() if idle else await RawConnection.open(port)
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                response = await conn.post(
                    conn.request_bytes(request_body(1, f"tail-{index}"), token)
                )
        except (HTTPError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            _failed(load, exc)
            await conn.aclose()
            return
        if conn.closing:  # the server said so (hypercorn's keep-alive limit)
            await conn.aclose()
        else:
            idle.append(conn)
        if response.in_band_errors or response.events != expected_events(1):
            _failed(load, HTTPError(f"{response.events} events, in-band error"))
            return
        load.ttfts[index] = response.ttft

    async with trio.open_nursery() as nursery:
        due = trio.current_time()
        for index in range(first, first + count):
            due += rng.expovariate(RATE)
            await trio.sleep_until(due)
            nursery.start_soon(one, index)
    for conn in idle:
        await conn.aclose()
    return load


def _failed(load: Load, exc: BaseException) -> None:
    load.errors += 1
    if load.errors == 1:
        print(f"  a request failed: {type(exc).__name__}: {exc}", file=sys.stderr)


async def failovers(port: int, token: str, count: int) -> int:
    """`count` requests, one at a time, each failed by its first provider; the errors seen."""
    errors = 0
    conn = await RawConnection.open(port)
    for index in range(count):
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await conn.post(conn.request_bytes(request_body(1, f"fo-{index}"), token))
        except (HTTPError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            errors += 1
            print(f"  a failover request failed: {exc}", file=sys.stderr)
            conn.closing = True
        if conn.closing:
            await conn.aclose()
            conn = await RawConnection.open(port)
    await conn.aclose()
    return errors


async def hedging_view(port: int) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        reply = await client.get(
            "/v1/admin/hedging", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        reply.raise_for_status()
        view: dict[str, Any] = reply.json()
        return view


# One mode ------------------------------------------------------------------------------------


@dataclass
class ModeResult:
    name: str
    ttfts: list[float]  # seconds, sorted
    errors: int
    dispatches: int  # provider dispatches of the measured requests
    counters: dict[str, int]  # the daemon's hedge counters over the measured requests
    hedge_points_ms: list[float | None]

    def pct(self, q: float) -> float:
        return percentile(self.ttfts, q)

    @property
    def extra(self) -> float:
        return self.dispatches / len(self.ttfts) - 1 if self.ttfts else math.nan


async def run_mode(name: str, port: int, plan: Plan, fakes_out: list[float]) -> ModeResult:
    await wait_listening(port)
    token = await create_api_key(port)
    async with fake_providers(port) as fakes:
        rng = random.Random(SEED)
        phase(f"{name}: {plan.warmup} warm-up requests at {RATE:g}/s")
        await open_loop(port, token, 0, plan.warmup, rng)
        before = (await hedging_view(port))["counters"]
        phase(f"{name}: {plan.requests} measured requests at {RATE:g}/s")
        load = await open_loop(port, token, plan.warmup, plan.requests, rng)
        view = await hedging_view(port)
        if name == "learned":
            phase(f"failover: {plan.failovers} requests, one at a time")
            FAILOVER_DELAYS.clear()
            errors = await failovers(port, token, plan.failovers)
            if errors:
                print(f"  {errors} failover request(s) failed", file=sys.stderr)
            fakes_out.extend(FAILOVER_DELAYS)
    measured = {f"tail-{i}" for i in load.ttfts}
    dispatches = sum(n for fake in fakes for tag, n in fake.tags.items() if tag in measured)
    counters = {k: v - before[k] for k, v in view["counters"].items()}
    points = [m["hedge_at_ms"] for m in view["models"]]
    return ModeResult(name, sorted(load.ttfts.values()), load.errors, dispatches, counters, points)


def phase(title: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {title}", flush=True)


def serve_daemon(seed: int) -> None:
    """The daemon, as `dinfer serve` runs it, with its registry's tie-breaks seeded."""
    from daemon.api.serve import serve
    from dinfer.daemon_commands import settings_or_exit

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(functools.partial(serve, settings_or_exit(), seed=seed))


# Report ----------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


@dataclass
class Report:
    modes: dict[str, ModeResult]
    delays: list[float]  # failover, seconds, sorted
    plan: Plan
    quick: bool
    load_average: float
    took_s: float = 0.0

    def tail_table(self) -> str:
        rows = [
            "| mode | settings | answered / failed | p50 | p99 | p99.9 | extra dispatches "
            "| backups started / won | skipped: budget / overload |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in self.modes.items():
            c = r.counters
            rows.append(
                f"| {name} | {SETTINGS_SHOWN[name]} | {len(r.ttfts):,} / {r.errors} "
                f"| {ms(r.pct(0.5))} "
                f"| {ms(r.pct(0.99))} | {ms(r.pct(0.999))} | {r.extra:.2%} "
                f"| {c['started']} / {c['won']} | {c['skipped_budget']} / "
                f"{c['skipped_overload']} |"
            )
        return "\n".join(rows)

    def tail_goal(self) -> str:
        off, learned = self.modes.get("off"), self.modes.get("learned")
        if off is None or learned is None:
            return "(the goal needs both the off and the learned modes)"
        ratio = off.pct(0.99) / learned.pct(0.99)
        return (
            f"Goal: learned p99 at least 10x lower than off: {ratio:.1f}x lower "
            f"({verdict(ratio >= 10)}); at no more than 5% extra dispatches: "
            f"{learned.extra:.2%} ({verdict(learned.extra <= 0.05)})."
        )

    def failover_table(self) -> str:
        d = self.delays
        return "\n".join(
            [
                "| failovers | p50 | p99 | max |",
                "|---|---|---|---|",
                f"| {len(d):,} | {ms(percentile(d, 0.5))} | {ms(percentile(d, 0.99))} "
                f"| {ms(d[-1]) if d else 'n/a'} |",
            ]
        )

    def failover_goal(self) -> str:
        p99 = percentile(self.delays, 0.99)
        return f"Goal: p99 <= 5 ms: {ms(p99)} ({verdict(p99 <= 0.005)})."

    def context(self) -> str:
        kind = "`--quick`" if self.quick else "full"
        end = os.getloadavg()[0]
        context = (
            f"A {kind} run of {time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} cores, load "
            f"average {self.load_average:.2f} at start ({end:.2f} at the end, this benchmark "
            f"included), {self.took_s:.0f} s; daemon pinned to CPU {DAEMON_CPU}, fakes and "
            f"client to CPU {CLIENT_CPU}; seed {SEED}."
        )
        if self.load_average > 0.5:
            context += (
                " The machine was busy with other work: every timing here is pessimistic, and "
                "its jitter also spends hedging budget on fast answers that merely ran late."
            )
        return context

    def hedge_points(self) -> str:
        learned = self.modes.get("learned")
        shown = [p for p in (learned.hedge_points_ms if learned else []) if p is not None]
        return ", ".join(f"{p:.0f} ms" for p in shown) or "n/a"


def markdown(report: Report, plotted: bool) -> str:
    tail_plot = (
        "\n![TTFT distribution per hedging mode](docs/benchmarks/hedging-ttft.png)\n"
        if plotted
        else ""
    )
    failover_plot = "\n![Failover delay](docs/benchmarks/failover-delay.png)\n" if plotted else ""
    return f"""{BEGIN}
## Hedging and failover (`scripts/bench_hedging.py`)

{report.context()} Rerun: `.venv/bin/python scripts/bench_hedging.py` (needs the `bench`
extra for the plots). How each figure is made is in the script's docstring.

### Tail latency with stragglers

Eight fake providers; each answer's first token comes after 30-90 ms (log-normal, median
50 ms), except 5% of answers, 10-50x slower (0.3-4.5 s). An open loop of {RATE:g} requests/s,
{report.plan.requests:,} measured per mode after {report.plan.warmup:,} warm-up requests. TTFT
as the client sees it; "extra dispatches" are provider dispatches beyond one per request.

{report.tail_table()}

{report.tail_goal()} The learned hedge point at the end of the run: {report.hedge_points()}.
{tail_plot}
Reading it: without hedging, the 5% of stragglers are the tail: p99 is a straggler's own
time. The fixed ratio helps only stragglers slower than 2.5 s. The learned point sits just
past the fast body, so a straggler's backup starts within about 0.1 s and answers like any
fast request; what remains above it are the stragglers the budget had no room for and
backups that straggled themselves.

### Failover delay

From a provider's error before content to the next provider receiving the request, one
request at a time (the error is a 503: no breaker strike). Two loopback WebSocket hops and
both fakes' frame handling are included: the daemon's own share is smaller.

{report.failover_table()}

{report.failover_goal()}
{failover_plot}{END}"""


def write_section(text: str) -> None:
    """Replace this benchmark's section of BENCHMARKS.md, leaving every other section alone."""
    old = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    BENCHMARKS.write_text(new)


def plot(report: Report) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return False
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig, (cdf, tail) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in report.modes.items():
        xs = [t * 1000 for t in r.ttfts]
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        cdf.plot(xs, ys, label=name)
        tail.plot(xs, [1 - y + 1 / len(xs) for y in ys], label=name)
    cdf.set(xscale="log", xlabel="TTFT (ms, log)", title="TTFT distribution")
    cdf.set_ylabel("share of requests at most this slow")
    tail.set(xscale="log", yscale="log", xlabel="TTFT (ms, log)")
    tail.set(ylabel="share of requests slower (log)", title="The tail: 1% is p99, 0.1% p99.9")
    for share in (0.01, 0.001):
        tail.axhline(share, color="grey", linewidth=0.6, linestyle=":")
    for axes in (cdf, tail):
        axes.grid(True, which="both", linewidth=0.3)
        axes.legend()
    fig.tight_layout()
    fig.savefig(FIGURES / "hedging-ttft.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(figsize=(6.5, 4))
    xs = [d * 1000 for d in report.delays]
    axes.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))])
    axes.axvline(5, color="red", linewidth=0.8, linestyle="--", label="goal: p99 <= 5 ms")
    axes.axhline(0.99, color="grey", linewidth=0.6, linestyle=":")
    axes.set(xlabel="error before content -> next provider has the request (ms)")
    axes.set(ylabel="share of failovers", title="Failover delay")
    axes.grid(True, linewidth=0.3)
    axes.legend()
    fig.tight_layout()
    fig.savefig(FIGURES / "failover-delay.png", dpi=110)
    plt.close(fig)
    return True


def print_report(report: Report) -> None:
    print()
    print("1. Tail latency with stragglers: client TTFT per hedging mode")
    print(report.tail_table())
    print(report.tail_goal())
    print(f"   the learned hedge point at the end: {report.hedge_points()}")
    print(
        "   extra dispatches: provider dispatches beyond one per request (backups); "
        "skipped: backups the budget or the overload guard refused"
    )
    print()
    print("2. Failover delay: a provider's error before content -> the next provider has it")
    print(report.failover_table())
    print(report.failover_goal())
    print("   (includes two loopback WebSocket hops: the daemon's own share is smaller)")
    print()
    print(report.context())


# Main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (about 80 s)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {tuple(MODES)}"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only: leave BENCHMARKS.md and the PNGs"
    )
    parser.add_argument("--serve-daemon", type=int, metavar="SEED", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_daemon is not None:
        serve_daemon(args.serve_daemon)
        return 0
    plan = QUICK if args.quick else FULL
    started, load_average = time.perf_counter(), os.getloadavg()[0]
    cpu = None if args.no_pin else DAEMON_CPU
    if cpu is not None:
        pin(0, CLIENT_CPU)
    results: dict[str, ModeResult] = {}
    delays: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-hedging-") as tmp:
        for name in args.modes.split(","):
            port = free_port()
            env = {**daemon_env(port, Path(tmp) / name), **MODES[name]}
            argv_daemon = [sys.executable, __file__, "--serve-daemon", str(SEED)]
            log = Path(tmp) / f"{name}.log"
            with child(argv_daemon, env, log, cpu):
                try:
                    results[name] = trio.run(run_mode, name, port, plan, delays)
                except BaseException:
                    print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
                    raise
    report = Report(results, sorted(delays), plan, args.quick, load_average)
    report.took_s = time.perf_counter() - started
    print_report(report)
    if not args.no_write:
        write_section(markdown(report, plot(report)))
        print(f"wrote {BENCHMARKS.relative_to(REPO)} and {FIGURES.relative_to(REPO)}/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
