"""The daemon behind the reverse proxies of deploy/, as deployed: nginx and Caddy run the very
files there (only the name, the ports and the certificate changed) in front of a real `dinfer
serve` child, with TLS from a self-signed certificate made here.

Through each proxy a streamed answer arrives token by token (the first content while the
provider still holds the rest), a provider connects over `wss://`, and the client address the
daemon logs is the one the proxy saw, not the `X-Forwarded-For` a consumer wrote. Each proxy's
tests skip where its binary is absent; CI installs both.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from tests.consumer_harness import ADMIN, chat_body, create_key, poll_until
from tests.fakes.provider import start_fakes
from tests.process_harness import (
    BOUND_S,
    DaemonProcess,
    child_env,
    open_notify_socket,
    run_daemon_process,
)
from tests.test_drain import first_content, held_answer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CONSUMER_IP = "127.0.0.3"  # not the proxy's 127.0.0.1: the daemon must tell the two apart
SPOOFED = "203.0.113.9"


@dataclass
class Proxied:
    daemon: DaemonProcess
    url: str  # https://localhost:PORT
    context: ssl.SSLContext  # trusts the test's certificate

    @property
    def provider_url(self) -> str:
        return self.url.replace("https://", "wss://", 1) + "/ws/provider"

    def client(self) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(local_address=CONSUMER_IP, verify=self.context)
        return httpx.AsyncClient(base_url=self.url, transport=transport, timeout=BOUND_S)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_certificate(tmp_path: Path) -> tuple[Path, Path, ssl.SSLContext]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key, ssl.create_default_context(cafile=str(cert))


def nginx_config(tmp_path: Path, port: int, upstream: int, cert: Path, key: Path) -> Path:
    site = (DEPLOY / "nginx.conf").read_text()
    for old, new in {
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream};",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{port} ssl http2;",
        "server_name inference.example.com;": "server_name localhost;",
        "/etc/letsencrypt/live/inference.example.com/fullchain.pem": str(cert),
        "/etc/letsencrypt/live/inference.example.com/privkey.pem": str(key),
    }.items():
        assert old in site, old
        site = site.replace(old, new)
    (tmp_path / "site.conf").write_text(site)
    temp = tmp_path / "nginx-temp"
    temp.mkdir()
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the temp dirs
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/nginx-error.log info;\nevents {{}}\nhttp {{\n"
        f"  access_log off;\n  client_body_temp_path {temp}/body;\n"
        f"  proxy_temp_path {temp}/proxy;\n  fastcgi_temp_path {temp}/fastcgi;\n"
        f"  uwsgi_temp_path {temp}/uwsgi;\n  scgi_temp_path {temp}/scgi;\n"
        f"  include {tmp_path}/site.conf;\n}}\n"
    )
    return main


def caddy_config(tmp_path: Path, port: int, upstream: int, cert: Path, key: Path) -> Path:
    site = (DEPLOY / "Caddyfile").read_text()
    for old, new in {
        "reverse_proxy 127.0.0.1:8000 {": f"reverse_proxy 127.0.0.1:{upstream} {{",
        "inference.example.com {": f"https://localhost:{port} {{\n\ttls {cert} {key}",
    }.items():
        assert old in site, old
        site = site.replace(old, new)
    path = tmp_path / "Caddyfile"
    path.write_text("{\n\tadmin off\n\tauto_https disable_redirects\n}\n\n" + site)
    return path


async def run_proxy(
    kind: str,
    tmp_path: Path,
    port: int,
    upstream: int,
    cert: Path,
    key: Path,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    if kind == "nginx":
        config = nginx_config(tmp_path, port, upstream, cert, key)
        command = ["nginx", "-e", "stderr", "-p", str(tmp_path), "-c", str(config)]
        env = None
    else:
        config = caddy_config(tmp_path, port, upstream, cert, key)
        command = ["caddy", "run", "--config", str(config), "--adapter", "caddyfile"]
        env = child_env({"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "xdg")})
    log = (tmp_path / f"{kind}.log").open("ab")
    with log:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(trio.run_process, command, stdout=log, stderr=log, env=env, check=False)
            )
            await _until_accepts(port)
            task_status.started()


async def _until_accepts(port: int) -> None:
    # Neither proxy says when it listens on a socket we own: poll the port, bounded.
    with trio.fail_after(BOUND_S):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


@pytest.fixture(params=["nginx", "caddy"])
async def proxied(
    request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[Proxied]:
    kind = request.param
    if shutil.which(kind) is None:
        pytest.skip(f"{kind} is not installed")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key, context = make_certificate(tmp_path)
    async with open_notify_socket() as notify:
        env = {"DINFER_TRUSTED_PROXIES": "127.0.0.1/32", "DINFER_LOG_LEVEL": "debug"}
        daemon: DaemonProcess = await nursery.start(run_daemon_process, tmp_path, notify, env)
        port = free_port()
        await nursery.start(run_proxy, kind, tmp_path, port, daemon.port, cert, key)
        yield Proxied(daemon, f"https://localhost:{port}", context)
        nursery.cancel_scope.cancel(reason="the test is over")


async def consumer_key(proxied: Proxied) -> str:
    async with httpx.AsyncClient(base_url=proxied.daemon.url, headers=ADMIN) as admin:
        _, key = await create_key(admin)
    return key


async def test_a_stream_arrives_token_by_token_through_the_proxy_from_a_wss_provider(
    proxied: Proxied, nursery: trio.Nursery
) -> None:
    release = trio.Event()
    fake = held_answer(release)
    fake.url, fake.ssl_context = proxied.provider_url, proxied.context
    await start_fakes(nursery, [fake])
    assert fake.trusted.is_set()  # registered and attested over wss:// through the proxy
    key = await consumer_key(proxied)

    async with proxied.client() as client:
        auth = {"Authorization": f"Bearer {key}"}
        body = chat_body(stream=True)
        with trio.fail_after(BOUND_S):
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                # The provider holds the rest until the first token is here: a buffering
                # proxy would deliver nothing, and this would time out.
                await first_content(lines)
                release.set()
                rest = [line async for line in lines if line]
    assert any("second" in line for line in rest)
    assert rest[-1] == "data: [DONE]"


async def test_the_daemon_sees_the_consumer_through_the_proxy_never_a_spoofed_address(
    proxied: Proxied,
) -> None:
    spoof = {"X-Forwarded-For": SPOOFED}
    async with proxied.client() as through_proxy:
        assert (await through_proxy.get("/health", headers=spoof)).status_code == 200
    transport = httpx.AsyncHTTPTransport(local_address=CONSUMER_IP)
    async with httpx.AsyncClient(base_url=proxied.daemon.url, transport=transport) as direct:
        assert (await direct.get("/readyz", headers=spoof)).status_code == 200

    await poll_until(lambda: "GET /readyz from" in proxied.daemon.log_text())
    log = proxied.daemon.log_text()
    assert f"GET /health from {CONSUMER_IP} (peer 127.0.0.1)" in log
    assert f"GET /readyz from {CONSUMER_IP} (peer {CONSUMER_IP})" in log
    assert SPOOFED not in log
