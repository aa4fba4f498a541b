"""Directory records: what an owner publishes of a local provider, and how a peer's record
becomes (and keeps up) this instance's remote entry for it.

A record carries only what routing at another instance needs (identity and keys, models,
version, gates, trust, drain, ban, cooldowns, epoch), never the provider's load: an owner
publishes (SET + XADD) only when one of those changes, not on every request that takes or
gives back a slot, and each instance reads only those changes. An ingress counts its own
requests on a remote provider; one that is full answers busy, which fails over before content
(docs/cluster.md, Slots).

`Replica.refresh` applies a record to its remote entry. A record equal to the one last
applied to that entry costs a comparison: the entry, the breaker and the registry's
generation stay untouched (the owner's periodic SET and this instance's periodic full read
repeat every record each second). A changed record updates the entry in place and rewrites
the provider's breaker state only when its cooldowns changed, or when the local breaker lost
one of them (an operator's reset here lasts until the owner's next record, as before).
"""

from __future__ import annotations

import time
from typing import Any
from weakref import WeakKeyDictionary

import trio

from daemon.cluster import wire
from daemon.cluster.link import RemoteLink
from daemon.routing.registry import Registry
from daemon.routing.types import ProviderEntry
from protocol import crypto

# A remote entry's challenge_failures: enough to be untrusted (CHALLENGE_FAILURES_TO_UNTRUST).
UNTRUSTED_FAILURES = 3


def record_of(
    entry: ProviderEntry, registry: Registry, owner: str, now: float
) -> wire.Record | None:
    """What the directory says of a local entry; None until its first challenge passed."""
    if entry.last_challenge_pass is None or not registry.is_current(entry):
        return None
    wall = time.time() - now  # wall clock = monotonic + this (rounded: records compare equal)
    return wire.Record(
        provider_id=entry.provider_id,
        owner=owner,
        epoch=entry.epoch,
        version=entry.version,
        backend=entry.backend,
        public_key=crypto.encode_key(entry.public_key),
        identity_key=crypto.encode_key(entry.identity_key),
        models=list(entry.models.values()),
        max_concurrency=entry.max_concurrency,
        attested_at=round(wall + entry.last_challenge_pass, 1),
        trusted=entry.trusted,
        draining=entry.draining,
        held=entry.held,
        banned=entry.banned_reason is not None,
        prefill_tps=entry.advertised_prefill_tps,
        decode_tps=entry.advertised_decode_tps,
        cooldowns=[
            (model, shape, round(wall + until, 2))
            for model, shape, until in registry.breaker.cooldowns(entry.provider_id, now)
        ],
        multi_sse=entry.multi_sse,
    )


def entry_of(record: wire.Record, link: RemoteLink) -> ProviderEntry:
    """A new remote entry for `record` (its mutable state comes from `Replica.refresh`)."""
    return ProviderEntry(
        provider_id=record.provider_id,
        session=link,
        version=record.version,
        backend=record.backend,
        public_key=crypto.decode_peer_public_key(record.public_key),
        identity_key=crypto.decode_identity_key(record.identity_key),
        models={m.id: m for m in record.models},
        max_concurrency=record.max_concurrency,
        advertised_prefill_tps=record.prefill_tps,
        advertised_decode_tps=record.decode_tps,
        owner=record.owner,
        epoch=record.epoch,
        multi_sse=record.multi_sse,
    )


class Replica:
    """The records last applied to this instance's remote entries."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._applied: WeakKeyDictionary[ProviderEntry, wire.Record] = WeakKeyDictionary()

    def refresh(self, entry: ProviderEntry, record: wire.Record, unreachable: str | None) -> bool:
        """Bring the remote `entry` in line with `record` and with its owner's reachability;
        True when something routing sees changed (the caller bumps the generation)."""
        changed = entry.unreachable != unreachable
        entry.unreachable = unreachable
        now, wall = trio.current_time(), time.time()
        previous = self._applied.get(entry)
        if previous == record:
            if self._cooldowns_held(record, now, wall):
                return changed
            self._impose(entry, record, now, wall)
            return True
        registry = self._registry
        if previous is None or previous.models != record.models:
            if list(entry.models.values()) != list(record.models):
                registry.update_models(entry, record.models)
        entry.max_concurrency = record.max_concurrency
        entry.trusted = record.trusted
        entry.draining = record.draining
        entry.held = record.held
        entry.banned_reason = "banned by its daemon" if record.banned else None
        at = record.attested_at
        entry.last_challenge_pass = None if at is None else now - max(0.0, wall - at)
        entry.challenge_failures = 0 if record.trusted else UNTRUSTED_FAILURES
        if (
            previous is None
            or previous.cooldowns != record.cooldowns
            or not self._cooldowns_held(record, now, wall)
        ):
            self._impose(entry, record, now, wall)
        self._applied[entry] = record
        return True

    def _impose(self, entry: ProviderEntry, record: wire.Record, now: float, wall: float) -> None:
        """The provider's breaker here is exactly the record's cooldowns."""
        breaker = self._registry.breaker
        breaker.forget_provider(entry.provider_id)
        for model, shape, until in record.cooldowns:
            key: Any = (entry.provider_id, model, shape)
            breaker.impose(key, now + until - wall)

    def _cooldowns_held(self, record: wire.Record, now: float, wall: float) -> bool:
        """Does the breaker here still hold each of the record's live cooldowns?"""
        breaker = self._registry.breaker
        for model, shape, until in record.cooldowns:
            key: Any = (record.provider_id, model, shape)
            if until > wall and breaker.cooldown_until(key, now) is None:
                return False
        return True
