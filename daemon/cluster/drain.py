"""A deploy's drain in a cluster: announce it, take the cluster's drain lock, move the
providers to the other instances with `1001 going away`, release the lock at the end.

`moving_providers` is entered by the supervisor's drain (daemon/nursery/supervisor.py) when
the instance is part of a cluster; alone, the drain is what it always was. Inside it:

1. **announce**: `draining:{id}` (PX `DRAINING_TTL_MS`, renewed every `RENEW_S` and left to
   expire, so it outlives the instance's own key): the peers' rebalancers stop counting this
   instance as a place for providers (daemon/cluster/rebalance.py). The balancer already
   stops sending it anyone: its `/readyz` answers 503 from the first moment of the drain.
2. **the lock**: `drain-lock` (SET NX PX `LOCK_TTL_MS` in a script, renewed every `RENEW_S`
   while held): one drain group moves its providers at a time, so a rolling deploy never
   takes two instances' providers away at once. A drain that finds the lock taken waits for
   it (a Redis round every `LOCK_RETRY_S`: Redis has no blocking wait on a key's deletion
   without keyspace notifications, which are off by default, and a crashed holder's lock
   only expires), its providers serving on meanwhile (held back would idle them for nothing
   while the other instance's also leave). If its drain grace runs out first it stops as a
   daemon alone does: its requests end in band and every provider closes with 1001 at once,
   the holder still holding the lock (logged). Redis unreachable: the providers move without
   the lock (nobody can be asked).
3. **move**: with the lock, every provider here is held (no new request, and its record says
   so, so the other instances stop routing remote attempts to it within a publish) and each
   idle one closes with 1001 at once, each busy one the moment its last request (local or
   relayed) ends: `moved` is set when none is left. A provider that arrives meanwhile is moved
   the same way.

`--workers N`: the parent forwards SIGTERM to every worker, and the workers of one parent are
one *drain group* (`group`: the host and the parent's pid) and drain together under one lock:
they share the machine and the port, and the whole machine is going away. Serialized, the
providers the first worker sends away would reconnect to the same port and land on its
siblings, only to be moved again.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, assert_never

import anyio
import trio

from daemon.cluster import wire
from daemon.routing.registry import Registry
from protocol.messages import CloseCode

if TYPE_CHECKING:
    from daemon.cluster.node import Cluster

log = logging.getLogger("dinfer.cluster.drain")

DRAINING_TTL_MS: Final = 3000
LOCK_TTL_MS: Final = 5000
RENEW_S: Final = 1.0
LOCK_RETRY_S: Final = 0.25
# Time for the lock's release at the very end (shielded: the drain is being torn down).
RELEASE_S: Final = 1.0
LOCK_KEY: Final = wire.PREFIX + "drain-lock"
HOLDERS_KEY: Final = wire.PREFIX + "drain-lock:holders"
MOVED = "daemon shutting down (a deploy): reconnect to another instance"

# KEYS: lock, holders; ARGV: group, instance, ttl. '' when taken, else the holder's group.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return ''
end
return holder
"""
# KEYS: lock, holders; ARGV: group, ttl. 1 while the group holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
# KEYS: lock, holders; ARGV: group, instance. The group's last holder deletes the lock.
_RELEASE = """
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""


def draining_key(instance: str) -> str:
    return f"{wire.PREFIX}draining:{instance}"


def drain_group(instance: str, *, worker: bool) -> str:
    """Who drains together: the workers of one `--workers` parent, or this instance alone."""
    return f"{socket.gethostname()}:{os.getppid()}" if worker else instance


# How the wait for the lock ended.
@dataclass(frozen=True)
class Taken:
    """This drain group holds the lock."""


@dataclass(frozen=True)
class Unlocked:
    """Redis did not answer: the providers move without the lock."""

    reason: str


@dataclass(frozen=True)
class Waited:
    """The grace ran out while `holder` held the lock."""

    holder: str


Turn = Taken | Unlocked | Waited


class DrainLock:
    def __init__(self, redis: Any, instance: str, group: str) -> None:
        self._redis = redis
        self._instance = instance
        self.group = group
        self.held = False

    async def acquire(self, deadline: float) -> Turn:
        from daemon.cluster.redis_io import REDIS_ERRORS, text

        holder = ""
        logged = False
        with trio.move_on_at(deadline):
            while True:
                try:
                    answer = await self._redis.eval(
                        _ACQUIRE,
                        keys=[LOCK_KEY, HOLDERS_KEY],
                        args=[self.group, self._instance, LOCK_TTL_MS],
                    )
                except REDIS_ERRORS as exc:
                    return Unlocked(str(exc))
                holder = text(answer)
                if not holder:
                    self.held = True
                    return Taken()
                if not logged:
                    log.info("drain: waiting for %s's drain to end before moving providers", holder)
                    logged = True
                await trio.sleep(LOCK_RETRY_S)  # see the module's note
        return Waited(holder)

    async def keep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew the lock while the drain runs."""
        from daemon.cluster.redis_io import REDIS_ERRORS

        task_status.started()
        while True:
            await trio.sleep(RENEW_S)
            try:
                kept = await self._redis.eval(
                    _RENEW, keys=[LOCK_KEY, HOLDERS_KEY], args=[self.group, LOCK_TTL_MS]
                )
            except REDIS_ERRORS:
                continue  # it lives LOCK_TTL_MS; the next renewal may reach Redis
            if not kept:
                log.warning("drain: the drain lock expired while held; moving providers anyway")

    async def release(self) -> None:
        from daemon.cluster.redis_io import REDIS_ERRORS

        if not self.held:
            return
        self.held = False
        try:
            await self._redis.eval(
                _RELEASE, keys=[LOCK_KEY, HOLDERS_KEY], args=[self.group, self._instance]
            )
        except (*REDIS_ERRORS, anyio.ClosedResourceError, anyio.BrokenResourceError):
            # Unreachable, or a stop "at once" already closed the client's connection (its
            # tasks were cancelled with the daemon's): the lock expires within LOCK_TTL_MS.
            pass


