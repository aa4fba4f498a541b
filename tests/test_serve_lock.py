"""One `dinfer serve` per data directory; the store's CLI commands still work beside it.

The first daemon runs in this process; the second runs either in this process too (the lock
is an `flock` on an open file, which two opens in one process contend for like two processes
do) or as a real `dinfer serve` child, to see what an operator sees.
"""

from __future__ import annotations

import os
import re
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from daemon.api.serve import RunningDaemon, serve
from daemon.config import Settings, load_settings
from daemon.serve_lock import DataDirInUse
from tests.conftest import FAST_ENV, StartDaemon

BOUND_S = 20  # a child Python interpreter starts in well under this, even on a busy machine
REPO = Path(__file__).resolve().parent.parent


def settings_for(data_dir: Path) -> Settings:
    return load_settings({**FAST_ENV, "DINFER_DATA_DIR": str(data_dir)})


def child_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINFER_")}
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "DINFER_LISTEN": "127.0.0.1:0",
        "DINFER_METRICS_LISTEN": "off",
        "DINFER_DATA_DIR": str(data_dir),
        "DINFER_LOG_LEVEL": "warning",
    }


async def run_dinfer(*args: str, data_dir: Path) -> trio.CompletedProcess[bytes]:
    with trio.fail_after(BOUND_S):
        return await trio.run_process(
            [sys.executable, "-m", "dinfer", *args],
            env=child_env(data_dir),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_a_second_daemon_on_the_same_data_directory_refuses_naming_the_first(
    start_daemon: StartDaemon, nursery: trio.Nursery, tmp_path: Path
) -> None:
    first = await start_daemon()

    with trio.fail_after(BOUND_S), pytest.raises(DataDirInUse) as refused:
        await nursery.start(partial(serve, settings_for(tmp_path / "data")))

    message = str(refused.value)
    assert str(tmp_path / "data") in message
    assert f"pid {os.getpid()}" in message
    assert first.base_url in message


async def test_a_daemon_on_another_data_directory_serves_beside_the_first(
    start_daemon: StartDaemon, nursery: trio.Nursery, tmp_path: Path
) -> None:
    first = await start_daemon()
    second: RunningDaemon = await nursery.start(
        partial(serve, settings_for(tmp_path / "other"), shutdown_trigger=trio.sleep_forever)
    )

    async with httpx.AsyncClient() as client:
        for daemon in (first, second):
            assert (await client.get(daemon.base_url + "/health")).status_code == 200


async def test_the_directory_is_free_again_once_its_daemon_has_stopped(tmp_path: Path) -> None:
    for _ in range(2):
        stop = trio.Event()
        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as nursery:  # exits when the daemon has stopped
                await nursery.start(
                    partial(serve, settings_for(tmp_path / "data"), shutdown_trigger=stop.wait)
                )
                stop.set()


async def test_dinfer_serve_on_a_directory_in_use_exits_at_once_naming_the_holder(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    first = await start_daemon()

    done = await run_dinfer("serve", data_dir=tmp_path / "data")

    assert done.returncode != 0
    stderr = done.stderr.decode()
    assert f"pid {os.getpid()}" in stderr and first.base_url in stderr
    assert "Traceback" not in stderr


async def test_dinfer_keys_create_works_while_the_daemon_serves_and_its_key_works_at_once(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon()

    done = await run_dinfer("keys", "create", "--name", "cli", data_dir=tmp_path / "data")

    assert done.returncode == 0, done.stderr.decode()
    match = re.search(r"^key: (dk_\S+)$", done.stdout.decode(), re.MULTILINE)
    assert match is not None
    async with httpx.AsyncClient(base_url=daemon.base_url) as client:
        reply = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {match[1]}"},
        )
    # Authenticated: refused only because no provider serves the model.
    assert reply.status_code not in (401, 500), reply.text
