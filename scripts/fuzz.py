"""Fuzz every parser and stream encoder for N inputs per target; report inputs and failures.

Run as `.venv/bin/python scripts/fuzz.py [--inputs N] [--engine hypothesis|atheris] [TARGET...]`
(default: 1,000,000 inputs for each target of `tests/fuzz_targets.py`, with Hypothesis). The
targets and their checks are the ones the bounded CI tests (`tests/test_fuzz_*.py`) run.

Hypothesis runs in batches of fresh seeds (its duplicate tracking grows with each example
otherwise), generating only, with no shrinking and no example database. With
`--engine atheris` (the `fuzz` extra), libFuzzer's coverage-guided mutation drives the same
strategies through `fuzz_one_input`, one process per target.

A failure is any exception from a check, or an input that runs longer than `--timeout-s`
(a hang). Failures are counted and grouped by where they were raised; the first input of each
group is printed. The exit status is 1 when any target failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests.fuzz_targets import TARGETS, Target  # noqa: E402

BATCH = 10_000
EXAMPLE_CHARS = 4000


class Hang(Exception):
    """An input ran past the per-input time bound."""


@dataclass
class Tally:
    """What one target's run found."""

    inputs: int = 0
    failures: int = 0
    first: dict[str, str] = field(default_factory=dict)  # where -> message, first input

    def run(self, check: Callable[[Any], None], example: Any, timeout_s: float) -> None:
        self.inputs += 1
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            check(example)
        except Exception as exc:
            self._record(exc, example)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _record(self, exc: Exception, example: Any) -> None:
        self.failures += 1
        where = _where(exc)
        if where not in self.first:
            message = str(exc).splitlines()[0][:100] if str(exc) else ""
            self.first[where] = f"{message}\n        first input: {repr(example)[:EXAMPLE_CHARS]}"


def _where(exc: Exception) -> str:
    """The exception's type and the deepest frame in this repository's own code."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(str(REPO))
    ]
    place = f"{Path(frames[-1].filename).relative_to(REPO)}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {place}"


def _on_alarm(_signum: int, _frame: Any) -> None:
    raise Hang("an input ran past the time bound")


def run_hypothesis(target: Target, inputs: int, timeout_s: float, base_seed: int) -> Tally:
    tally = Tally()
    batch = 0
    while tally.inputs < inputs:
        size = min(BATCH, inputs - tally.inputs)
        before = tally.inputs

        @seed(base_seed + batch)
        @settings(
            max_examples=size,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(target.strategy)
        def one(example: Any) -> None:
            tally.run(target.check, example, timeout_s)

        one()
        batch += 1
        if tally.inputs == before:  # the strategy's space is exhausted
            break
    return tally


def run_atheris_child(target: Target, inputs: int, timeout_s: float, report: Path) -> None:
    """In a child process: libFuzzer drives `target` for `inputs` runs, then writes `report`."""
    import atheris

    tally = Tally()

    @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(target.strategy)
    def one(example: Any) -> None:
        tally.run(target.check, example, timeout_s)

    def write_report() -> None:
        report.write_text(json.dumps(tally.__dict__))

    def fuzz_one(data: bytes) -> None:
        one.hypothesis.fuzz_one_input(data)  # type: ignore[attr-defined]
        if tally.inputs >= inputs:
            write_report()
            os._exit(0)

    # -timeout=0: libFuzzer's own alarm would take SIGALRM, which bounds each input here.
    atheris.Setup([sys.argv[0], "-max_len=8192", "-rss_limit_mb=4096", "-timeout=0"], fuzz_one)
    atheris.Fuzz()


def run_atheris(name: str, inputs: int, timeout_s: float) -> Tally:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, __file__, "--atheris-child", str(report), "--inputs",
                   str(inputs), "--timeout-s", str(timeout_s), name]  # fmt: skip
        subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not report.exists():
            return Tally(failures=1, first={"the atheris run died": name})
        return Tally(**json.loads(report.read_text()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--engine", choices=("hypothesis", "atheris"), default="hypothesis")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="bound on one input")
    parser.add_argument("--seed", type=int, default=0, help="first Hypothesis seed")
    parser.add_argument("--atheris-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGALRM, _on_alarm)
    if args.atheris_child:
        run_atheris_child(TARGETS[args.targets[0]], args.inputs, args.timeout_s, args.atheris_child)
        return 0
    failed = False
    for name in args.targets or TARGETS:
        start = time.perf_counter()
        if args.engine == "atheris":
            tally = run_atheris(name, args.inputs, args.timeout_s)
        else:
            tally = run_hypothesis(TARGETS[name], args.inputs, args.timeout_s, args.seed)
        elapsed = time.perf_counter() - start
        rate = tally.inputs / elapsed if elapsed else 0.0
        print(f"{name:22} {tally.inputs:>10,} inputs  {tally.failures:>7,} failures  "
              f"{elapsed:8.1f} s  {rate:8,.0f} inputs/s", flush=True)  # fmt: skip
        for where, example in tally.first.items():
            print(f"    {where}: {example}", flush=True)
        failed = failed or tally.failures > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
