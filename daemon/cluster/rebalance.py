"""Rebalancing: an instance holding more than its share of the cluster's providers sends some
of its idle ones `1001 going away`, so they reconnect through the balancer (docs/cluster.md).

`Rebalancer.run` is started with `nursery.start()` beside the `Cluster` (the supervisor does,
when DINFER_REBALANCE_EVERY_S is not 0). Every round (`every` seconds) it reads the live
instances (their `instance:{id}` keys) and which of them drain (`drain.draining_key`), and
`round` decides from the local replica of the directory:

- **share** = ceil(providers in the cluster / instances that take providers). The providers
  are this instance's (those it publishes: challenge passed) and the replica's remote entries
  whose owner is alive, a draining owner's included (they are about to land on the others);
  the instances exclude the draining ones, which the balancer sends nobody. The total is the
  largest seen over the last `TOTAL_MEMORY_ROUNDS` rounds: a provider on its way from one
  instance to another is in nobody's record for a moment, and a share that dipped with it
  would make a third instance shed too.
- **hysteresis**: nothing happens until this instance holds more than share + `slack(share)`
  (at least `SLACK_MIN`, `SLACK_FRACTION` of the share above that): the ceil and the slack
  leave room for every instance at once, so two instances near the share never trade a
  provider back and forth.
- **pace**: a round closes at most half the excess over share + slack, rounded up, and at
  most `MAX_MOVES_PER_ROUND`: half, because the others learn of the moved providers only
  when they have reconnected; the next round looks again.
- **whom**: only idle providers (no request in flight, relayed ones included: a stream is
  never cut), current, not held by an operator, not draining themselves, here at least
  `MIN_AGE_ROUNDS` rounds; the longest-here first. Not the newest: a newcomer may be one that
  was just moved (by us, a peer or a drain); sending it on again would make one provider pay
  every bounce, and it would be the one most likely to have a 1001 within seconds, which the
  reference node treats as a failure (provider/backoff.py).

The balancer will sometimes send a moved provider straight back. That costs the provider a
reconnect (about a second) and nothing else: it is here again as a newcomer, so it is the last
this instance would move; the excess it left is still there, so the next round moves another
of the oldest. Each move lands elsewhere with probability (n-1)/n on n instances, so the
excess shrinks geometrically and stops at share + slack, where no instance acts any more.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from daemon.cluster import wire
from daemon.routing.registry import Registry
from daemon.routing.types import ProviderEntry
from protocol.messages import CloseCode

if TYPE_CHECKING:
    import coredis

    from daemon.cluster.node import Cluster

log = logging.getLogger("dinfer.cluster.rebalance")

# No rebalancing until an instance holds more than share + max(SLACK_MIN, SLACK_FRACTION of it).
SLACK_MIN: Final = 1
SLACK_FRACTION: Final = 0.1
# A round moves at most half the excess (rounded up), and never more than this.
MAX_MOVES_PER_ROUND: Final = 8
# A provider is moved only after it has been here this many rounds.
MIN_AGE_ROUNDS: Final = 3
# The cluster's total is the largest of this many rounds (providers in transit count).
TOTAL_MEMORY_ROUNDS: Final = 3
INSTANCE_MATCH: Final = wire.PREFIX + "instance:*"


def fair_share(total: int, destinations: int) -> int:
    """The most providers an instance should hold if they were spread evenly."""
    return math.ceil(total / destinations)


def slack(share: int) -> int:
    """How far above its share an instance may be before it moves anyone."""
    return max(SLACK_MIN, math.ceil(share * SLACK_FRACTION))


def moves(mine: int, share: int) -> int:
    """How many providers one round moves away from an instance holding `mine`."""
    over = mine - share - slack(share)
    return 0 if over <= 0 else min(MAX_MOVES_PER_ROUND, math.ceil(over / 2))


@dataclass(frozen=True)
class Instances:
    """The cluster as one round sees it: the live instances, and which of those drain."""

    live: frozenset[str]
    draining: frozenset[str]


# What one round did.
@dataclass(frozen=True)
class Moved:
    providers: tuple[str, ...]
    mine: int
    share: int


@dataclass(frozen=True)
class Balanced:
    mine: int
    share: int


@dataclass(frozen=True)
class Paused:
    reason: str


Round = Moved | Balanced | Paused


class Rebalancer:
    def __init__(self, registry: Registry, instance: str, every: float) -> None:
        self.registry = registry
        self.instance = instance
        self.every = every
        self.moved = 0  # providers sent away so far
        self.rounds = 0
        self._first_seen: dict[ProviderEntry, float] = {}
        self._totals: deque[int] = deque(maxlen=TOTAL_MEMORY_ROUNDS)

    async def run(
        self,
        cluster: Cluster,
        *,
        task_status: trio.TaskStatus[Rebalancer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Rounds every `every` seconds, for as long as the instance runs (Redis down: none).

        A client of its own: a round's two commands never wait behind the cluster's traffic,
        and nothing here depends on how the cluster's messages travel.
        """
        import coredis

        from daemon.cluster.redis_io import REDIS_ERRORS

        async with coredis.Redis.from_url(
            cluster.url, connect_timeout=0.5, stream_timeout=2.0
        ) as redis:
            task_status.started(self)
            while True:
                await trio.sleep(self.every)  # the pace itself, not a poll: see the docstring
                if not cluster.up:
                    continue
                try:
                    instances = await read_instances(redis)
                except REDIS_ERRORS:
                    continue  # the cluster notices and says so; rebalancing waits for it
                self.round(instances)

    def round(self, instances: Instances) -> Round:
        now = trio.current_time()
        self.rounds += 1
        local = [e for e in self.registry.providers() if e.owner is None and _counted(e)]
        seen = {e: self._first_seen.get(e, now) for e in local}
        self._first_seen = seen
        if self.instance in instances.draining:
            return Paused("this instance is draining")
        live = instances.live | {self.instance}
        destinations = len(live - instances.draining)
        remote = sum(
            1 for e in self.registry.providers() if e.owner is not None and e.owner in live
        )
        self._totals.append(len(local) + remote)
        share = fair_share(max(self._totals), destinations)
        count = moves(len(local), share)
        if not count:
            return Balanced(len(local), share)
        old_enough = now - MIN_AGE_ROUNDS * self.every
        idle = [
            e
            for e in local
            if e.in_flight == 0 and not e.held and not e.draining and seen[e] <= old_enough
        ]
        idle.sort(key=lambda e: (seen[e], e.epoch))
        chosen = idle[:count]
        if not chosen:
            return Balanced(len(local), share)  # every one busy or new: the next round looks
        log.info(
            "rebalancing: %d providers here, a share of %d on %d instances: moving %d",
            len(local),
            share,
            destinations,
            len(chosen),
        )
        reason = f"rebalancing: {len(local)} providers here, a fair share is {share}"
        for entry in chosen:
            del self._first_seen[entry]
            entry.session.kick(CloseCode.GOING_AWAY, reason)  # leaves the registry at once
        self.moved += len(chosen)
        return Moved(tuple(e.provider_id for e in chosen), len(local), share)


def _counted(entry: ProviderEntry) -> bool:
    """Is it in the directory? (Only once its first challenge passed, as its record.)"""
    return entry.last_challenge_pass is not None


async def read_instances(redis: coredis.Redis[bytes]) -> Instances:
    """The live instances (their keys' TTL) and which of them announced a drain."""
    from daemon.cluster.drain import draining_key
    from daemon.cluster.redis_io import text

    prefix = len(INSTANCE_MATCH) - 1
    ids = [text(k)[prefix:] async for k in redis.scan_iter(match=INSTANCE_MATCH, count=1000)]
    flags = await redis.mget([draining_key(i) for i in ids]) if ids else []
    draining = {i for i, flag in zip(ids, flags, strict=True) if flag is not None}
    return Instances(frozenset(ids), frozenset(draining))
