"""`dinfer serve --workers N` drains as one daemon does: a real parent with three workers on
one port, a redis-server started here, a fake provider and a consumer through the port.

SIGTERM to the parent drains every worker; a worker with nothing left exits first, and that
must not stop its siblings at once (a second SIGTERM, to a draining daemon, means "stop now"):
the stream in flight finishes and the parent exits 0. The same when the SIGTERM reaches every
process at once, as systemd's stop does (each process of the unit) and a terminal's Ctrl-C
(the process group): a worker then hears it from its parent too. A second SIGTERM to the
parent stops every worker at once. Every wait has a bound.
"""

from __future__ import annotations

import os
import signal
import sys

import httpx
import pytest
import trio

from tests.consumer_harness import ADMIN, chat_body
from tests.fakes.provider import FakeProvider, always, start_fakes
from tests.test_cluster import (  # noqa: F401 - pytestmark: needs redis-server
    ENV,
    ROOT,
    World,
    _free_port,
    _instances,
    _ready,
    pytestmark,
)
from tests.test_cluster import world as world  # the fixture
from tests.test_rebalance import held_script

WORKERS = 3  # a provider and a consumer occupy at most two: one is idle, and exits first


@pytest.mark.parametrize("to", ["parent", "group", "twice"])
async def test_a_worker_done_first_does_not_stop_its_draining_siblings(
    world: World, to: str
) -> None:
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DINFER_")},
        **ENV,
        "PYTHONPATH": str(ROOT),
        "DINFER_LISTEN": f"127.0.0.1:{port}",
        "DINFER_DATA_DIR": str(world.tmp / "workers"),
        "DINFER_REDIS_URL": world.redis.url,
        "DINFER_DRAIN_GRACE_S": "30",
        "DINFER_REBALANCE_EVERY_S": "0",
    }
    command = [sys.executable, "-m", "dinfer", "serve", "--workers", str(WORKERS)]
    # lowlevel: to signal it; its own session: a process group to signal as systemd would
    process = await trio.lowlevel.open_process(command, env=env, cwd=ROOT, start_new_session=True)
    release = trio.Event()
    seen, ended = trio.Event(), trio.Event()
    text: list[str] = []
    base = f"http://127.0.0.1:{port}"
    try:
        with trio.fail_after(60):  # three daemons start on a loaded 2-core machine
            while len(await _instances(world.redis.url)) < WORKERS:  # noqa: ASYNC110 - polled
                await trio.sleep(0.1)
        async with httpx.AsyncClient(base_url=base, timeout=30) as client, trio.open_nursery() as n:
            with trio.fail_after(30):
                while (await _ready(client)) != 200:  # noqa: ASYNC110 - polled, bounded
                    await trio.sleep(0.1)
            reply = await client.post("/v1/admin/keys", json={"name": "t"}, headers=ADMIN)
            assert reply.status_code == 201, reply.text
            auth = {"Authorization": f"Bearer {reply.json()['key']}"}
            url = f"ws://127.0.0.1:{port}/ws/provider"
            fake = FakeProvider(url, behaviour=always(held_script(release)))
            await start_fakes(n, [fake])
            assert fake.trusted.is_set()

            async def stream() -> None:
                body = chat_body(stream=True)
                try:
                    with trio.fail_after(40):
                        while True:  # a worker that has no record of the provider yet: again
                            async with client.stream(
                                "POST", "/v1/chat/completions", json=body, headers=auth
                            ) as r:
                                if r.status_code != 200:
                                    await r.aread()
                                    await trio.sleep(0.05)
                                    continue
                                async for piece in r.aiter_text():
                                    text.append(piece)
                                    if "first" in "".join(text):
                                        seen.set()
                                return
                except httpx.HTTPError as exc:
                    text.append(f"<{type(exc).__name__}>")
                finally:
                    ended.set()

            n.start_soon(stream)
            with trio.fail_after(30):
                await seen.wait()
            if to == "parent":
                process.send_signal(signal.SIGTERM)
            else:
                os.killpg(process.pid, signal.SIGTERM)
            with trio.fail_after(20):  # the idle worker drains at once and exits
                while len(await _instances(world.redis.url)) == WORKERS:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            with trio.move_on_after(3):  # its siblings must go on draining, the stream open
                await ended.wait()
            assert not ended.is_set(), "".join(text)
            if to == "twice":  # the operator's "stop now": the stream ends, so do the workers
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(20):
                    await ended.wait()
                    await process.wait()
                assert " second" not in "".join(text)
                return
            release.set()
            with trio.fail_after(20):
                await ended.wait()
        body = "".join(text)
        assert " second" in body and "[DONE]" in body, body
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        release.set()
        if process.returncode is None:
            process.kill()
            await process.wait()
