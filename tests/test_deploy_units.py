"""The systemd units in deploy/ as systemd reads them: `systemd-analyze verify` finds nothing
wrong, the sandbox keeps its exposure score, and the stop timeout outlasts the drain grace.

Skipped where `systemd-analyze` is absent (CI installs systemd, so they run there).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = ("dinfer.service", "dinfer-provider.service")
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def installed_copy(tmp_path: Path, unit: str) -> Path:
    """The unit with its ExecStart binary pointing at one that exists here (verify checks)."""
    text = (DEPLOY / unit).read_text().replace("/opt/dinfer/.venv/bin/dinfer", sys.executable)
    path = tmp_path / unit
    path.write_text(text)
    return path


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (DEPLOY / unit).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path, unit: str) -> None:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "verify", str(installed_copy(tmp_path, unit))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_the_sandbox_keeps_its_exposure_score(tmp_path: Path, unit: str) -> None:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(installed_copy(tmp_path, unit))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match[1]) <= 1.5  # deploy/README.md gives the score


@pytest.mark.parametrize("unit", UNITS)
def test_the_units_are_notify_units_with_a_watchdog_and_a_hardened_sandbox(unit: str) -> None:
    found = directives(unit)
    for key, value in {
        "Type": "notify",
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "SystemCallFilter": "@system-service",
    }.items():
        assert value in found[key], key
    for key in ("WatchdogSec", "StateDirectory", "RestrictAddressFamilies", "LimitNOFILE"):
        assert key in found, key
    assert int(found["LimitNOFILE"][0]) >= 16384


def test_the_daemon_stop_timeout_outlasts_the_drain_grace() -> None:
    stop = int(directives("dinfer.service")["TimeoutStopSec"][0])
    assert stop > load_settings({}).drain_grace_s + 5  # room for the in-band ends and 1001s


def test_the_provider_stop_timeout_outlasts_its_drain_grace() -> None:
    found = directives("dinfer-provider.service")
    grace = next(v for v in found["Environment"] if v.startswith("DINFER_PROVIDER_DRAIN_GRACE="))
    assert int(found["TimeoutStopSec"][0]) > float(grace.split("=", 1)[1]) + 5
