"""The client's address behind a reverse proxy: `X-Forwarded-For`, only from trusted peers.

`ForwardedFor` wraps the ASGI app and sets `scope["client"]` to the address the logs and
limits use. When the peer (the TCP connection's other end) is in `DINFER_TRUSTED_PROXIES`,
the client is the rightmost `X-Forwarded-For` entry that is not itself a trusted proxy: the
one our proxy saw, whatever a consumer wrote further left. From any other peer the header is
the consumer's own claim and is ignored, so nobody can choose the address they are seen by.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from daemon.api.asgi import Receive, Send
from daemon.config import IPNetwork

log = logging.getLogger("dinfer.access")

ASGIApp = Any


def client_address(peer: str, forwarded_for: str | None, trusted: Sequence[IPNetwork]) -> str:
    """Who sent the request: `peer`, or from a trusted peer what its header says."""
    if not forwarded_for or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",")]
    for hop in reversed(hops):
        if not _is_address(hop):
            return peer  # a header we cannot read names nobody
        if not _trusted(hop, trusted):
            return hop
    return hops[0]  # every hop a proxy of ours: the first one is as close as it gets


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class ForwardedFor:
    """ASGI middleware: `scope["client"]` is the real client (module docstring)."""

    def __init__(self, app: ASGIApp, trusted: Sequence[IPNetwork]) -> None:
        self._app = app
        self._trusted = tuple(trusted)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("client"):
            peer = scope["client"][0]
            header = _header(scope, b"x-forwarded-for")
            client = client_address(peer, header, self._trusted)
            if client != peer:
                scope = {**scope, "client": (client, 0)}
            log.debug(
                "%s %s from %s (peer %s)", scope.get("method", "WS"), scope["path"], client, peer
            )
        await self._app(scope, receive, send)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    values = [value.decode("latin-1") for key, value in scope["headers"] if key == name]
    return ", ".join(values) if values else None
