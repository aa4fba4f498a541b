"""The arithmetic of `bench_realpath.py`: /proc parsing, percentiles, per-chunk cost, wrk output.

Pure functions only (no processes, no I/O beyond reading a /proc file given its text), so that
tests/test_realpath_stats.py checks them in milliseconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass


def stat_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, from the text of /proc/<pid>/stat.

    The command name (field 2) is in parentheses and may itself hold spaces and `)`, so the
    fields are counted from the last `)`: utime and stime are fields 14 and 15 of the line,
    the 12th and 13th after the name.
    """
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def vm_rss_kib(status: str) -> int:
    """VmRSS in KiB from the text of /proc/<pid>/status (0 for a zombie, which has none)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(data: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of `data` by the nearest-rank rule; NaN for no data."""
    if not data:
        return math.nan
    ordered = sorted(data)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def per_chunk(cpu_long: float, cpu_short: float, events_long: int, events_short: int) -> float:
    """CPU per extra relayed chunk: the long-vs-short difference of CPU per request over the
    difference in events per request. What a request costs once is in both and cancels."""
    if events_long == events_short:
        raise ValueError("the long and short answers have as many events")
    return (cpu_long - cpu_short) / (events_long - events_short)


@dataclass(frozen=True)
class WrkSummary:
    """What the benchmark's Lua `done()` prints on its `WRK ` line."""

    requests: int
    duration_s: float
    p50_s: float
    p99_s: float
    errors: int  # connect, read, write, timeout errors and non-2xx statuses together

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def parse_wrk(output: str) -> WrkSummary:
    """The summary from wrk's stdout; ValueError if the `WRK {...}` line is missing."""
    for line in output.splitlines():
        if line.startswith("WRK "):
            doc = json.loads(line[4:])
            errors = sum(int(doc[key]) for key in ("connect", "read", "write", "timeout", "status"))
            return WrkSummary(
                requests=int(doc["requests"]),
                duration_s=doc["duration_us"] / 1e6,
                p50_s=doc["p50_us"] / 1e6,
                p99_s=doc["p99_us"] / 1e6,
                errors=errors,
            )
    raise ValueError("no WRK summary line in wrk's output")
