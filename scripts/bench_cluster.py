"""What a cluster hop costs: added TTFT of a remote attempt, relay CPU per remote chunk, and
requests/s with `dinfer serve --workers 1` and `--workers 2`.

Run as `.venv/bin/python scripts/bench_cluster.py [--quick]` (about 60 s; `--quick` about 25 s).

Layout: a redis-server (its own process, on a free port), and real daemons (`python -m
dinfer serve`) as processes; this process runs the load generator and the fake providers of
`scripts/bench_dispatch.py` (real encrypted WebSocket protocol, answering at once) and its raw
HTTP client. Two phases:

- `hop`: daemon B holds every fake provider; daemon A holds none, so A's requests are remote
  attempts relayed by B over their direct link (daemon/cluster/peerlink.py). TTFT at
  concurrency 1, back to back, on B (local) and on A (remote): "added TTFT" = remote p50 -
  local p50. Then long paced streams through B and through A: "relay CPU per remote chunk" =
  (A + B + Redis CPU through A) / chunks - (A + B + Redis CPU through B) / chunks, each
  process's CPU from /proc: the same three processes both times, so what the cluster costs
  anyway (heartbeats, the directory) cancels out. A and B are pinned to core 0, Redis and
  this process to core 1 (the machine has 2 cores).
- `workers`: `dinfer serve --workers N` for N = 1, 2 on one port (unpinned: N processes), the
  fakes connecting through the port (the kernel spreads them over the workers), 64 connections
  back to back for `burst` seconds: requests/s, p50 TTFT.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_dispatch as bd


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

            chunks = plan.long_chunks
            before = cpu(a_pid, b_pid, redis_pid)
            base = await bd.long_streams(b, 1, chunks)
            local_cpu = cpu(a_pid, b_pid, redis_pid) - before
            before_all = cpu(a_pid, b_pid, redis_pid)
            before_a, before_b, before_r = cpu(a_pid), cpu(b_pid), cpu(redis_pid)
            through = await bd.long_streams(a, 1, chunks)
            remote_cpu = cpu(a_pid, b_pid, redis_pid) - before_all
            per_local = local_cpu / max(base.chunks, 1)
            per_remote = remote_cpu / max(through.chunks, 1)
            print(f"long stream of {chunks} chunks (paced), CPU per chunk:")
            print(f"  local  (A + B + Redis) {per_local * 1e6:.1f} us  ({base.rate:,.0f} chunks/s)")
            print(
                f"  remote (A + B + Redis) {per_remote * 1e6:.1f} us  "
                f"({through.rate:,.0f} chunks/s; A {(cpu(a_pid) - before_a) * 1e6 / chunks:.1f}"
                f", B {(cpu(b_pid) - before_b) * 1e6 / chunks:.1f}"
                f", Redis {(cpu(redis_pid) - before_r) * 1e6 / chunks:.1f} us)"
            )
            print(
                f"  relay CPU per remote chunk: {(per_remote - per_local) * 1e6:.1f} us "
                "(goal <= 30 us)"
            )
            print(f"  incomplete streams: local {base.incomplete}, remote {through.incomplete}")


async def workers(work: Path, redis_port: int, plan: bd.Plan, count: int) -> None:
    port = bd.free_port()
    env = cluster_env(port, work / f"w{count}", redis_port)
    command = [sys.executable, "-m", "dinfer", "serve", "--workers", str(count)]
    if count == 1:
        command = command[:-2]
    with bd.child(command, env, work / f"w{count}.log", None) as pid:
        await bd.wait_listening(port)
        async with bd.fake_providers(port):
            target = bd.Target(
                f"--workers {count}", port, pid, await bd.create_api_key(port, False)
            )
            await trio.sleep(1.5)  # every worker's replica has every worker's providers
            await bd.requests_loop(target, 8, count=plan.warmup)
            run = await bd.requests_loop(target, 64, seconds=plan.burst_s)
            print(
                f"--workers {count}: {run.rps:,.0f} requests/s at c=64 for {plan.burst_s:g} s, "
                f"p50 TTFT {bd.ms(run.pct(0.5))}, errors {run.errors}"
            )


async def main_async(plan: bd.Plan) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(tmp)
        redis_port = bd.free_port()
        with redis_server(redis_port, work) as redis_pid:
            await bd.wait_listening(redis_port)
            bd.pin(os.getpid(), 1)
            print("== hop: ingress A, owner B, over their link")
            await hop(work, redis_port, plan, redis_pid)
            print("== workers: dinfer serve --workers N on one port")
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            for count in (1, 2):
                await workers(work, redis_port, plan, count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    trio.run(main_async, bd.QUICK if args.quick else bd.FULL)
    print(f"(took {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
