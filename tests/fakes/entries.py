"""Registry entries for routing tests: routable by default, a dummy session that records kicks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import trio

from daemon.routing.registry import ProviderEntry
from protocol import crypto
from protocol.messages import ModelInfo

_PUBLIC_KEY = crypto.generate_box_key().public_key
_IDENTITY_KEY = crypto.generate_identity_key().verify_key


class DummySession:
    """Stands in for a live ProviderSession: records the kicks routing would send it."""

    def __init__(self) -> None:
        self.kicks: list[tuple[int, str]] = []

    def kick(self, code: int, reason: str) -> None:
        self.kicks.append((code, reason))


def make_entry(
    provider_id: str = "p1", models: Iterable[str | ModelInfo] = ("m",), **fields: Any
) -> ProviderEntry:
    """A routable entry (trusted, challenge passed now) unless `fields` say otherwise."""
    infos = [ModelInfo(id=m) if isinstance(m, str) else m for m in models]
    fields.setdefault("trusted", True)
    if "last_challenge_pass" not in fields:
        fields["last_challenge_pass"] = trio.current_time()
    fields.setdefault("version", "0.7.0")
    fields.setdefault("max_concurrency", 4)
    return ProviderEntry(
        provider_id=provider_id,
        session=DummySession(),
        backend="llama.cpp",
        public_key=_PUBLIC_KEY,
        identity_key=_IDENTITY_KEY,
        models={info.id: info for info in infos},
        **fields,
    )
