"""One instance of a cluster: its Redis connection, its links, the directory, the relays.

`Cluster.run` is started with `nursery.start()` by the supervisor when DINFER_REDIS_URL is set
(never imported otherwise). It runs, in its own nursery:

- the **links** (`peerlink.py`): the data plane, one TCP connection per pair of instances,
  each with one writer (everyone else queues messages: `post`) and one reader, which hands
  each message to `_handle_one` without waiting: a provider frame to its request's bounded
  channel (`link.Peer`), a dispatch to a new relay task, a cancel to that relay's scope.
- the **reader**, the one task that reads the directory's change stream from Redis (a
  blocking XREAD) into the local replica of the directory.
- the **publisher**: this instance's providers as directory records with a TTL
  (`RECORD_TTL_MS`), at most every `PUBLISH_COALESCE_S` after a change (`registry.changes`:
  not a slot given back, since a record carries no load) and every `REFRESH_S` anyway (records
  and their application: daemon/cluster/directory.py), and a full read of the directory
  every `REFRESH_S` (records whose owner stopped refreshing them expire and leave the
  replica).
- the **heartbeat** (this instance's key, TTL `INSTANCE_TTL_MS`: its link's address and
  token) and the **watchdog**: a peer relaying our requests that stays silent `PING_AFTER_S`
  is pinged over the link and after `DEAD_AFTER_S` taken for dead (its requests end as
  disconnects: failover before content, an in-band error after); a peer whose instance key
  expired is dead too; an ingress whose key expired loses the requests we relay for it
  (cancelled on the provider's wire, `orphaned`). A link that breaks ends the requests on it
  at once, the same ways.
- the **credential sync** (credentials.py: consumer keys and provider tokens, the same in
  every instance's store within about 0.1 s).
- the **success reporter** (successes.py: the breaker successes seen here on remote providers,
  coalesced per owner) and the **queue share** (queues.py: this instance's admission queue
  depths to the others, theirs summed into its limit). Operators' orders for a remote
  provider go to its owner through remote_admin.py.

Ownership (docs/CLUSTER.md): the ingress owns the request (race, deadlines, decryption,
relay, ledger); the owner owns the session, its trust, its slots and its breaker. Only the
owner writes a provider's breaker: the ingress reports (`STRIKE`, `BAN`), the owner records,
publishes the cooldown in the record and in `wire.cooldown_key`, which outlives the session so
the next owner of that identity starts with it. Supersede: the newest epoch of one identity
wins; an older local session sees a newer record and closes with 4001.

Redis down: remote providers stay in the replica but are refused with a reason (eligibility's
`unreachable`), so no new remote attempt starts; requests in flight over a link carry on (the
link needs Redis only to authenticate a new connection); local providers serve as before;
the reader reconnects every `RECONNECT_S` and rebuilds.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final, Protocol, assert_never

import coredis
import msgspec
import trio
from coredis.tokens import PureToken

from daemon.accounts.ledger import Ledger, Settlement
from daemon.accounts.limits import Limiter
from daemon.cluster import successes, wire
from daemon.cluster.credentials import CredentialSync
from daemon.cluster.directory import Replica, entry_of, record_of
from daemon.cluster.limits import LimitSharer
from daemon.cluster.link import Peer, RemoteLink
from daemon.cluster.peerlink import Connection, Links
from daemon.cluster.queues import QueueShare
from daemon.cluster.redis_io import REDIS_ERRORS, text
from daemon.cluster.relay import Forward, IngressUnreachable, Relayed, SessionEnded
from daemon.cluster.remote_admin import RemoteAdmin
from daemon.cluster.successes import SuccessReports
from daemon.routing.admission import AdmissionQueue
from daemon.routing.breaker import Shape
from daemon.routing.registry import Registry
from daemon.routing.session import ProviderSession
from daemon.routing.types import Lease, ProviderEntry, SessionGone
from daemon.store import Store
from protocol.messages import (
    CloseCode,
    InferenceComplete,
    InferenceError,
    ProtocolError,
    decode_provider_frame,
    encode,
)

log = logging.getLogger("dinfer.cluster")

INSTANCE_TTL_MS: Final = 1500
HEARTBEAT_S: Final = 0.4
RECORD_TTL_MS: Final = 3000
REFRESH_S: Final = 1.0
PUBLISH_COALESCE_S: Final = 0.01
PING_AFTER_S: Final = 0.3
DEAD_AFTER_S: Final = 1.0
WATCH_EVERY_S: Final = 0.1
READ_BLOCK_MS: Final = 1000
RECONNECT_S: Final = 0.5
BATCH: Final = 1024  # directory events per XREAD
REDIS_DOWN: Final = "unreachable (the cluster's Redis is down)"
PEER_SILENT: Final = "unreachable (its daemon stopped answering)"
PEER_UNREACHABLE: Final = "unreachable (its daemon's link refused us)"

Fields = dict[str, str | bytes]


class SharedBudget(Protocol):
    """The hedging budget's window (daemon/nursery/hedging.py), shared across instances."""

    def budget_totals(self) -> tuple[int, int]: ...

    def budget_elsewhere(self, dispatches: int, backups: int) -> None: ...