@asynccontextmanager
async def moving_providers(
    cluster: Cluster, registry: Registry, group: str, deadline: float
) -> AsyncIterator[trio.Event]:
    """Announce the drain and move the providers away (see the module's note) until the
    block ends; the event is set once no provider is left here."""
    import coredis

    moved = trio.Event()
    redis = coredis.Redis.from_url(cluster.url, connect_timeout=0.5, stream_timeout=2.0)
    lock = DrainLock(redis, cluster.instance, group)
    async with redis:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(_announce, redis, cluster.instance)
                nursery.start_soon(_move, lock, registry, deadline, moved, nursery)
                try:
                    yield moved
                finally:
                    nursery.cancel_scope.cancel(reason="the drain is over")
        finally:
            with trio.move_on_after(RELEASE_S) as releasing:
                releasing.shield = True
                await lock.release()


async def _announce(
    redis: Any, instance: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    from daemon.cluster.redis_io import REDIS_ERRORS

    key = draining_key(instance)
    started = False
    while True:
        try:
            await redis.set(key, "1", px=DRAINING_TTL_MS)
        except REDIS_ERRORS:
            pass  # the peers see the instance's key expire instead
        if not started:
            task_status.started()
            started = True
        await trio.sleep(RENEW_S)


async def _move(
    lock: DrainLock,
    registry: Registry,
    deadline: float,
    moved: trio.Event,
    nursery: trio.Nursery,
) -> None:
    turn = await lock.acquire(deadline)
    match turn:
        case Taken():
            await nursery.start(lock.keep)
            log.info(
                "drain: moving %d provider(s) to the other instances", len(registry.connected())
            )
        case Unlocked(reason=reason):
            log.warning(
                "drain: Redis is unreachable (%s): moving providers without the lock", reason
            )
        case Waited(holder=holder):
            log.warning(
                "drain: the grace ran out while %s held the drain lock: providers close now",
                holder,
            )
            return
        case _:
            assert_never(turn)
    await move_away(registry, moved)


async def move_away(registry: Registry, moved: trio.Event) -> None:
    """Hold every provider here; close each with 1001 once idle; set `moved` when none is
    left (and go on: a newcomer is moved too)."""
    while True:
        for entry in registry.connected():
            if registry.is_current(entry):
                registry.set_held(entry, True)
            if entry.in_flight == 0:
                entry.session.kick(CloseCode.GOING_AWAY, MOVED)
        if not registry.connected():
            moved.set()
        await registry.generation.wait_transition()  # a request ended, a provider arrived
