"""The floor under a cluster hop: a loopback round trip between two Trio processes.

Run as `.venv/bin/python scripts/trio_rtt.py`: it measures 64-byte echo round trips between
a child echo server and this process, both pinned to one core, then to two (the machine's
first two), and prints p50 and p90 of each. `scripts/bench_cluster.py` pins the ingress and
the owner to one core, so its added TTFT pays the one-core figure at least once per request.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import trio

ROUNDS = 2000
PAYLOAD = b"x" * 64


async def echo(port: int) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(4096):
            await stream.send_all(data)

    await trio.serve_tcp(handle, port, host="127.0.0.1")


async def measure(port: int) -> list[float]:
    with trio.fail_after(5):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                break
            except OSError:
                await trio.sleep(0.05)
    times = []
    async with stream:
        for _ in range(ROUNDS):
            began = time.perf_counter()
            await stream.send_all(PAYLOAD)
            await stream.receive_some(4096)
            times.append(time.perf_counter() - began)
    return sorted(times)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--echo":
        trio.run(echo, int(sys.argv[2]))
        return
    cores = sorted(os.sched_getaffinity(0))
    layouts = [("one core", cores[0], cores[0])]
    if len(cores) > 1:
        layouts.append(("two cores", cores[0], cores[1]))
    for name, server_core, client_core in layouts:
        port = 20000 + os.getpid() % 10000
        server = subprocess.Popen([sys.executable, __file__, "--echo", str(port)])
        try:
            os.sched_setaffinity(server.pid, {server_core})
            os.sched_setaffinity(0, {client_core})
            times = trio.run(measure, port)
        finally:
            server.kill()
            server.wait()
        p50, p90 = times[len(times) // 2], times[int(len(times) * 0.9)]
        print(f"{name}: round trip p50 {p50 * 1e6:.0f} us, p90 {p90 * 1e6:.0f} us")
    os.sched_setaffinity(0, set(cores))


if __name__ == "__main__":
    main()
