"""Which process holds which TCP connection, from /proc: for benchmarks of several daemons on
one port (SO_REUSEPORT), where the kernel, not the benchmark, chooses the process.

`peer_ports(pids, port)` maps each process to the remote ports of its established connections
whose local port is `port`: a client that knows its own local port (`getsockname`) knows
which process serves it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

ESTABLISHED = "01"
LISTEN = "0A"


def children(pid: int) -> list[int]:
    """The direct children of `pid` (Linux: /proc/PID/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found += [int(p) for p in text.split()]
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp_rows() -> Iterable[list[str]]:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            yield line.split()


def peer_ports(pids: Iterable[int], port: int) -> dict[int, set[int]]:
    """pid -> the remote ports of its established connections on local port `port`."""
    owners = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    ports: dict[int, set[int]] = {pid: set() for pid in set(owners.values())}
    for row in _tcp_rows():
        local, remote, state, inode = row[1], row[2], row[3], row[9]
        if state != ESTABLISHED or int(local.rsplit(":", 1)[1], 16) != port:
            continue
        pid = owners.get(inode)
        if pid is not None:
            ports[pid].add(int(remote.rsplit(":", 1)[1], 16))
    return ports


def listening(pid: int, port: int) -> bool:
    """Does `pid` hold a listening socket on `port`?"""
    inodes = _socket_inodes(pid)
    return any(
        row[3] == LISTEN and int(row[1].rsplit(":", 1)[1], 16) == port and row[9] in inodes
        for row in _tcp_rows()
    )
