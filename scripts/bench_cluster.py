"""What a cluster hop costs: added TTFT of a remote attempt, relay CPU per remote chunk, and
requests/s with `dinfer serve --workers 1` and `--workers 2`.

Run as `.venv/bin/python scripts/bench_cluster.py [--quick]` (about 60 s; `--quick` about 40 s).

Layout: a redis-server (its own process, on a free port), and real daemons (`python -m
dinfer serve`) as processes; this process runs the load generator and the fake providers of
`scripts/bench_dispatch.py` (real encrypted WebSocket protocol, answering at once) and its raw
HTTP client. Two phases:

- `hop`: daemon B holds every fake provider; daemon A holds none, so A's requests are remote
  attempts relayed by B over their direct link (daemon/cluster/peerlink.py). TTFT at
  concurrency 1, back to back, on B (local) and on A (remote): "added TTFT" = remote p50 -
  local p50, in alternated rounds. Then long streams through B and through A, alternated over
  `CHUNK_ROUNDS` rounds: "relay CPU per remote chunk" =
  (A + B + Redis CPU through A) / chunks - (A + B + Redis CPU through B) / chunks, each
  process's CPU from /proc: the same three processes both times, so what the cluster costs
  anyway (heartbeats, the directory) cancels out. A and B are pinned to core 0, Redis and
  this process to core 1 (the machine has 2 cores).
- `workers`: `dinfer serve --workers N` for N = 1, 2 on one port, 8 fakes connecting through
  the port (the kernel spreads them over the workers, as it spreads the 64 consumer
  connections), 64 connections back to back for `burst` seconds: requests/s, p50 TTFT. Nothing
  is pinned (N daemons, Redis and this process, which runs the client and the fakes, share
  the cores: on a 2-core machine --workers 2 has no core of its own per worker), so the phase
  also reports where each fake and connection landed (from /proc, `procnet.py`), the share of
  requests served by a provider on another worker (a hop), Redis commands per request, and
  each process's CPU per request (from /proc), steadier than requests/s on a shared machine.

`--phase hop|workers` runs one phase; `--rounds K` repeats the workers phase (1, 2, 1, 2...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import trio
import trio_websocket

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_dispatch as bd
import procnet

from protocol import crypto
from protocol.messages import InferenceRequest, ModelInfo

# Fake providers in the workers phase: enough that the kernel's spread leaves each worker some.
FAKES = 8


@contextlib.contextmanager
def redis_server(port: int, workdir: Path) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench_cluster: needs redis-server (apt-get install redis-server)")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", str(workdir)]  # fmt: skip
    with bd.child(argv, dict(os.environ), workdir / "redis.log", 1) as pid:
        yield pid


def cluster_env(port: int, data_dir: Path, redis_port: int) -> dict[str, str]:
    env = bd.daemon_env(port, data_dir)
    env["DINFER_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    env["DINFER_METRICS_LISTEN"] = "off"
    env["DINFER_HEDGE_MODE"] = "off"  # one attempt per request: the hop is what is measured
    return env


def cpu(*pids: int) -> float:
    return sum(bd.cpu_seconds(pid) for pid in pids)


async def wait_remote(target: bd.Target, attempts: int = 200) -> None:
    """Until A routes (its directory replica has B's providers)."""
    for _ in range(attempts):
        run = await bd.requests_loop(target, 1, count=1)
        if run.ttfts:
            return
        await trio.sleep(0.05)
    raise RuntimeError("the ingress never saw the owner's providers")


async def interleaved(local: bd.Target, remote: bd.Target, count: int) -> tuple[bd.Run, bd.Run]:
    """`count` requests at c=1 on each, in alternating rounds: a load that comes and goes on
    the machine weighs on both alike (one series after the other measured it as a hop)."""
    runs = (bd.Run(), bd.Run())
    for _ in range(ROUNDS):
        for run, target in zip(runs, (local, remote), strict=True):
            part = await bd.requests_loop(target, 1, count=max(count // ROUNDS, 1))
            run.ttfts.extend(part.ttfts)
            run.errors += part.errors
    return runs


ROUNDS = 20
CHUNK_ROUNDS = 5  # long-stream rounds, local and remote alternated


async def hop(work: Path, redis_port: int, plan: bd.Plan, redis_pid: int) -> None:
    pa, pb = bd.free_port(), bd.free_port()
    command = [sys.executable, "-m", "dinfer", "serve"]
    with (
        bd.child(command, cluster_env(pb, work / "b", redis_port), work / "b.log", 0) as b_pid,
        bd.child(command, cluster_env(pa, work / "a", redis_port), work / "a.log", 0) as a_pid,
    ):
        await bd.wait_listening(pa)
        await bd.wait_listening(pb)
        async with bd.fake_providers(pb):
            a = bd.Target("ingress A (remote)", pa, a_pid, await bd.create_api_key(pa, False))
            b = bd.Target("owner B (local)", pb, b_pid, await bd.create_api_key(pb, False))
            await wait_remote(a)
            for target in (b, a):
                await bd.requests_loop(target, 1, count=plan.warmup)
            local, remote = await interleaved(b, a, plan.serial)
            print(f"TTFT c=1 ({plan.serial} requests each), p50 / p99:")
            print(f"  local  (B) {bd.ms(local.pct(0.5))} / {bd.ms(local.pct(0.99))}")
            print(f"  remote (A) {bd.ms(remote.pct(0.5))} / {bd.ms(remote.pct(0.99))}")
            added = remote.pct(0.5) - local.pct(0.5)
            print(f"  added TTFT of a remote attempt (p50): {added * 1000:.2f} ms (goal <= 1 ms)")
            print(f"  errors: local {local.errors}, remote {remote.errors}")

            # Local and remote streams alternate over CHUNK_ROUNDS rounds, each CPU summed over
            # its own rounds: a load change on the machine lands on both sides alike.
            chunks = plan.long_chunks // CHUNK_ROUNDS
            spent = {"local": 0.0, "remote": 0.0}
            relayed = {"local": 0, "remote": 0}
            incomplete = {"local": 0, "remote": 0}
            span = {"local": 0.0, "remote": 0.0}
            split = {"A": 0.0, "B": 0.0, "Redis": 0.0}
            for _ in range(CHUNK_ROUNDS):
                for side, target in (("local", b), ("remote", a)):
                    each = cpu(a_pid), cpu(b_pid), cpu(redis_pid)
                    run = await bd.long_streams(target, 1, chunks)
                    after = cpu(a_pid), cpu(b_pid), cpu(redis_pid)
                    spent[side] += sum(after) - sum(each)
                    relayed[side] += run.chunks
                    incomplete[side] += run.incomplete
                    span[side] += run.span
                    if side == "remote":
                        for name, x, y in zip(split, each, after, strict=True):
                            split[name] += y - x
            per_local = spent["local"] / max(relayed["local"], 1)
            per_remote = spent["remote"] / max(relayed["remote"], 1)
            shares = ", ".join(
                f"{name} {value * 1e6 / max(relayed['remote'], 1):.1f}"
                for name, value in split.items()
            )
            rate = {side: relayed[side] / max(span[side], 1e-9) for side in span}
            print(
                f"long streams of {chunks} chunks, {CHUNK_ROUNDS} rounds alternated, CPU per chunk:"
            )
            print(
                f"  local  (A + B + Redis) {per_local * 1e6:.1f} us  "
                f"({rate['local']:,.0f} chunks/s)"
            )
            print(
                f"  remote (A + B + Redis) {per_remote * 1e6:.1f} us  "
                f"({rate['remote']:,.0f} chunks/s; {shares} us)"
            )
            print(
                f"  relay CPU per remote chunk: {(per_remote - per_local) * 1e6:.1f} us "
                "(goal <= 30 us)"
            )
            print(
                f"  incomplete streams: local {incomplete['local']}, remote {incomplete['remote']}"
            )


class TaggedFake(bd.BenchFake):
    """A bench fake that counts what it served by the worker each request came in through
    (the body's `user`, set by `tagged_loop`) and its own (`worker`, once known)."""

    worker = 0

    async def _serve_request(
        self, ws: trio_websocket.WebSocketConnection, request: InferenceRequest
    ) -> None:
        plaintext, sealer = crypto.open_request(request.encrypted_body, self.box_key)
        body = json.loads(plaintext)["body"]
        SERVED[(self.worker, body.get("user", ""))] += 1
        with trio.CancelScope() as scope:
            self._streams[request.request_id] = scope
            for step in bd.script(bd.requested_chunks(body)):
                await self._play(ws, request.request_id, sealer, step)
        self._streams.pop(request.request_id, None)


# (worker of the fake that served it, the worker the request came in through) -> requests
SERVED: Counter[tuple[int, str]] = Counter()


def local_port(stream: Any) -> int:
    port: int = stream.socket.getsockname()[1]
    return port


async def where(pids: list[int], port: int, ports: list[int]) -> dict[int, int]:
    """local port -> the worker holding that connection (once every one is accepted)."""
    with trio.fail_after(5):
        while True:
            held = procnet.peer_ports(pids, port)
            found = {p: pid for pid, remote in held.items() for p in remote}
            if all(p in found for p in ports):
                return found
            await trio.sleep(0.02)


async def tagged_loop(
    target: bd.Target, pids: list[int], concurrency: int, seconds: float, watched: list[int]
) -> tuple[bd.Run, Counter[int], dict[int, float]]:
    """`bd.requests_loop`'s closed loop, each request tagged with the worker its connection
    reached; also how many connections each worker got, and the CPU seconds each `watched`
    process used while the requests ran."""
    run = bd.Run()
    conns = [await bd.RawConnection.open(target.port) for _ in range(concurrency)]
    at = await where(pids, target.port, [local_port(c._stream) for c in conns])
    spread = Counter(at[local_port(c._stream)] for c in conns)
    deadline = time.perf_counter() + seconds

    async def worker(conn: bd.RawConnection) -> None:
        pid = at[local_port(conn._stream)]
        while time.perf_counter() < deadline:
            request = conn.request_bytes(bd.request_body(1, f"w{pid}"), target.token)
            while time.perf_counter() < deadline and not conn.closing:
                try:
                    with trio.fail_after(bd.REQUEST_TIMEOUT_S):
                        response = await conn.post(request)
                except (bd.HTTPError, trio.BrokenResourceError, trio.TooSlowError):
                    run.errors += 1
                    conn.closing = True
                    continue
                if response.in_band_errors or response.events != bd.expected_events(1):
                    run.errors += 1
                    continue
                run.ttfts.append(response.ttft)
            if conn.closing:  # the server said so, or the connection is in a bad state
                await conn.aclose()
                conn = await bd.RawConnection.open(target.port)
                port = local_port(conn._stream)
                pid = (await where(pids, target.port, [port]))[port]
        await conn.aclose()

    SERVED.clear()
    before = {p: bd.cpu_seconds(p) for p in watched}
    with run.usage.measure(target.pid):
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(worker, conn)
    return run, spread, {p: bd.cpu_seconds(p) - before[p] for p in watched}


async def redis_calls(port: int) -> int:
    """Commands Redis has executed since it started (INFO commandstats), this one excluded."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"INFO commandstats\r\n")
        data = b""
        while (
            not data.startswith(b"$")
            or data.count(b"\r\n") < 2
            or len(data) < (data.index(b"\r\n") + 4 + int(data[1 : data.index(b"\r\n")]))
        ):
            data += await stream.receive_some(65536)
    return sum(
        int(line.split(b"calls=", 1)[1].split(b",", 1)[0])
        for line in data.split(b"\r\n")
        if line.startswith(b"cmdstat_")
    )


def worker_pids(parent: int, count: int) -> list[int]:
    if count == 1:
        return [parent]  # `dinfer serve` itself
    pids = procnet.children(parent)
    if len(pids) != count:
        raise RuntimeError(f"expected {count} workers, found {pids}")
    return sorted(pids)


async def workers(work: Path, redis_port: int, plan: bd.Plan, count: int, redis_pid: int) -> None:
    port = bd.free_port()
    env = cluster_env(port, work / f"w{count}", redis_port)
    command = [sys.executable, "-m", "dinfer", "serve", "--workers", str(count)]
    if count == 1:
        command = command[:-2]
    with bd.child(command, env, work / f"w{count}.log", None) as pid:
        await bd.wait_listening(port)
        with trio.fail_after(20):
            while True:
                if count == 1 or len(procnet.children(pid)) >= count:
                    break
                await trio.sleep(0.05)
        pids = worker_pids(pid, count)
        for worker_pid in pids:
            await wait_all_listening(port, worker_pid)
        async with fake_providers(port) as fakes:
            at = await where(pids, port, [local_port(f._ws._stream) for f in fakes])
            for fake in fakes:
                fake.worker = at[local_port(fake._ws._stream)]
            target = bd.Target(
                f"--workers {count}", port, pid, await bd.create_api_key(port, False)
            )
            await trio.sleep(1.5)  # every worker's replica has every worker's providers
            await bd.requests_loop(target, 8, count=plan.warmup)
            calls = await redis_calls(redis_port)
            run, spread, used = await tagged_loop(
                target, pids, 64, plan.burst_s, [*pids, redis_pid]
            )
            calls = await redis_calls(redis_port) - calls - 1
        served = sum(SERVED.values()) or 1
        hopped = sum(n for (owner, tag), n in SERVED.items() if tag != f"w{owner}")
        done = max(len(run.ttfts), 1)
        load = run.usage.client_cpu
        total = sum(used.values()) + load
        names = {p: f"worker {i}" for i, p in enumerate(pids)}
        print(
            f"--workers {count}: {run.rps:,.0f} requests/s at c=64 for {plan.burst_s:g} s, "
            f"p50 TTFT {bd.ms(run.pct(0.5))}, errors {run.errors}"
        )
        print(
            "  fakes per worker "
            + ", ".join(str(sum(1 for f in fakes if f.worker == p)) for p in pids)
            + "; connections per worker "
            + ", ".join(str(spread[p]) for p in pids)
            + f"; served by a provider on another worker: {hopped / served:.0%}"
            + f"; Redis commands per request {calls / done:.2f}"
        )
        print(
            "  CPU per request: "
            + ", ".join(f"{names[p]} {used[p] * 1e6 / done:,.0f} us" for p in pids)
            + f", Redis {used[redis_pid] * 1e6 / done:,.0f} us, load generator (this process: "
            f"client and fakes) {load * 1e6 / done:,.0f} us; total {total * 1e6 / done:,.0f} us"
            f"; {total / run.usage.elapsed:.2f} of {os.cpu_count()} cores busy"
        )
        daemons = sum(used[p] for p in pids) / done
        print(
            f"  the workers' CPU per request together: {daemons * 1e6:,.0f} us, i.e. "
            f"{1 / daemons:,.0f} requests/s per core the daemons alone could serve"
        )


async def wait_all_listening(port: int, pid: int) -> None:
    """Until `pid` has its socket in the port's group (a worker starts after the parent)."""
    with trio.fail_after(20):
        while True:
            if procnet.listening(pid, port):
                return
            await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def fake_providers(port: int) -> AsyncIterator[list[TaggedFake]]:
    url = f"ws://127.0.0.1:{port}/ws/provider"
    fakes = [
        TaggedFake(url, models=[ModelInfo(id=bd.MODEL)], max_concurrency=bd.SLOTS_PER_FAKE)
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


async def main_async(plan: bd.Plan, phase: str, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(tmp)
        redis_port = bd.free_port()
        with redis_server(redis_port, work) as redis_pid:
            await bd.wait_listening(redis_port)
            if phase in ("all", "hop"):
                bd.pin(os.getpid(), 1)
                print("== hop: ingress A, owner B, over their link")
                await hop(work, redis_port, plan, redis_pid)
            if phase in ("all", "workers"):
                print(
                    "== workers: dinfer serve --workers N on one port (unpinned; this load "
                    "generator and Redis share the machine's cores with the workers)"
                )
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
                for _ in range(rounds):
                    for count in (1, 2):
                        await workers(work, redis_port, plan, count, redis_pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--phase", choices=("all", "hop", "workers"), default="all")
    parser.add_argument(
        "--rounds", type=int, default=1, help="workers phase: alternate 1, 2 this many times"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    trio.run(main_async, bd.QUICK if args.quick else bd.FULL, args.phase, args.rounds)
    print(f"(took {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
