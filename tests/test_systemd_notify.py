"""`Type=notify` as systemd sees it: the daemon and the provider node as real child processes
reporting to a `NOTIFY_SOCKET` the test owns (READY only once the port accepts, WATCHDOG pings
from the event loop, STOPPING on SIGTERM), and the sd_notify module on its own."""

from __future__ import annotations

import signal
import socket
import sys
from functools import partial
from pathlib import Path

import trio

from hosting import sd_notify
from tests.conftest import StartDaemon
from tests.process_harness import (
    BOUND_S,
    DaemonProcess,
    child_env,
    open_notify_socket,
    run_daemon_process,
)


async def test_the_daemon_is_ready_only_once_it_accepts_pings_the_watchdog_and_stops(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with open_notify_socket() as notify:
        daemon: DaemonProcess = await nursery.start(run_daemon_process, tmp_path, notify)

        # READY=1 has arrived: the port must already accept, with nothing retried.
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        await stream.aclose()
        assert notify.seen[0]["STATUS"].endswith(": 0 provider(s), 0 request(s) in flight")
        for _ in range(3):  # WatchdogSec=1 s: a ping each half second, again and again
            assert await notify.until("WATCHDOG") == {"WATCHDOG": "1"}

        daemon.process.send_signal(signal.SIGTERM)
        stopping = await notify.until("STOPPING")
        assert stopping["STATUS"].startswith("draining on http://127.0.0.1:")
        with trio.fail_after(BOUND_S):
            assert await daemon.process.wait() == 0


async def test_a_config_error_under_systemd_names_the_key_and_never_says_ready(
    tmp_path: Path,
) -> None:
    config = tmp_path / "dinfer.toml"
    config.write_text("[breaker]\nthreshold = -1\n")
    async with open_notify_socket() as notify:
        env = child_env({"NOTIFY_SOCKET": notify.address})
        with trio.fail_after(BOUND_S):
            done = await trio.run_process(
                [sys.executable, "-m", "dinfer", "serve", "--config", str(config)],
                env=env,
                capture_stderr=True,
                check=False,
            )
        assert done.returncode != 0
        assert f"{config}: line 2: [breaker] threshold must be" in done.stderr.decode()
        with trio.move_on_after(0.2):  # a READY=1 would be there already: the child is gone
            raise AssertionError(await notify.next())


async def test_the_provider_node_says_ready_pings_and_says_stopping(
    start_daemon: StartDaemon, nursery: trio.Nursery, tmp_path: Path
) -> None:
    daemon = await start_daemon()
    async with open_notify_socket() as notify:
        env = child_env(
            {
                "NOTIFY_SOCKET": notify.address,
                "WATCHDOG_USEC": "1000000",
                "DINFER_PROVIDER_COORDINATOR": daemon.provider_url,
                # Nothing answers there: the first model poll fails fast, which is "started".
                "DINFER_PROVIDER_BACKEND": "http://127.0.0.1:9",
                "DINFER_PROVIDER_STATE_DIR": str(tmp_path / "state"),
                "DINFER_PROVIDER_DRAIN_GRACE": "5",
            }
        )
        command = [sys.executable, "-m", "dinfer", "provider"]
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, env=env, check=False)
        )
        ready = await notify.until("READY")
        assert ready["STATUS"] == f"serving http://127.0.0.1:9 to {daemon.provider_url}"
        await notify.until("WATCHDOG")
        process.send_signal(signal.SIGTERM)
        assert (await notify.until("STOPPING"))["STATUS"] == "draining for up to 5 s"
        with trio.fail_after(BOUND_S):
            assert await process.wait() == 0


async def test_notify_speaks_to_an_abstract_socket_and_a_path(tmp_path: Path) -> None:
    for address in ("@dinfer-unit-" + tmp_path.name, str(tmp_path / "notify")):
        receiver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with receiver:
            await receiver.bind(sd_notify.address(address))
            async with sd_notify.open_notifier({"NOTIFY_SOCKET": address}) as notifier:
                await notifier.ready("up")
                await notifier.stopping("down")
            assert await receiver.recv(100) == b"READY=1\nSTATUS=up"
            assert await receiver.recv(100) == b"STOPPING=1\nSTATUS=down"


async def test_without_notify_socket_every_send_is_a_no_op() -> None:
    async with sd_notify.open_notifier({}) as notifier:
        await notifier.ready("up")
        assert notifier.watchdog_interval is None
        await notifier.keep_alive()  # returns at once: no watchdog asked for


def test_the_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_pid() -> None:
    assert sd_notify.watchdog_seconds({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert sd_notify.watchdog_seconds({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert sd_notify.watchdog_seconds({"WATCHDOG_USEC": "nope"}) is None
    assert sd_notify.Notifier(None, 3.0).watchdog_interval == 1.5


async def test_keep_alive_pings_at_half_the_interval_on_the_virtual_clock(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    receiver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with receiver:
        await receiver.bind(str(tmp_path / "notify"))
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "10000000"}
        async with sd_notify.open_notifier(env) as notifier, trio.open_nursery() as nursery:
            await nursery.start(notifier.keep_alive)
            start = trio.current_time()
            times = []
            for _ in range(3):
                assert await receiver.recv(100) == b"WATCHDOG=1"
                times.append(trio.current_time() - start)
            nursery.cancel_scope.cancel(reason="three pings seen")
    assert times == [0.0, 5.0, 10.0]
