"""`dinfer config check` and `dinfer serve --config` as an operator runs them: real processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

BOUND_S = 20  # a child interpreter starts in well under this, even on a busy machine
REPO = Path(__file__).resolve().parent.parent


async def dinfer(*args: str, **env: str) -> trio.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DINFER_")}
    with trio.fail_after(BOUND_S):
        return await trio.run_process(
            [sys.executable, "-m", "dinfer", *args],
            env={**clean, "PYTHONPATH": str(REPO), **env},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_config_check_prints_each_value_with_its_source_and_masks_secrets(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dinfer.toml"
    path.write_text('[server]\nadmin_key = "hunter2-secret"\n[breaker]\nthreshold = 4\n')

    done = await dinfer("config", "check", "--config", str(path), DINFER_QUEUE_MAX="3")

    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "hunter2" not in out
    lines = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines()}
    assert lines["[server] admin_key"].endswith("********  (file)")
    assert lines["[breaker] threshold"].endswith("4  (file)")
    assert lines["[queue] max"].endswith("3  (env DINFER_QUEUE_MAX)")
    assert lines["[server] log_level"].endswith("info  (default)")


async def test_config_check_exits_non_zero_naming_the_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "dinfer.toml"
    path.write_text("[queue]\nmax = 4\ntimeout = 3\n")

    done = await dinfer("config", "check", "--config", str(path))

    assert done.returncode == 1
    assert done.stderr.decode().strip() == f"dinfer: {path}: line 3: [queue] timeout: unknown key"


async def test_serve_with_a_bad_value_stops_at_start_naming_the_key_and_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dinfer.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[dispatch]\nmax_attempts = 0\n')

    done = await dinfer("serve", "--config", str(path))

    assert done.returncode != 0
    stderr = done.stderr.decode()
    assert f"{path}: line 4: [dispatch] max_attempts must be a positive integer" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "data").exists()  # nothing was opened