@dataclass(eq=False)
class Relay:
    """A request another instance routed to a provider here (over `via`)."""

    ingress: str
    scope: trio.CancelScope
    provider_id: str
    via: Connection
    orphaned: bool = False  # its ingress is gone (counted and written once)


class Cluster:
    def __init__(
        self,
        url: str,
        registry: Registry,
        ledger: Ledger | None = None,
        instance: str | None = None,
        *,
        budget: SharedBudget | None = None,
        queue: AdmissionQueue | None = None,
        limits: Limiter | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        advertise: tuple[str, int] | None = None,
        store: Store | None = None,
    ) -> None:
        self.url = url
        self._store = store  # its keys and provider tokens replicate (credentials.py)
        self.credentials: CredentialSync | None = None
        self._budget = budget
        self._limits = limits  # each key's limits, shared by daemon/cluster/limits.py
        self._ledger = ledger
        self.instance = instance or uuid.uuid4().hex[:12]
        self.registry = registry
        self.up = False
        self.peers: dict[str, Peer] = {}
        self.relays: dict[str, Relay] = {}
        self.orphaned = 0  # relayed requests cancelled because their ingress died
        self._listen, self._advertise = listen, advertise
        self.links = Links(self.instance, self._lookup, self._deliver, self._link_lost)
        self._directory_id = "$"
        self._published: dict[str, wire.Record] = {}
        self._replica = Replica(registry)
        self._cooldowns_loaded: set[ProviderEntry] = set()
        self._nursery: trio.Nursery | None = None
        registry.remote_report = self._report
        registry.remote_success = self._succeeded
        self.successes = SuccessReports(self.post)
        self.queues = None if queue is None else QueueShare(queue, self.post)
        self.admin = RemoteAdmin(registry, self.post, self._forget_cooldowns)

    # Lifecycle ------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # Two clients: the reader's blocking XREAD holds its connection for up to a second.
        timeouts: dict[str, Any] = {"connect_timeout": 0.5, "stream_timeout": 2.0}
        commands = coredis.Redis.from_url(self.url, **timeouts)
        blocking = coredis.Redis.from_url(
            self.url, connect_timeout=0.5, stream_timeout=READ_BLOCK_MS / 1000 + 2
        )
        async with commands, blocking, trio.open_nursery() as nursery:
            self._redis, self._blocking, self._nursery = commands, blocking, nursery
            await nursery.start(self.links.run, self._listen, self._advertise)
            await self._connect()
            nursery.start_soon(self._read)
            nursery.start_soon(self._publish)
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._watch)
            nursery.start_soon(self.successes.run)
            if self.queues is not None:
                nursery.start_soon(self.queues.run, self._live_instances)
            if self._limits is not None:
                await nursery.start(LimitSharer(commands, self.instance, self._limits).run)
            if self._store is not None:
                sync = CredentialSync(commands, self.url, self._store, self.instance, self.registry)
                self.credentials = await nursery.start(sync.run)
            log.info("cluster instance %s on %s", self.instance, _shown(self.url))
            task_status.started(self)

    async def _connect(self) -> bool:
        """(Re)join: announce ourselves, read the whole directory. False if Redis is down."""
        try:
            await self._announce()
            if self._directory_id == "$":
                self._directory_id = await self._xadd(wire.DIRECTORY_STREAM, {"k": "hello"})
            await self._rebuild()
        except REDIS_ERRORS as exc:
            self._lost(exc)
            return False
        if not self.up:
            self.up = True
            log.info("cluster instance %s joined", self.instance)
            await self._rebuild()
        self._published.clear()  # Redis may have lost them: publish everything again
        self.registry.touch()  # wakes the publisher
        return True

    async def _announce(self) -> None:
        """This instance's key: alive, and where its link listens (with its token)."""
        me = wire.Instance(self.links.address, self.links.token.hex(), time.time())
        await self._redis.set(wire.instance_key(self.instance), wire.encode(me), px=INSTANCE_TTL_MS)

    async def _lookup(self, instance: str) -> wire.Instance | None:
        """Another instance's key, for its link (None: it is gone, or Redis is)."""
        try:
            value = await self._redis.get(wire.instance_key(instance))
        except REDIS_ERRORS as exc:
            self._lost(exc)
            return None
        if value is None:
            return None
        try:
            return wire.decode_instance(value if isinstance(value, bytes) else value.encode())
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None

    def _lost(self, exc: BaseException) -> None:
        """Redis is unreachable: no new remote attempt starts; the links carry on with the
        requests in flight; local serving goes on."""
        if self.up:
            # The text only: a record holding the exception would keep its frames alive.
            log.warning(
                "cluster: Redis is unreachable (%s): serving local providers only", str(exc)
            )
        self.up = False
        for entry in self.registry.providers():
            if entry.owner is not None:
                entry.unreachable = REDIS_DOWN
        self.registry.touch()

    # The links ------------------------------------------------------------------------------

    def post(self, target: str, kind: wire.Kind, request_id: str, data: bytes) -> None:
        """Send one message to `target` over its link, never waiting; SessionGone if it can't."""
        self.links.current(target).send(kind, request_id, data)

    async def _xadd(self, key: str, fields: Fields) -> str:
        ident = await self._redis.xadd(
            key,
            fields,
            trim_strategy=PureToken.MAXLEN,
            threshold=wire.DIRECTORY_MAXLEN,
            trim_operator=PureToken.APPROXIMATELY,
        )
        return ident.decode() if isinstance(ident, bytes) else str(ident)

    def _deliver(self, via: Connection, kind: str, request_id: str, data: bytes) -> None:
        """One message from a link (its reader calls this: it must not wait)."""
        peer = self.peers.get(via.peer)
        if peer is not None:
            peer.heard()
        try:
            self._handle_one(peer, via.peer, kind, request_id, data, via)
        except (msgspec.ValidationError, msgspec.DecodeError, KeyError, ValueError):
            log.warning("cluster: dropped a malformed message")

    def _link_lost(self, via: Connection, current: bool) -> None:
        """A link ended: the requests on it end now, on both sides."""
        peer = self.peers.get(via.peer)
        if peer is not None:
            if via.failed and peer.dead is None:
                self._peer_died(peer, PEER_UNREACHABLE)  # its link would not take us
            elif current:
                peer.streams.close_all()  # our requests to it went on this one: disconnects
        for request_id, relay in list(self.relays.items()):
            if relay.via is via:
                self._orphan(request_id, relay)

    # The reader -----------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            if not self.up:
                await trio.sleep(RECONNECT_S)
                await self._connect()
                continue
            try:
                answer = await self._blocking.xread(
                    {wire.DIRECTORY_STREAM: self._directory_id}, count=BATCH, block=READ_BLOCK_MS
                )
            except REDIS_ERRORS as exc:
                self._lost(exc)
                continue
            for entries in (answer or {}).values():
                for entry in entries:
                    ident = entry.identifier
                    self._directory_id = ident.decode() if isinstance(ident, bytes) else str(ident)
                    try:
                        self._directory_event(entry.field_values)
                    except (msgspec.ValidationError, msgspec.DecodeError, KeyError, ValueError):
                        log.warning("cluster: dropped a malformed directory event")

    def _handle_one(
        self,
        peer: Peer | None,
        sender: str,
        kind: str,
        request_id: str,
        data: bytes,
        via: Connection,
    ) -> None:
        """One message from `sender` (arrived over `via`: the link a relay answers on)."""
        match kind:
            case wire.Kind.FRAME:
                if peer is not None:
                    frame = decode_provider_frame(data)
                    if not isinstance(frame, ProtocolError):
                        final = isinstance(frame, InferenceComplete | InferenceError)
                        peer.streams.route(request_id, frame, final=final)
            case wire.Kind.GONE:
                if peer is not None:
                    peer.streams.finish(request_id)
            case wire.Kind.DISPATCH:
                self._begin_relay(via, request_id, wire.decode_dispatch(data))
            case wire.Kind.CANCEL:
                relay = self.relays.get(request_id)
                if relay is not None and relay.ingress == sender:
                    relay.scope.cancel(reason="the ingress cancelled the request")
            case wire.Kind.PING:
                _send(via, wire.Kind.PONG, request_id)
            case wire.Kind.PONG:
                pass
            case wire.Kind.STRIKE | wire.Kind.BAN | wire.Kind.KICK:
                self._reported(kind, wire.decode_report(data))
            case wire.Kind.SUCCESS:
                successes.record(self.registry, successes.decode(data))
            case wire.Kind.QUEUE:
                if self.queues is not None:
                    self.queues.heard(sender, data)
            case wire.Kind.ADMIN:
                self.admin.ordered(sender, request_id, data)
            case wire.Kind.ADMIN_DONE:
                self.admin.answered(sender, request_id, data)

    def _answer(self, target: str, kind: wire.Kind, request_id: str, data: bytes = b"") -> None:
        try:
            self.post(target, kind, request_id, data)
        except SessionGone:
            pass

    # The owner's side: relaying a remote request --------------------------------------------

    def _begin_relay(self, via: Connection, request_id: str, dispatch: wire.Dispatch) -> None:
        """Start a remote request on its provider from the link's reader, at once: no task
        switch before the provider has it. `_relay` then waits for its end."""
        relaying = self.relays.get(request_id)
        if relaying is not None:
            # A request id already relayed (ids are readable on the network): never a second
            # sink for it, which would take the first one's frames and leave it waiting.
            log.warning("cluster: a dispatch repeats a request id in flight: dropped")
            if relaying.ingress != via.peer:
                _send(via, wire.Kind.GONE, request_id)  # its own stream of that id, if any
            return
        entry = self.registry.get(dispatch.provider_id)
        session = None if entry is None else entry.session
        if (
            entry is None
            or entry.owner is not None
            or entry.epoch != dispatch.epoch
            or not isinstance(session, ProviderSession)
        ):
            _send(via, wire.Kind.GONE, request_id)
            return
        if entry.held or entry.draining:
            # Sent before the ingress saw the hold (a deploy drain, an operator's drain): busy,
            # as the provider itself says it, so the ingress fails over without a strike.
            busy = InferenceError(request_id, "the provider is draining", 503, "draining")
            _send(via, wire.Kind.FRAME, request_id, encode(busy).encode())
            return
        assert self._nursery is not None
        lease: Lease = self.registry.take(entry, dispatch.model)
        forward = Forward(via, request_id)
        session.open_raw(request_id, forward)  # its frames go to `via` from the reader
        try:
            session.start(request_id, dispatch.body, dispatch.model)
        except SessionGone:
            session.finish(request_id)
            self.registry.release(lease)
            _send(via, wire.Kind.GONE, request_id)
            return
        relay = Relay(via.peer, trio.CancelScope(), entry.provider_id, via)
        self.relays[request_id] = relay
        self._nursery.start_soon(self._relay, request_id, relay, session, lease, forward)

    async def _relay(
        self,
        request_id: str,
        relay: Relay,
        session: ProviderSession,
        lease: Lease,
        forward: Forward,
    ) -> None:
        """Wait for a started remote request's end (a cancel before this task ran cancels
        its scope, which is then cancelled as it is entered); free what it held."""
        cancel = True  # unless the request ended on its own: a `cancel` to the provider
        try:
            with relay.scope:
                match await forward.ended.receive():
                    case Relayed() | SessionEnded():
                        cancel = False
                    case IngressUnreachable():
                        self._orphan(request_id, relay)  # its link broke under a send
                    case _ as never:
                        assert_never(never)
        finally:
            if self.relays.get(request_id) is relay:
                del self.relays[request_id]
            self.registry.release(lease)
            if cancel:
                session.cancel(request_id)
            else:
                session.finish(request_id)

    def _orphan(self, request_id: str, relay: Relay) -> None:
        """The ingress of a relayed request died: stop the provider, write an orphan row.
        Once: the link's loss and a send that failed on it may both say so."""
        if relay.orphaned:
            return
        relay.orphaned = True
        self.orphaned += 1
        log.warning("cluster: ingress %s is gone: cancelling its request", relay.ingress)
        relay.scope.cancel(reason="the request's ingress daemon is gone")
        if self._ledger is not None and self._nursery is not None:
            self._nursery.start_soon(self._orphan_row, request_id, relay)

    async def _orphan_row(self, request_id: str, relay: Relay) -> None:
        """The owner's row of an orphan: keyed by the attempt's id (the consumer's request
        id and key are the ingress's), route `cluster`, the provider that was serving it."""
        assert self._ledger is not None
        charge = await self._ledger.open(request_id, f"ingress:{relay.ingress}", "cluster")
        ended = Settlement(
            499,
            "orphaned",
            provider_id=relay.provider_id,
            attempts=1,
            providers=(relay.provider_id,),
        )
        await charge.settle(ended)

    # Reports: only a provider's owner strikes or bans it ------------------------------------

    def _report(
        self, entry: ProviderEntry, model: str, shape: Shape, status: int, reason: str | None
    ) -> None:
        """The registry's hook for a remote entry: tell its owner what happened here."""
        link = entry.session
        if not isinstance(link, RemoteLink):
            return
        kind = wire.Kind.BAN if reason is not None else wire.Kind.STRIKE
        report = wire.Report(entry.provider_id, model, shape, status, reason)
        self.successes.flush(link.peer.instance)  # the owner sees them in their order
        try:
            link.peer.post(kind, "", wire.encode(report))
        except SessionGone:
            pass

    def _succeeded(self, entry: ProviderEntry, model: str, shape: Shape) -> None:
        """The registry's hook for a remote entry's success: to its owner, coalesced."""
        link = entry.session
        if isinstance(link, RemoteLink) and link.peer.dead is None:
            self.successes.seen(link.peer.instance, (entry.provider_id, model, shape))

    def _forget_cooldowns(self, provider_id: str) -> None:
        """An operator cleared a local provider's cooldowns: its next owner must not load them."""
        if self._nursery is not None and self.up:
            self._nursery.start_soon(self._delete_cooldowns, provider_id)

    async def _delete_cooldowns(self, provider_id: str) -> None:
        try:
            await self._redis.delete([wire.cooldown_key(provider_id)])
        except REDIS_ERRORS as exc:
            self._lost(exc)

    async def _live_instances(self) -> set[str] | None:
        """The other instances whose key is alive (queues.py); None when Redis is down."""
        if not self.up:
            return None
        prefix = wire.instance_key("")
        try:
            keys = [k async for k in self._redis.scan_iter(match=prefix + "*", count=1000)]
        except REDIS_ERRORS as exc:
            self._lost(exc)
            return None
        return {text(k).removeprefix(prefix) for k in keys} - {self.instance}

    def _reported(self, kind: str, report: wire.Report) -> None:
        entry = self.registry.get(report.provider_id)
        if entry is None or entry.owner is not None:
            return  # it moved on: a reconnect elsewhere carries its cooldowns (cooldown_key)
        match kind:
            case wire.Kind.STRIKE:
                shape: Any = report.shape
                self.registry.record_failure(entry, report.model, shape, report.status)
            case wire.Kind.BAN:
                self.registry.ban(entry, report.reason or "banned")
            case wire.Kind.KICK:
                entry.session.kick(CloseCode.SUPERSEDED, "superseded by a newer connection")

    # The directory: publishing ours, replicating theirs -------------------------------------

    async def _publish(self) -> None:
        generation = self.registry.generation
        refreshed = -math.inf
        seen = -1
        while True:
            with trio.move_on_at(refreshed + REFRESH_S):
                await generation.wait_transition()
                await trio.sleep(PUBLISH_COALESCE_S)  # one publish for a burst of changes
            if not self.up:
                continue
            refresh = trio.current_time() >= refreshed + REFRESH_S
            if not refresh and self.registry.changes == seen:
                continue  # only load moved (slots given back): no record changed
            seen = self.registry.changes
            try:
                await self._publish_once(refresh=refresh)
                if refresh:
                    refreshed = trio.current_time()
                    await self._rebuild()
                    await self._share_budget()
            except REDIS_ERRORS as exc:
                self._lost(exc)

    async def _publish_once(self, *, refresh: bool) -> None:
        now = trio.current_time()
        local = [e for e in self.registry.providers() if e.owner is None]
        for entry in local:
            if entry not in self._cooldowns_loaded:
                await self._load_cooldowns(entry)
        self._cooldowns_loaded &= set(local)
        records: dict[str, wire.Record] = {}
        for entry in local:
            record = record_of(entry, self.registry, self.instance, now)
            if record is not None:
                records[entry.provider_id] = record
        gone = [pid for pid in self._published if pid not in records]
        changed = {pid: r for pid, r in records.items() if self._published.get(pid) != r}
        if not (gone or changed or refresh):
            return
        encoded = {pid: wire.encode(r) for pid, r in (records if refresh else changed).items()}
        async with self._redis.pipeline(transaction=False) as pipe:
            for pid, data in encoded.items():
                pipe.set(wire.directory_key(pid, self.instance), data, px=RECORD_TTL_MS)
            for pid, record in changed.items():
                pipe.xadd(wire.DIRECTORY_STREAM, {"k": "rec", "d": encoded[pid]})
                if record.cooldowns:
                    table = {f"{m}|{s}": str(until) for m, s, until in record.cooldowns}
                    pipe.hset(wire.cooldown_key(pid), table)
                    longest = max(until for _, _, until in record.cooldowns) - time.time()
                    pipe.pexpire(wire.cooldown_key(pid), int(longest * 1000) + 1000)
            for pid in gone:
                pipe.delete([wire.directory_key(pid, self.instance)])
                pipe.xadd(wire.DIRECTORY_STREAM, {"k": "del", "p": pid, "f": self.instance})
        for pid in gone:
            del self._published[pid]
        self._published.update(changed)

    async def _share_budget(self) -> None:
        """Publish this instance's hedging window, sum the others': one cluster budget."""
        if self._budget is None:
            return
        dispatches, backups = self._budget.budget_totals()
        mine = wire.budget_key(self.instance)
        await self._redis.set(mine, f"{dispatches} {backups}", px=RECORD_TTL_MS)
        keys = [k async for k in self._redis.scan_iter(match=wire.BUDGET_MATCH, count=1000)]
        others = [k for k in keys if text(k) != mine]
        total_d = total_b = 0
        for value in await self._redis.mget(others) if others else []:
            if value is not None:
                d, _, b = text(value).partition(" ")
                total_d, total_b = total_d + int(d), total_b + int(b)
        self._budget.budget_elsewhere(total_d, total_b)

    async def _load_cooldowns(self, entry: ProviderEntry) -> None:
        """A provider new on this instance keeps the cooldowns it had elsewhere."""
        table = await self._redis.hgetall(wire.cooldown_key(entry.provider_id))
        self._cooldowns_loaded.add(entry)
        now, wall = trio.current_time(), time.time()
        imposed = False
        for field, until in table.items():
            model, _, shape = text(field).rpartition("|")
            left = float(text(until)) - wall
            if left > 0 and shape in ("base", "tools", "vision"):
                key: Any = (entry.provider_id, model, shape)
                self.registry.breaker.impose(key, now + left)
                imposed = True
        if imposed:
            self.registry.touch()

    async def _rebuild(self) -> None:
        """Read the whole directory; forget remote entries no longer in it."""
        keys: list[Any] = []
        async for key in self._redis.scan_iter(match=wire.DIRECTORY_MATCH, count=1000):
            keys.append(key)
        values = await self._redis.mget(keys) if keys else []
        found: set[tuple[str, str]] = set()
        for value in values:
            if value is None:
                continue
            try:
                record = wire.decode_record(value)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue
            found.add((record.provider_id, record.owner))
            self._apply(record)
        for entry in self.registry.providers():
            if entry.owner is not None and (entry.provider_id, entry.owner) not in found:
                self.registry.remove(entry)

    def _directory_event(self, fields: Any) -> None:
        kind = fields[b"k"].decode()
        if kind == "rec":
            record = wire.decode_record(fields[b"d"])
            if record.owner != self.instance:
                self._peer(record.owner).heard()  # it just spoke: it is alive
            self._apply(record)
        elif kind == "del":
            entry = self.registry.get(fields[b"p"].decode())
            if entry is not None and entry.owner == fields[b"f"].decode():
                self.registry.remove(entry)

    def _apply(self, record: wire.Record) -> None:
        if record.owner == self.instance:
            return
        current = self.registry.get(record.provider_id)
        if current is not None and current.owner is None:
            if record.epoch > current.epoch and record.attested_at is not None:
                log.info("provider %s connected to another daemon", record.provider_id)
                current.session.kick(
                    CloseCode.SUPERSEDED, "superseded by a newer connection on another daemon"
                )
                current = self.registry.get(record.provider_id)  # retired at once
            else:
                return  # ours is the newer session: the other one closes itself
        if current is not None and (current.owner, current.epoch) != (record.owner, record.epoch):
            if record.epoch < current.epoch:
                return
            self.registry.remove(current)
            current = None
        peer = self._peer(record.owner)
        if current is None:
            current = entry_of(record, RemoteLink(peer, record.provider_id, record.epoch))
            self.registry.add_remote(current)  # clears the identity's breaker: refresh after
        unreachable = REDIS_DOWN if not self.up else peer.dead
        if self._replica.refresh(current, record, unreachable):
            self.registry.touch()  # only a change wakes the queue and the publisher

    def _peer(self, instance: str) -> Peer:
        peer = self.peers.get(instance)
        if peer is None:
            peer = self.peers[instance] = Peer(instance, self.post)
        return peer

    # Liveness -------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(HEARTBEAT_S)
            if not self.up:
                continue
            try:
                await self._announce()
            except REDIS_ERRORS as exc:
                self._lost(exc)

    async def _watch(self) -> None:
        turn = 0
        while True:
            await trio.sleep(WATCH_EVERY_S)
            now = trio.current_time()  # the links' liveness needs no Redis
            for peer in self.peers.values():
                if peer.dead is not None or not len(peer.streams):
                    continue
                silent = now - peer.last_heard
                if silent > DEAD_AFTER_S:
                    self._peer_died(peer, PEER_SILENT)
                elif silent > PING_AFTER_S and now - peer.pinged_at > PING_AFTER_S:
                    peer.pinged_at = now
                    self._answer(peer.instance, wire.Kind.PING, "")
            turn += 1
            if turn % 5 == 0 and self.up:
                try:
                    await self._check_instances()
                except REDIS_ERRORS as exc:
                    self._lost(exc)

    async def _check_instances(self) -> None:
        """The backstop: an instance whose key expired is dead, whatever it last said."""
        ingresses = {r.ingress for r in self.relays.values()}
        owners = {p.instance for p in self.peers.values() if p.dead is None and len(p.streams)}
        wanted = sorted(ingresses | owners)
        if not wanted:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            found = [pipe.exists([wire.instance_key(i)]) for i in wanted]
        alive = {i for i, f in zip(wanted, found, strict=True) if await f}
        for instance in set(wanted) - alive:
            peer = self.peers.get(instance)
            if peer is not None and peer.dead is None:
                self._peer_died(peer, PEER_SILENT)
            for request_id, relay in list(self.relays.items()):
                if relay.ingress == instance:
                    self._orphan(request_id, relay)

    def _peer_died(self, peer: Peer, reason: str) -> None:
        log.warning("cluster: instance %s stopped answering: its requests fail over", peer.instance)
        peer.died(reason)
        self.links.close(peer.instance, reason)
        for entry in self.registry.providers():
            if entry.owner == peer.instance:
                entry.unreachable = reason
        self.registry.touch()


def _send(via: Connection, kind: wire.Kind, request_id: str, data: bytes = b"") -> None:
    """An answer on the link a message came over, if it still takes one."""
    try:
        via.send(kind, request_id, data)
    except SessionGone:
        pass


def _shown(url: str) -> str:
    """The URL without a password."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
