"""`X-Forwarded-For` names the client only from a trusted proxy, and only the hop it added."""

from __future__ import annotations

import ipaddress

import pytest

from daemon.api.forwarded import client_address

TRUSTED = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("peer", "header", "client"),
    [
        ("127.0.0.1", "198.51.100.7", "198.51.100.7"),  # our proxy says who it saw
        ("127.0.0.1", "203.0.113.9, 198.51.100.7", "198.51.100.7"),  # the left part is a claim
        ("127.0.0.1", "198.51.100.7, 10.1.2.3", "198.51.100.7"),  # two proxies of ours
        ("127.0.0.1", "10.1.2.3", "10.1.2.3"),  # only proxies: the farthest one
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", "not-an-ip", "127.0.0.1"),
        ("192.0.2.1", "198.51.100.7", "192.0.2.1"),  # an untrusted peer's header is ignored
        ("::1", "198.51.100.7", "::1"),
    ],
)
def test_client_address(peer: str, header: str | None, client: str) -> None:
    assert client_address(peer, header, TRUSTED) == client


def test_with_no_trusted_proxies_the_header_is_always_ignored() -> None:
    assert client_address("127.0.0.1", "198.51.100.7", []) == "127.0.0.1"
