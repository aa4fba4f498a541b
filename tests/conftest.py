"""Shared fixtures: a real daemon on a loopback port with its timing knobs turned down."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from daemon.api.serve import RunningDaemon, serve
from daemon.config import load_settings

ADMIN_KEY = "test-admin-key"

FAST_ENV = {
    "DINFER_LISTEN": "127.0.0.1:0",
    "DINFER_ADMIN_KEY": ADMIN_KEY,
    "DINFER_PROVIDER_AUTH": "open",
    "DINFER_REGISTER_TIMEOUT_S": "2",
    "DINFER_HEARTBEAT_TIMEOUT_S": "30",
    "DINFER_METRICS_LISTEN": "127.0.0.1:0",
}

StartDaemon = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
def start_daemon(nursery: trio.Nursery, tmp_path: Path) -> StartDaemon:
    """Start a daemon with FAST_ENV plus overrides (`DINFER_` prefix optional in keys)."""

    async def start(**overrides: str) -> RunningDaemon:
        env = {**FAST_ENV, "DINFER_DATA_DIR": str(tmp_path / "data")}
        env.update({_env_name(k): v for k, v in overrides.items()})
        settings = load_settings(env)
        running: RunningDaemon = await nursery.start(
            partial(serve, settings, shutdown_trigger=trio.sleep_forever, seed=7)
        )
        return running

    return start


def _env_name(key: str) -> str:
    key = key.upper()
    return key if key.startswith("DINFER_") else f"DINFER_{key}"


@pytest.fixture
async def daemon(start_daemon: StartDaemon) -> RunningDaemon:
    return await start_daemon()


# The consumer-API harness's fixtures, for every test module that drives the chat API.
from tests.consumer_harness import api, open_api  # noqa: E402, F401
from tests.dispatch_harness import world  # noqa: E402, F401
from tests.security_fixtures import target  # noqa: E402, F401
