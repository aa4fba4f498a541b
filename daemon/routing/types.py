"""The data types routing shares: a request's traits, a registry entry, a lease, a session.

Registry, eligibility, admission and dispatch all speak these, so they live here, below every
one of them: no two of those modules need to import each other. `ProviderLink` is the one
interface dispatch uses to talk to a provider session; the real `ProviderSession` and the
tests' `MemorySession` both satisfy it (mypy checks both).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import trio
from nacl.public import PublicKey
from nacl.signing import VerifyKey

from daemon.routing.breaker import Shape, shape_of
from daemon.routing.latency import LatencyKey, TtftWindow, band_of
from protocol.messages import EncryptedPayload, ModelInfo, ProviderMessage


class SessionGone(Exception):
    """The provider session ended before a frame could be sent."""


class ProviderLink(Protocol):
    """What dispatch needs of a live provider session. No method waits.

    `open_stream` gives the frames of one request id (closed after its terminal, or when the
    session ends); `start` sends the request (for `model`, which only a remote provider's
    owner needs to count its slot) (SessionGone when the session is over); `cancel`
    tells the provider to stop and forgets the stream; `finish` forgets a stream that ended on
    its own; `kick` ends the whole session with a close code; `fell_behind` says whether a
    stream was dropped because its reader could not keep up (the daemon's fault, not the
    provider's).
    """

    def open_stream(self, request_id: str) -> trio.MemoryReceiveChannel[ProviderMessage]: ...

    def start(self, request_id: str, body: EncryptedPayload, model: str = "") -> None: ...

    def cancel(self, request_id: str) -> None: ...

    def finish(self, request_id: str) -> None: ...

    def kick(self, code: int, reason: str) -> None: ...

    def fell_behind(self, request_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class RequestTraits:
    """What routing needs to know about a consumer request (never its content)."""

    model: str
    has_tools: bool = False
    has_media: bool = False
    prompt_tokens: int = 0
    max_tokens: int = 256
    # Estimated prompt plus the max_tokens the consumer asked for (0 when it asked none):
    # what must fit a model's advertised context_length.
    context_tokens: int = 0
    allowlist: frozenset[str] | None = None
    shape: Shape = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", shape_of(self.has_tools, self.has_media))

    @property
    def latency_key(self) -> LatencyKey:
        """Whose first-token times predict this request's: its model's, in its prompt band."""
        return (self.model, band_of(self.prompt_tokens))


@dataclass(eq=False)
class ProviderEntry:
    """One connected provider, as the registry sees it."""

    provider_id: str
    session: ProviderLink
    version: str
    backend: str
    public_key: PublicKey
    identity_key: VerifyKey
    models: dict[str, ModelInfo]
    max_concurrency: int
    advertised_prefill_tps: float | None = None
    advertised_decode_tps: float | None = None
    token_id: str | None = None
    in_flight: int = 0
    trusted: bool = False
    banned_reason: str | None = None
    challenge_failures: int = 0
    last_challenge_pass: float | None = None
    last_challenge_at: float | None = None  # wall clock, for the admin view
    draining: bool = False  # the node said it is draining (PROTOCOL.md)
    held: bool = False  # an operator drained it (admin API): no new requests until undrained
    in_flight_by_model: dict[str, int] = field(default_factory=dict)
    multi_sse: bool = False  # negotiated: a chunk frame may seal several SSE lines
    # Observed on this session: first-token times per (model, prompt band), decode speed per
    # model (an EWMA, tokens/s). They die with the session, as its load does.
    ttft: dict[LatencyKey, TtftWindow] = field(default_factory=dict)
    decode_tps: dict[str, float] = field(default_factory=dict)
    # In a cluster (daemon/cluster): the instance holding this provider's socket, None when
    # it is this one; when its session began (wall clock, ns: the newer epoch of one identity
    # wins across instances); why a remote provider cannot be reached now, if it cannot.
    owner: str | None = None
    epoch: int = field(default_factory=time.time_ns)
    unreachable: str | None = None

    @property
    def has_free_slot(self) -> bool:
        return self.in_flight < self.max_concurrency


@dataclass(eq=False)
class Lease:
    """A reserved slot on one provider's model; release it exactly once."""

    entry: ProviderEntry
    model: str
    released: bool = field(default=False)
