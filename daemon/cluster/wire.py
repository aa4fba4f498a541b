"""What daemons of one cluster say to each other: link messages, instance keys, records.

Messages (`Kind`, each with a request id and data) travel over the direct links between
instances (`peerlink.py` frames them). None of it is on the provider wire (PROTOCOL.md is
unchanged): a provider never learns that the request came from another daemon. A request
body travels sealed to the provider's key, a provider frame travels as the provider sent it,
byte for byte (chunks sealed to the ingress's ephemeral key), so an owner relaying them never
holds plaintext.

An instance's key (`instance_key`, an `Instance`) says it is alive and how to reach its link.
A directory record is one provider as its owner advertises it, under `directory_key` with a
TTL that its owner keeps refreshing; `DIRECTORY_STREAM` announces each change.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec

from protocol.messages import EncryptedPayload, ModelInfo

PREFIX: Final = "dinfer:"
DIRECTORY_STREAM: Final = PREFIX + "directory"
# Approximate stream bound (XADD MAXLEN ~): nobody reads far behind.
DIRECTORY_MAXLEN: Final = 10_000


class Kind(enum.StrEnum):
    DISPATCH = "dispatch"  # ingress -> owner: start a request (d: Dispatch)
    FRAME = "frame"  # owner -> ingress: one provider frame for request r (d: the frame)
    GONE = "gone"  # owner -> ingress: request r has no provider any more (session ended)
    CANCEL = "cancel"  # ingress -> owner: stop request r (a lost race, a hang-up)
    PING = "ping"  # ingress -> owner: are you there? (silence while a request runs)
    PONG = "pong"  # owner -> ingress
    STRIKE = "strike"  # ingress -> owner: a failure only the ingress saw (d: Report)
    BAN = "ban"  # ingress -> owner: the provider broke the crypto contract (d: Report)
    KICK = "kick"  # ingress -> owner: a newer session of this identity proved itself
    SUCCESS = "success"  # ingress -> owner: breaker keys that succeeded (d: successes.py)
    QUEUE = "queue"  # any -> any: the sender's admission queue depths (d: queues.py)
    ADMIN = "admin"  # any -> owner: an operator's order (d: remote_admin.AdminOrder)
    ADMIN_DONE = "admin_done"  # owner -> asker: its answer to order r (d: AdminAnswer)


class Instance(msgspec.Struct, frozen=True):
    """An instance's key: where its link listens and the secret it proves itself with (new
    at each start: whoever can read Redis is a member of the cluster, and may dial it)."""

    address: str  # host:port, IPv6 hosts in brackets
    token: str  # hex; never logged
    at: float  # wall clock of the last heartbeat


class Dispatch(msgspec.Struct, frozen=True):
    provider_id: str
    epoch: int
    model: str
    body: EncryptedPayload


class Report(msgspec.Struct, frozen=True):
    provider_id: str
    model: str
    shape: str
    status: int
    reason: str | None = None


class Record(msgspec.Struct, frozen=True):
    """One provider in the directory, as its owner sees it now."""

    provider_id: str
    owner: str
    epoch: int
    version: str
    backend: str
    public_key: str
    identity_key: str
    models: list[ModelInfo]
    max_concurrency: int
    # Wall clock (the instances' clocks are assumed in sync, as NTP keeps them): when its last
    # challenge passed (None: never), when each cooldown ends.
    attested_at: float | None
    trusted: bool
    draining: bool
    held: bool
    banned: bool
    prefill_tps: float | None
    decode_tps: float | None
    cooldowns: list[tuple[str, str, float]]  # (model, shape, until)
    # Negotiated extensions the ingress must know to read the frames (protocol-extensions.md).
    multi_sse: bool = False
    # Always 0: a record carries no load (daemon/cluster/directory.py). Still sent, since an
    # instance of an earlier version requires the field.
    in_flight: int = 0


def instance_key(instance: str) -> str:
    return f"{PREFIX}instance:{instance}"


def directory_key(provider_id: str, owner: str) -> str:
    return f"{PREFIX}dir:{provider_id}:{owner}"


def cooldown_key(provider_id: str) -> str:
    """A hash of `model|shape` -> wall-clock end of its cooldown: outlives the session."""
    return f"{PREFIX}cool:{provider_id}"


DIRECTORY_MATCH: Final = PREFIX + "dir:*"
BUDGET_MATCH: Final = PREFIX + "budget:*"


def budget_key(instance: str) -> str:
    """`dispatches backups` in the instance's hedging window (daemon/nursery/budget.py)."""
    return f"{PREFIX}budget:{instance}"


_dispatch = msgspec.json.Decoder(Dispatch)
_report = msgspec.json.Decoder(Report)
_record = msgspec.json.Decoder(Record)
_instance = msgspec.json.Decoder(Instance)
encode = msgspec.json.encode


def decode_dispatch(data: bytes) -> Dispatch:
    return _dispatch.decode(data)


def decode_report(data: bytes) -> Report:
    return _report.decode(data)


def decode_record(data: bytes) -> Record:
    return _record.decode(data)


def decode_instance(data: bytes) -> Instance:
    return _instance.decode(data)
