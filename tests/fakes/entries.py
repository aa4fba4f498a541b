"""Registry entries for routing tests: routable by default, a dummy session that records kicks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import trio

from daemon.routing.types import ProviderEntry
from protocol import crypto
from protocol.messages import EncryptedPayload, ModelInfo, ProviderMessage

_PUBLIC_KEY = crypto.generate_box_key().public_key
_IDENTITY_KEY = crypto.generate_identity_key().verify_key


class DummySession:
    """Stands in for a live ProviderSession: records the kicks routing would send it.

    Routing tests never dispatch, so the stream methods do nothing.
    """

    def __init__(self) -> None:
        self.kicks: list[tuple[int, str]] = []

    def kick(self, code: int, reason: str) -> None:
        self.kicks.append((code, reason))

    def open_stream(self, request_id: str) -> trio.MemoryReceiveChannel[ProviderMessage]:
        return trio.open_memory_channel[ProviderMessage](0)[1]

    def start(self, request_id: str, body: EncryptedPayload, model: str = "") -> None:
        pass

    def cancel(self, request_id: str) -> None:
        pass

    def finish(self, request_id: str) -> None:
        pass

    def fell_behind(self, request_id: str) -> bool:
        return False


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
