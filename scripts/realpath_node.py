"""`dinfer provider` with its backend client's connection pool as large as its slots.

`bench_realpath.py` runs this instead of `python -m dinfer provider` for its many-streams
phase (and, with `--lift-node-pool`, everywhere). The node's httpx client has httpx's default
limits (100 connections, 20 kept alive), so a node holds at most 100 backend streams at once
whatever its `--max-concurrency`; the requests beyond wait in the pool and fail after its
timeout. 5,000 open streams would then need 50 nodes. This wrapper builds the client the node
asked for (same timeouts) with the pool bounded by `DINFER_BENCH_NODE_POOL` instead, then runs
the unchanged command line. The pool is the only difference: the daemon, the protocol and the
rest of the node are what users run.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import httpx

import provider.node
from dinfer.cli import main

_original = provider.node.open_client


def open_client(*args: Any, **kwargs: Any) -> httpx.AsyncClient:
    asked = _original(*args, **kwargs)
    size = int(os.environ.get("DINFER_BENCH_NODE_POOL", "1024"))
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    return httpx.AsyncClient(timeout=asked.timeout, trust_env=False, limits=limits)


provider.node.open_client = open_client  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(["provider", *sys.argv[1:]]))
