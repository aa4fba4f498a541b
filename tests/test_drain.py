"""SIGTERM drains the daemon as deployed: a real `dinfer serve` child, a fake provider and a
consumer in this process. `/readyz` and new requests answer 503 at once, a stream in flight
finishes, one still open when the grace runs out ends in band with `server_shutting_down`,
providers close with 1001, the exit is 0; a second SIGTERM stops at once. SIGHUP reloads."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from tests.consumer_harness import ADMIN, chat_body, create_key, poll_until
from tests.fakes.provider import (
    Chunk,
    Complete,
    FakeProvider,
    Hold,
    always,
    content_chunk,
    finish_chunk,
    role_chunk,
    start_fakes,
)
from tests.process_harness import (
    BOUND_S,
    DaemonProcess,
    NotifySocket,
    open_notify_socket,
    run_daemon_process,
)


def held_answer(release: trio.Event) -> FakeProvider:
    return FakeProvider(
        "",
        behaviour=always(
            [
                role_chunk(),
                content_chunk("first"),
                Hold(release),
                content_chunk(" second"),
                finish_chunk(),
                Chunk("data: [DONE]"),
                Complete(),
            ]
        ),
    )


@asynccontextmanager
async def deployed(
    nursery: trio.Nursery, tmp_path: Path, fake: FakeProvider, **env: str
) -> AsyncIterator[tuple[DaemonProcess, NotifySocket, httpx.AsyncClient, str]]:
    async with open_notify_socket() as notify:
        daemon: DaemonProcess = await nursery.start(run_daemon_process, tmp_path, notify, env)
        fake.url = daemon.provider_url
        await start_fakes(nursery, [fake])
        async with httpx.AsyncClient(base_url=daemon.url, timeout=BOUND_S) as client:
            client.headers.update(ADMIN)
            _, key = await create_key(client)
            yield daemon, notify, client, key


async def first_content(lines: AsyncIterator[str]) -> None:
    async for line in lines:
        if "first" in line:
            return


async def test_a_stream_in_flight_finishes_through_the_drain_while_new_work_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    release = trio.Event()
    fake = held_answer(release)
    async with deployed(nursery, tmp_path, fake) as (daemon, notify, client, key):
        auth = {"Authorization": f"Bearer {key}"}
        body = chat_body(stream=True)
        with trio.fail_after(BOUND_S):
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
                lines = r.aiter_lines()
                await first_content(lines)
                daemon.process.send_signal(signal.SIGTERM)
                await notify.until("STOPPING")

                ready = await client.get("/readyz")
                refused = await client.post("/v1/chat/completions", json=body, headers=auth)
                release.set()
                rest = [line async for line in lines]

            assert ready.status_code == 503
            assert ready.json()["error"]["code"] == "shutting_down"
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "5"
            assert refused.json()["error"]["code"] == "shutting_down"
            assert any("second" in line for line in rest)
            assert rest[-2:] == ["data: [DONE]", ""]
            await fake.closed.wait()
            assert await daemon.process.wait() == 0
    assert fake.close_code == 1001


async def test_a_stream_still_open_when_the_grace_is_over_ends_in_band(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    fake = held_answer(trio.Event())  # never released
    grace = {"DINFER_DRAIN_GRACE_S": "1"}
    async with deployed(nursery, tmp_path, fake, **grace) as (daemon, _, client, key):
        auth = {"Authorization": f"Bearer {key}"}
        with trio.fail_after(BOUND_S):
            body = chat_body(stream=True)
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
                lines = r.aiter_lines()
                await first_content(lines)
                daemon.process.send_signal(signal.SIGTERM)
                rest = [line async for line in lines if line]
            await fake.closed.wait()
            assert await daemon.process.wait() == 0
    error = json.loads(rest[0].removeprefix("data: "))["error"]
    assert error["type"] == "server_shutting_down"
    assert rest[1:] == ["data: [DONE]"]
    assert fake.close_code == 1001
    assert fake.cancels  # the provider was told to stop, not just dropped


async def test_a_second_sigterm_stops_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    fake = held_answer(trio.Event())
    grace = {"DINFER_DRAIN_GRACE_S": "600"}
    async with deployed(nursery, tmp_path, fake, **grace) as (daemon, notify, client, key):
        auth = {"Authorization": f"Bearer {key}"}
        with trio.fail_after(BOUND_S):
            body = chat_body(stream=True)
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
                lines = r.aiter_lines()
                await first_content(lines)
                daemon.process.send_signal(signal.SIGTERM)
                await notify.until("STOPPING")
                daemon.process.send_signal(signal.SIGTERM)
                assert await daemon.process.wait() == 0  # well before the 600 s grace
                with pytest.raises(httpx.RemoteProtocolError):  # cut off mid-stream
                    async for _ in lines:
                        pass
    assert "second SIGTERM: stopping now" in daemon.log_text()


async def test_sighup_reloads_live_settings_and_keeps_them_on_an_error(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = tmp_path / "dinfer.toml"
    config.write_text("[queue]\nmax = 10\n[server]\nlog_level = 'info'\n")
    async with open_notify_socket() as notify:
        daemon: DaemonProcess = await nursery.start(
            run_daemon_process, tmp_path, notify, {}, ("--config", str(config))
        )
        config.write_text(
            "[queue]\nmax = 3\n[server]\nlog_level = 'info'\n[http]\nkeepalive_timeout_s = 7\n"
        )
        daemon.process.send_signal(signal.SIGHUP)
        await poll_until(lambda: "reloaded settings" in daemon.log_text())
        config.write_text("[queue]\nmax = 0\n")
        daemon.process.send_signal(signal.SIGHUP)
        await poll_until(lambda: "reload failed" in daemon.log_text())
        daemon.process.send_signal(signal.SIGTERM)
        with trio.fail_after(BOUND_S):
            assert await daemon.process.wait() == 0
    log = daemon.log_text()
    assert "changed but only a restart applies them: [http] keepalive_timeout_s" in log
    assert "reloaded settings; changed: [queue] max" in log
    assert (
        f"reload failed, keeping the running settings: {config}: line 2: [queue] max must be a "
        "positive integer, got '0'" in log
    )
