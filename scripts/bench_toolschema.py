"""Microseconds per `normalize_tools` call on representative request bodies.

Run as `.venv/bin/python scripts/bench_toolschema.py`. Each figure is the best of several
timing rounds (the least disturbed by other work on the machine), per call.
Targets: the no-tools path under 5 us; a 5-tool body under 150 us.
"""

from __future__ import annotations

import functools
import timeit
from collections.abc import Callable
from typing import Any

import msgspec

from protocol.toolschema import normalize_tools

_ROUNDS = 7


def _messages(total_chars: int) -> list[dict[str, str]]:
    turn = "Summarise the quarterly report and list the open risks. " * 8
    count = max(1, total_chars // len(turn))
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": turn} for i in range(count)]


def _tool(index: int, *, needs_repair: bool) -> dict[str, Any]:
    optional: Any = ["string", "null"] if needs_repair else "string"
    unit: dict[str, Any] = {"enum": ["celsius", "fahrenheit"], "description": "Unit"}
    if not needs_repair:
        unit["type"] = "string"
    parameters = {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country"},
            "date": {"type": optional, "description": "ISO date, or none for today"},
            "unit": unit,
            "days": {"type": "integer", "description": "Forecast length"},
            "fields": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["location"],
    }
    return {
        "type": "function",
        "function": {
            "name": f"tool_{index}",
            "description": "Look it up",
            "parameters": parameters,
        },
    }


def _body(tools: int, *, needs_repair: bool, chars: int = 2_000) -> bytes:
    document: dict[str, Any] = {
        "model": "gemma-3-27b",
        "messages": _messages(chars),
        "temperature": 0.7,
        "stream": True,
    }
    if tools:
        document["tools"] = [_tool(i, needs_repair=needs_repair) for i in range(tools)]
    return msgspec.json.encode(document)


def _microseconds_per_call(call: Callable[[], object]) -> float:
    timer = timeit.Timer(call)
    calls, _ = timer.autorange()
    return min(timer.repeat(repeat=_ROUNDS, number=calls)) / calls * 1e6


def main() -> None:
    cases = {
        "no tools, 10 KB": _body(0, needs_repair=False, chars=10_000),
        "5 tools, clean": _body(5, needs_repair=False),
        "5 tools, needing repair": _body(5, needs_repair=True),
        "200 tools, clean": _body(200, needs_repair=False),
        "200 tools, needing repair": _body(200, needs_repair=True),
    }
    for name, body in cases.items():
        micros = _microseconds_per_call(functools.partial(normalize_tools, body))
        print(f"{name:<28}{len(body):>9,} B {micros:>12.2f} us/call")


if __name__ == "__main__":
    main()
