"""Per-key limits across the cluster: each instance publishes what it spent, reads the others'.

`share_limits` runs in the cluster's nursery (started by `Cluster.run` with `nursery.start()`)
and is the only code that moves a key's spending through Redis; the request path stays in
memory (`Limiter.admit` adds what `Limiter.elsewhere` was last given).

Layout: one string per instance, `dinfer:limits:{instance}`: a msgpack map of key id →
`Share` (what the instance spent of that key since it started: rpm debt and its refill rate,
tokens of the last minute in whole seconds, tokens of the UTC day, requests in flight), only
for the keys it has something of, PX `SHARE_TTL_MS`: a dead instance's share expires with it.
Every `TICK_S` the task writes it when one of its keys was admitted or settled since the last
write (so a burst of requests is one write), and every `REFRESH_S` anyway (restamped: it stays
alive, and the debts peers extrapolate stay fresh); and every `TICK_S` it reads every other
instance's (one MGET; the list of instances from a SCAN every `REFRESH_S`) and hands them to
`Limiter.elsewhere`. Staleness: a request admitted here counts at every peer within two ticks
(0.2 s) plus two round trips; a new instance is seen within `REFRESH_S`.

Redis down: nothing is written or read; the shares already read expire `SHARE_TTL_S` (3 s)
after they were measured (a share that vanished, Redis having restarted empty, too: not at
once), and from then on each instance counts its own requests only (a key
may then get up to N times its limits) until Redis answers again.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Final

import msgspec
import trio

from daemon.accounts.limits import SHARE_TTL_S, Limiter, Share
from daemon.cluster.redis_io import REDIS_ERRORS, text
from daemon.cluster.wire import PREFIX

log = logging.getLogger("dinfer.cluster")

TICK_S: Final = 0.1
REFRESH_S: Final = 1.0
SHARE_TTL_MS: Final = int(SHARE_TTL_S * 1000)
LIMITS_MATCH: Final = PREFIX + "limits:*"

_shares = msgspec.msgpack.Decoder(dict[str, Share])


def limits_key(instance: str) -> str:
    """What `instance` spent of each key (see the module docstring)."""
    return f"{PREFIX}limits:{instance}"


class LimitSharer:
    """This instance's shares as last written, and the others' as last read."""

    def __init__(self, redis: Any, instance: str, limiter: Limiter) -> None:
        self._redis = redis
        self._key = limits_key(instance)
        self._limiter = limiter
        self.mine: dict[str, Share] = {}
        self._peers: list[str] = []  # the other instances' keys
        self._read: dict[str, bytes] = {}  # each peer's value as last decoded
        self._decoded: dict[str, dict[str, Share]] = {}
        self._refreshed = -math.inf
        self.up = True

    async def run(self, *, task_status: trio.TaskStatus[LimitSharer]) -> None:
        task_status.started(self)
        while True:
            began = trio.current_time()
            try:
                await self.tick(began)
            except REDIS_ERRORS as exc:
                if self.up:
                    log.warning(
                        "cluster: key limits are not shared (Redis: %s); each instance "
                        "counts its own requests once the shares it read expire",
                        str(exc),
                    )
                self.up = False
            await trio.sleep_until(began + TICK_S)

    async def tick(self, now: float) -> None:
        every = now >= self._refreshed + REFRESH_S
        changed = self._limiter.shares(every=every)
        for key_id, share in changed.items():
            if share is None:
                self.mine.pop(key_id, None)
            else:
                self.mine[key_id] = share
        if every or changed:
            await self._redis.set(self._key, msgspec.msgpack.encode(self.mine), px=SHARE_TTL_MS)
        if every:
            found = [text(k) async for k in self._redis.scan_iter(match=LIMITS_MATCH, count=1000)]
            self._peers = sorted(k for k in found if k != self._key)
            self._refreshed = now
        if not self.up:
            log.info("cluster: key limits are shared again")
            self.up = True
        values = await self._redis.mget(self._peers) if self._peers else []
        if self._take(dict(zip(self._peers, values, strict=True))):
            self._limiter.elsewhere(self._merged())

    def _take(self, values: dict[str, Any]) -> bool:
        """Decode what changed; True if anything did."""
        changed = False
        wall = time.time()
        for key, shares in list(self._decoded.items()):
            # Gone: its instance stopped (then it is SHARE_TTL_S old already), or Redis
            # restarted empty (then what the peer spent counts on until it is that old: the
            # peer writes it again within REFRESH_S).
            newest = max((share.at for share in shares.values()), default=-math.inf)
            if values.get(key) is None and wall - newest >= SHARE_TTL_S:
                del self._decoded[key], self._read[key]
                changed = True
        for key, value in values.items():
            if value is None or self._read.get(key) == value:
                continue
            try:
                self._decoded[key] = _shares.decode(value)
            except (msgspec.ValidationError, msgspec.DecodeError):
                log.warning("cluster: dropped a malformed limits share")
                continue
            self._read[key] = value
            changed = True
        return changed

    def _merged(self) -> dict[str, tuple[Share, ...]]:
        merged: dict[str, list[Share]] = {}
        for shares in self._decoded.values():
            for key_id, share in shares.items():
                merged.setdefault(key_id, []).append(share)
        return {key_id: tuple(shares) for key_id, shares in merged.items()}
