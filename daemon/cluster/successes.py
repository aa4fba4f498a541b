"""Breaker successes an ingress saw on remote providers, on their way to the owners.

Only a provider's owner writes its breaker (node.py): an ingress reports a strike at once
(`strike`), and a success too, so a remote provider's strikes reset like a local one's. A
success is one of the most common events there is, so they are coalesced: `seen` adds the
(provider, model, shape) key to its owner's set, and at most `FLUSH_S` later one `success`
message per owner carries every key seen since (however many requests succeeded). A strike
for an owner first flushes what is pending for it (`flush`), so the owner sees one ingress's
successes and strikes in the order they happened.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import trio

from daemon.cluster import wire
from daemon.cluster.link import Post
from daemon.routing.breaker import BreakerKey
from daemon.routing.registry import Registry
from daemon.routing.types import SessionGone

FLUSH_S: Final = 0.05
SHAPES: Final = ("base", "tools", "vision")

_keys = msgspec.msgpack.Decoder(list[tuple[str, str, str]])


def decode(data: bytes) -> list[tuple[str, str, str]]:
    """A `success` message: the (provider, model, shape) keys that succeeded."""
    return _keys.decode(data)


class SuccessReports:
    def __init__(self, post: Post) -> None:
        self._post = post
        self._pending: dict[str, set[BreakerKey]] = {}  # owner -> keys
        self._wake = trio.Event()

    def seen(self, owner: str, key: BreakerKey) -> None:
        self._pending.setdefault(owner, set()).add(key)
        self._wake.set()

    def flush(self, owner: str) -> None:
        """Send what is pending for `owner` now (a strike for it follows)."""
        keys = self._pending.pop(owner, None)
        if keys:
            try:
                self._post(owner, wire.Kind.SUCCESS, "", msgspec.msgpack.encode(sorted(keys)))
            except SessionGone:
                pass  # the cluster is down: the owner's strikes age out of their window

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            await trio.sleep(FLUSH_S)  # one message per owner for a burst of successes
            self._wake = trio.Event()
            for owner in list(self._pending):
                self.flush(owner)


def record(registry: Registry, keys: list[tuple[str, str, str]]) -> None:
    """The owner's side of a `success` message: each key's strikes reset, as a local one's."""
    now = trio.current_time()
    ended = False  # a cooldown ended: the next record must say so
    for provider_id, model, name in keys:
        entry = registry.get(provider_id)
        if entry is None or entry.owner is not None or name not in SHAPES:
            continue  # it moved on, or a shape this daemon does not know
        shape: Any = name  # one of SHAPES
        key: BreakerKey = (provider_id, model, shape)
        ended |= registry.breaker.in_cooldown(key, now)
        registry.record_success(entry, model, shape, decode_tps=None)
    if ended:
        registry.touch()
