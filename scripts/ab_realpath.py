"""A/B of two checkouts on the real path, for a shared, loaded machine.

Starts one `bench_realpath` stack (daemon, reference node, mock backend, all on CPU 0) per
checkout, then alternates short closed-loop phases between them (A B, B A, ...), so both see
the same background load; prints the daemon's CPU per request (from /proc) of each phase and
the medians. With `--strace`, it instead counts the daemon's syscalls per request
(`strace -f -c`, a fixed number of requests after a warm-up): a figure the machine's load does
not move.

    python scripts/ab_realpath.py /path/to/main /path/to/branch --rounds 8 --tokens 4 -c 16
    python scripts/ab_realpath.py /path/to/main /path/to/branch --strace --requests 300
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_realpath as bench

SYSCALLS = ("sendto", "recvfrom", "epoll_wait", "epoll_ctl", "futex", "pread64")


async def start(owner: contextlib.ExitStack, repo: Path, workdir: Path) -> bench.Stack:
    bench.REPO = repo  # read by base_env and Processes.start: the checkout the stack runs
    return await bench.start_stack(bench.Processes(owner, workdir))


def attach_strace(pid: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["strace", "-f", "-c", "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL
    )


def detach(tracer: subprocess.Popen[bytes]) -> None:
    tracer.send_signal(signal.SIGINT)  # strace writes its counts, the daemon runs on
    tracer.wait()


async def cpu_ab(opts: argparse.Namespace) -> None:
    with contextlib.ExitStack() as owner:
        stacks = {name: await start(owner, repo, opts.tmp / name) for name, repo in opts.repos}
        used: dict[str, list[float]] = {name: [] for name in stacks}
        names = list(stacks)
        for r in range(opts.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                stack = stacks[name]
                pids = bench.watched(stack)
                await bench.settle(pids)
                phase = await bench.closed_loop(
                    stack, pids, name, opts.tokens, opts.concurrency, opts.seconds
                )
                daemon = phase.cpu_per_request("daemon") * 1e3
                used[name].append(daemon)
                print(
                    f"round {r} {name}: {phase.done} requests, {phase.rps:.0f}/s, daemon "
                    f"{daemon:.2f} ms/request, node {phase.cpu_per_request('node') * 1e3:.2f}, "
                    f"errors {phase.errors}",
                    flush=True,
                )
        for name, values in used.items():
            print(f"{name}: median daemon {statistics.median(values):.2f} ms/request")


async def strace_counts(opts: argparse.Namespace) -> None:
    with contextlib.ExitStack() as owner:
        for name, repo in opts.repos:
            stack = await start(owner, repo, opts.tmp / name)
            assert stack.daemon is not None
            pids = bench.watched(stack)
            await bench.closed_loop(stack, pids, "warm", opts.tokens, opts.concurrency, 1.0)
            await bench.settle(pids)
            out = opts.tmp / f"strace-{name}.txt"
            tracer = attach_strace(stack.daemon.pid, out)
            await trio.sleep(1.0)  # attached to every thread
            phase = await bench.closed_loop(
                stack, pids, name, opts.tokens, opts.concurrency, 1e9, count=opts.requests
            )
            await trio.sleep(0.5)
            detach(tracer)
            print(f"{name} ({repo}): {phase.done} requests, {phase.errors} errors")
            for line in out.read_text().splitlines():
                cells = line.split()
                if len(cells) >= 5 and cells[-1] in SYSCALLS:
                    print(f"  {cells[-1]:12s} {int(cells[3]) / phase.done:6.2f} per request")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="checkout A (e.g. main)")
    parser.add_argument("b", type=Path, help="checkout B")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4, help="max_tokens of each request")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="per phase")
    parser.add_argument("--strace", action="store_true", help="syscalls per request instead")
    parser.add_argument("--requests", type=int, default=300, help="with --strace")
    opts = parser.parse_args()
    opts.repos = [("A", opts.a.resolve()), ("B", opts.b.resolve())]
    with tempfile.TemporaryDirectory() as tmp:
        for name, _ in opts.repos:
            (Path(tmp) / name).mkdir()
        opts.tmp = Path(tmp)
        trio.run(strace_counts if opts.strace else cpu_ab, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
