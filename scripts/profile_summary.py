"""Summarise a py-spy raw (collapsed-stack) profile: where a process's CPU time went.

Run as `.venv/bin/python scripts/profile_summary.py FILE [--top N] [--focus SUBSTRING]`, on
the output of `scripts/bench_dispatch.py --py-spy FILE`. Prints the share of samples by
category (the library the innermost Python frame belongs to), the top functions by self time,
and the top functions by inclusive time (any frame on the stack). `--focus` keeps only stacks
that pass through a frame containing SUBSTRING (e.g. `provider_stream.py`); `--stage S`
(repeatable) prints instead the inclusive share of stacks through each S.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

# First match wins: the innermost frame's file decides the category.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("h11/", "h11 (HTTP/1.1 parsing and framing)"),
    ("wsproto/", "wsproto (WebSocket framing)"),
    ("hypercorn/", "hypercorn (server glue)"),
    ("quart_trio/", "quart/werkzeug (WebSocket route)"),
    ("quart/", "quart/werkzeug (WebSocket route)"),
    ("werkzeug/", "quart/werkzeug (WebSocket route)"),
    ("blinker/", "quart/werkzeug (WebSocket route)"),
    ("nacl/", "crypto (PyNaCl)"),
    ("protocol/crypto.py", "crypto (PyNaCl)"),
    ("base64.py", "crypto (PyNaCl)"),
    ("protocol/messages.py", "JSON / msgspec (wire types, SSE)"),
    ("protocol/sse.py", "JSON / msgspec (wire types, SSE)"),
    ("msgspec", "JSON / msgspec (wire types, SSE)"),
    ("json/", "JSON / msgspec (wire types, SSE)"),
    ("protocol/toolschema.py", "request parsing (chat_request, toolschema)"),
    ("daemon/api/chat_request.py", "request parsing (chat_request, toolschema)"),
    ("daemon/store.py", "sqlite (API key lookup)"),
    ("sqlite3", "sqlite (API key lookup)"),
    ("uuid.py", "uuid4"),
    ("logging/", "logging"),
    ("trio/", "trio (scheduling, channels, cancel scopes, sockets)"),
    ("outcome/", "trio (scheduling, channels, cancel scopes, sockets)"),
    ("trio_util/", "trio (scheduling, channels, cancel scopes, sockets)"),
    ("daemon/", "daemon code (dispatch, race, session, chat)"),
)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse(path: Path) -> Iterator[tuple[list[str], int]]:
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def category(frame: str) -> str:
    for needle, name in CATEGORIES:
        if needle in frame:
            return name
    return "other (stdlib, runtime)"


def function(frame: str) -> str:
    """`func (file)` without the line number, so a function's lines add up."""
    match = _FRAME.match(frame)
    return f"{match['func']} ({match['file']})" if match else frame


def stages(path: Path, needles: list[str], focus: str | None) -> None:
    """Inclusive share of each needle (a stack counts once per needle it passes through)."""
    counts: Counter[str] = Counter()
    total = 0
    for stack, count in parse(path):
        if focus and not any(focus in frame for frame in stack):
            continue
        total += count
        for needle in needles:
            if any(needle in frame for frame in stack):
                counts[needle] += count
    _table("inclusive share of each --stage", [(n, counts[n]) for n in needles], max(total, 1))


def summarise(path: Path, top: int, focus: str | None) -> None:
    by_category: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for stack, count in parse(path):
        if focus and not any(focus in frame for frame in stack):
            continue
        total += count
        leaf = stack[-1]
        by_category[category(leaf)] += count
        self_time[function(leaf)] += count
        for name in {function(frame) for frame in stack}:
            inclusive[name] += count
    if not total:
        sys.exit("no samples")
    print(f"{total} samples{f' through {focus!r}' if focus else ''}\n")
    _table("by category (innermost frame)", by_category.most_common(), total)
    _table(f"top {top} by self time", self_time.most_common(top), total)
    _table(f"top {top} by inclusive time", inclusive.most_common(top), total)


def _table(title: str, rows: list[tuple[str, int]], total: int) -> None:
    print(title)
    for name, count in rows:
        print(f"  {count / total:6.1%}  {name}")
    print()


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` is fine
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--focus", help="only stacks through a frame containing this")
    parser.add_argument(
        "--stage",
        action="append",
        default=[],
        help="print the inclusive share of stacks through a frame containing this (repeatable)",
    )
    args = parser.parse_args()
    if args.stage:
        stages(args.file, args.stage, args.focus)
        return
    summarise(args.file, args.top, args.focus)


if __name__ == "__main__":
    main()
