"""Directory records on a virtual clock: a record changes only on what routing elsewhere needs,
and applying an unchanged one leaves the replica, its breaker and the waiting queue alone."""

from __future__ import annotations

import msgspec
import trio
import trio.testing

from daemon.cluster import wire
from daemon.cluster.directory import Replica, entry_of, record_of
from daemon.cluster.link import Peer, RemoteLink
from daemon.config import load_settings
from daemon.nursery.supervisor import build_registry
from daemon.routing.registry import Registry
from daemon.routing.types import ProviderEntry, RequestTraits
from tests.fakes.entries import make_entry

BASE = RequestTraits(model="m")


def registry() -> Registry:
    return build_registry(load_settings({}), seed=1)


def published(owner: Registry, entry: ProviderEntry) -> wire.Record:
    record = record_of(entry, owner, "owner", trio.current_time())
    assert record is not None
    return record


def replicated(here: Registry, record: wire.Record) -> tuple[Replica, ProviderEntry]:
    """`record` applied at another instance: its replica and the remote entry."""
    replica = Replica(here)

    def post(target: str, kind: wire.Kind, request_id: str, data: bytes) -> None:
        pass

    entry = entry_of(record, RemoteLink(Peer("owner", post), record.provider_id, record.epoch))
    here.add_remote(entry)
    assert replica.refresh(entry, record, None)
    return replica, entry


async def test_a_record_does_not_change_as_requests_take_and_give_back_slots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    owner = registry()
    entry = make_entry("p1")
    owner.add(entry)
    idle = published(owner, entry)
    changes = owner.changes
    lease = owner.reserve(BASE)
    assert lease is not None
    assert published(owner, entry) == idle
    owner.release(lease)
    assert published(owner, entry) == idle
    assert owner.changes == changes  # the publisher need not even look
    assert msgspec.json.decode(wire.encode(idle))["in_flight"] == 0  # earlier versions need it
    owner.set_held(entry, True)
    assert published(owner, entry) != idle  # a drain is news
    assert owner.changes == changes + 1


async def test_an_unchanged_record_leaves_the_replica_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    owner, here = registry(), registry()
    local = make_entry("p1")
    owner.add(local)
    for _ in range(3):
        owner.record_failure(local, "m", "base", 500)  # into cooldown at its owner
    record = published(owner, local)
    assert record.cooldowns
    replica, remote = replicated(here, record)
    assert here.refusal(remote, BASE) is not None  # the cooldown is honoured here
    generation = here.generation.value
    await trio.sleep(0.5)
    assert not replica.refresh(remote, wire.decode_record(wire.encode(record)), None)
    assert here.generation.value == generation  # nothing woke
    assert here.refusal(remote, BASE) is not None


async def test_a_cooldown_reset_here_lasts_until_the_owners_next_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    owner, here = registry(), registry()
    local = make_entry("p1")
    owner.add(local)
    for _ in range(3):
        owner.record_failure(local, "m", "base", 500)
    record = published(owner, local)
    replica, remote = replicated(here, record)
    here.clear_cooldowns(remote)  # an operator's reset on this instance
    assert here.refusal(remote, BASE) is None
    assert replica.refresh(remote, record, None)  # the owner's periodic record: it cools again
    assert here.refusal(remote, BASE) is not None
    owner.clear_cooldowns(local)  # the reset at the owner: the record changes
    assert replica.refresh(remote, published(owner, local), None)
    assert here.refusal(remote, BASE) is None


async def test_an_owner_taken_for_dead_and_heard_again_is_routable_at_the_next_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    owner, here = registry(), registry()
    local = make_entry("p1")
    owner.add(local)
    record = published(owner, local)
    replica, remote = replicated(here, record)
    assert replica.refresh(remote, record, "unreachable (its daemon stopped answering)")
    assert here.refusal(remote, BASE) is not None
    assert replica.refresh(remote, record, None)
    assert here.refusal(remote, BASE) is None
    assert not replica.refresh(remote, record, None)
