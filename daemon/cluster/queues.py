"""The cluster's admission queues: each instance tells the others how many requests wait here.

DINFER_QUEUE_MAX is the cluster's: a request is refused as queue-full when the requests
waiting for its model on every instance together reach it (daemon/routing/admission.py adds
`waiting_elsewhere` to its own depth). Nothing crosses Redis on the request path: admission
reads only what is in memory here.

`QueueShare.run` sends this instance's depths (a `queue` message, the whole table of models
with a waiter, never a delta, so a lost message costs nothing the next one does not repair)
to every other live instance at most `COALESCE_S` after a depth changed, and every
`REFRESH_S` anyway; the same turn learns the live instances (their instance keys). What an
instance said counts until `TTL_S` passes without a word from it, or its instance key
expires: a dead instance's waiters stop counting within a few seconds.

Staleness: a depth change here reaches the others within `COALESCE_S` plus one writer batch
and one read (a few milliseconds on loopback); an instance that joined learns the others'
within `REFRESH_S` (they send to it once they see its key, it hears them from then on).
In that window each instance refuses against what it knows, so the cluster's total can pass
the limit by what arrived elsewhere within the window, never by more.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
import trio

from daemon.cluster import wire
from daemon.cluster.link import Post
from daemon.routing.admission import AdmissionQueue
from daemon.routing.types import SessionGone

COALESCE_S: Final = 0.02
REFRESH_S: Final = 1.0
TTL_S: Final = 3.0

_depths = msgspec.msgpack.Decoder(dict[str, int])

# The other live instances now; None when that cannot be known (the cluster's Redis is down).
LiveInstances = Callable[[], Awaitable[set[str] | None]]


class ClusterDepths:
    """The other instances' depths per model, as each last said them, and their sum."""

    def __init__(self) -> None:
        self._said: dict[str, tuple[float, dict[str, int]]] = {}  # instance -> (when, depths)

    def heard(self, instance: str, depths: dict[str, int], now: float) -> None:
        self._said[instance] = (now, {m: d for m, d in depths.items() if d > 0})

    def keep(self, live: set[str], now: float) -> None:
        """Forget an instance that is not live or that has been silent `TTL_S`."""
        self._said = {
            i: (at, d) for i, (at, d) in self._said.items() if i in live and now - at < TTL_S
        }

    def expire(self, now: float) -> None:
        self._said = {i: (at, d) for i, (at, d) in self._said.items() if now - at < TTL_S}

    def totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for _, depths in self._said.values():
            for model, depth in depths.items():
                totals[model] = totals.get(model, 0) + depth
        return totals


class QueueShare:
    """This instance's side of the cluster's queues: tells its depths, hears the others'."""

    def __init__(self, queue: AdmissionQueue, post: Post) -> None:
        self._queue = queue
        self._post = post
        self.depths = ClusterDepths()
        self._peers: set[str] = set()

    def heard(self, sender: str, data: bytes) -> None:
        """A `queue` message: `sender`'s whole table of depths (and it is alive: ours go to it
        from now on, not only from our next look at the instance keys)."""
        self.depths.heard(sender, _depths.decode(data), trio.current_time())
        self._peers.add(sender)
        self._queue.waiting_elsewhere(self.depths.totals())

    async def run(
        self, live: LiveInstances, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        sent: dict[str, int] | None = None
        refreshed = -math.inf
        while True:
            with trio.move_on_at(refreshed + REFRESH_S):
                await self._queue.changes.wait_transition()
                await trio.sleep(COALESCE_S)  # one message for a burst of changes
            now = trio.current_time()
            mine = self._queue.depths()
            if now >= refreshed + REFRESH_S:
                refreshed = now
                peers = await live()
                if peers is not None:
                    self._peers = peers
                    self.depths.keep(peers, now)
                else:
                    self.depths.expire(now)
                self._queue.waiting_elsewhere(self.depths.totals())
            elif mine == sent:
                continue
            sent = mine
            data = msgspec.msgpack.encode(mine)
            for peer in sorted(self._peers):
                try:
                    self._post(peer, wire.Kind.QUEUE, "", data)
                except SessionGone:
                    break  # the cluster is down: the next refresh says it again
