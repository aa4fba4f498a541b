"""The arithmetic of scripts/bench_realpath.py: /proc parsing, percentiles, per-chunk cost."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from realpath_stats import parse_wrk, per_chunk, percentile, stat_ticks, vm_rss_kib

# A real /proc/<pid>/stat line, its command name holding a space and a parenthesis.
STAT = (
    "4242 (python (x) y) S 1 4242 4242 0 -1 4194560 12345 0 3 0 "
    "731 205 0 0 20 0 3 0 9876 123456789 4567 18446744073709551615 1 1 0 0 0 0 0 16781312 "
    "134234626 0 0 0 17 0 0 0 0 0 0"
)


def test_stat_ticks_adds_utime_and_stime_counting_from_the_last_parenthesis() -> None:
    assert stat_ticks(STAT) == 731 + 205


def test_vm_rss_is_read_in_kib_and_is_zero_when_absent() -> None:
    assert vm_rss_kib("Name:\tpython\nVmPeak:\t  9000 kB\nVmRSS:\t   51234 kB\n") == 51234
    assert vm_rss_kib("Name:\tzombie\nState:\tZ (zombie)\n") == 0


def test_percentile_is_nearest_rank() -> None:
    data = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(data, 0.5) == 3.0
    assert percentile(data, 0.99) == 5.0
    assert percentile(data, 0.0) == 1.0
    assert math.isnan(percentile([], 0.5))


def test_per_chunk_cost_is_the_difference_over_the_extra_events() -> None:
    # 7-event answers cost 2.4 ms, 259-event ones 42.72 ms: 160 µs per extra chunk.
    assert per_chunk(42.72e-3, 2.4e-3, 259, 7) == pytest.approx(160e-6)
    with pytest.raises(ValueError):
        per_chunk(1.0, 1.0, 7, 7)


def test_wrk_summary_line_is_parsed_and_errors_summed() -> None:
    output = (
        "Running 2s test @ http://127.0.0.1:1/v1/chat/completions\n"
        'WRK {"requests": 500, "duration_us": 2000000, "p50_us": 1500, "p99_us": 9000, '
        '"connect": 0, "read": 1, "write": 0, "timeout": 2, "status": 3}\n'
    )
    summary = parse_wrk(output)
    assert (summary.requests, summary.rps, summary.errors) == (500, 250.0, 6)
    assert (summary.p50_s, summary.p99_s) == (1.5e-3, 9e-3)
    with pytest.raises(ValueError):
        parse_wrk("Running 2s test\n")
