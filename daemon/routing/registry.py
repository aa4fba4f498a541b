"""The registry actor: every connected provider, its models, trust, load, speed and breaker.

Each identity has at most one live entry, the one routing sees. A connection claiming an
identity that already has one waits as a candidate, unroutable and unseen, until its first
challenge passes and `promote` makes it the live entry (PROTOCOL.md §4): merely knowing a
provider's public identity key must never be enough to take its place.

State changes only in the plain `def` methods below: with no await inside, each runs to the
end before any other task can look, so under Trio each is atomic and no lock is needed. No
sequence of them has to await in between either: a session joins, is promoted over another
or leaves in one call, and a slot is chosen and taken in one. A change that needed an await
in the middle would take a `trio.Lock` then; none does. Every change that could make a
waiting request routable bumps `generation`, an AsyncValue the admission queue parks on.

Speed is observed here: each first token's time goes into the provider's window and the
fleet's for the request's (model, prompt band) (`record_ttft`), each completion's decode speed
into the provider's EWMA for the model. Selection (`selection.py`) reads the medians, hedging
the high percentiles.

An operator may drain a live entry (`set_held`): the eligibility predicate then refuses it,
so no new request routes there, while those in flight finish; a reconnect is a new entry and
routable again. The registry also holds the daemon's `Metrics`: it is the one object every
layer that counts an event already has, and it says which models are advertised.

In a cluster (daemon/cluster) the registry also holds remote entries, providers whose socket
another instance holds (`owner` set): routing sees them through the same predicate. Only
their owner strikes or bans them: what happens to them here goes to `remote_report`, and
their successes to `remote_success` (so their strikes reset as a local provider's do).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

import trio
from nacl.public import PublicKey
from trio_util import AsyncValue

from daemon.metrics import Metrics
from daemon.routing.breaker import CircuitBreaker, Shape
from daemon.routing.eligibility import AWAITING_ATTESTATION, Gates, refusal, too_short
from daemon.routing.latency import LatencyKey, TtftWindow
from daemon.routing.selection import Selector
from daemon.routing.types import Lease, ProviderEntry, RequestTraits
from protocol.messages import ModelInfo

# A model that had a provider this recently queues instead of failing as unknown: providers
# reconnect after restarts and network blips.
MODEL_MEMORY_S: Final = 600.0
# The most model ids remembered so: a provider cycling `models_update` through fresh ids must
# not grow the daemon's memory without end. Past it the longest-unseen id is forgotten first.
MAX_REMEMBERED_MODELS: Final = 16_384
# Three consecutive failed challenges make a provider untrusted (PROTOCOL.md §4).
CHALLENGE_FAILURES_TO_UNTRUST: Final = 3
EWMA_WEIGHT: Final = 0.3
# First-token samples kept per (provider, model, band) and per (model, band) for the fleet:
# a 99.5th percentile needs 200 (hedging.learned), and each window costs a few KB.
PROVIDER_WINDOW: Final = 256
FLEET_WINDOW: Final = 1024
# A model name quoted in a refusal is cut to this many characters: it is consumer input.
MAX_SHOWN_MODEL_CHARS: Final = 80


# What the ingress tells a remote provider's owner: (entry, model, shape, status) for a strike,
# or (entry, "", "", 0) with the reason as the model for a ban. See daemon/cluster.
RemoteReport = Callable[[ProviderEntry, str, Shape, int, str | None], None]
# A request of (model, shape) completed on a remote entry: its owner resets the key's strikes.
RemoteSuccess = Callable[[ProviderEntry, str, Shape], None]


@dataclass(frozen=True)
class Preflight:
    """What can happen to a request right now, without waiting."""

    verdict: Literal["ready", "queue", "unavailable", "unknown_model", "too_long"]
    reason: str = ""


class Registry:
    def __init__(
        self, gates: Gates, *, seed: int | None = None, metrics: Metrics | None = None
    ) -> None:
        self.gates = gates
        self.metrics = metrics or Metrics()
        self.metrics.watch_models(self.serves)
        self.generation = AsyncValue(0)
        # Moves with `generation` on every change but a slot's release: what a cluster's
        # publisher watches (daemon/cluster/directory.py: a record carries no load).
        self.changes = 0
        self._providers: dict[str, ProviderEntry] = {}
        self._candidates: set[ProviderEntry] = set()
        self._model_seen: dict[str, float] = {}
        self._selector = Selector(seed)
        self.ttft: dict[LatencyKey, TtftWindow] = {}  # the fleet's, per (model, prompt band)
        self.remote_report: RemoteReport | None = None  # set by the cluster, when there is one
        self.remote_success: RemoteSuccess | None = None  # the same

    @property
    def breaker(self) -> CircuitBreaker:
        return self.gates.breaker

    def providers(self) -> list[ProviderEntry]:
        """The live entries, one per identity: what routing and the admin view see."""
        return list(self._providers.values())

    def connected(self) -> list[ProviderEntry]:
        """Every session's entry on this instance, live or a candidate: whom a shutdown or a
        revocation reaches (a remote entry is its owner's to close)."""
        local = [e for e in self._providers.values() if e.owner is None]
        return [*local, *self._candidates]

    def holder_of(self, public_key: PublicKey) -> ProviderEntry | None:
        """The connected entry registered with this box key, if any."""
        raw = bytes(public_key)
        return next((e for e in self.connected() if bytes(e.public_key) == raw), None)

    def busy(self) -> bool:
        """Is any request holding a slot?"""
        return any(entry.in_flight for entry in self._providers.values())

    def get(self, provider_id: str) -> ProviderEntry | None:
        return self._providers.get(provider_id)

    def serves(self, model: str) -> bool:
        """Does a live provider advertise `model`?"""
        return any(model in entry.models for entry in self._providers.values())

    # Membership -----------------------------------------------------------------------------

    def add(self, entry: ProviderEntry) -> bool:
        """A new session's entry: live at once (True) unless its identity already has a live
        entry, which it leaves alone; then it is a candidate (False) until `promote`."""
        if entry.provider_id in self._providers:
            self._candidates.add(entry)
            return False
        self._install(entry)
        return True

    def promote(self, entry: ProviderEntry) -> ProviderEntry | None:
        """A candidate proved its identity: it becomes the live entry. Returns the one it
        replaces, whose session the caller closes; None if there was none (or `entry` is
        not a candidate, when nothing changes)."""
        if entry not in self._candidates:
            return None
        self._candidates.remove(entry)
        old = self._providers.get(entry.provider_id)
        self._install(entry)
        return old

    def _install(self, entry: ProviderEntry) -> None:
        self._providers[entry.provider_id] = entry
        self.breaker.forget_provider(entry.provider_id)
        self._remember_models(entry.models)
        self._bump()

    def add_remote(self, entry: ProviderEntry) -> bool:
        """A provider another instance holds: live here unless this identity has an entry."""
        if entry.provider_id in self._providers:
            return False
        self._install(entry)
        return True

    def touch(self) -> None:
        """Something about a remote entry changed in place (trust, load, cooldowns)."""
        self._bump()

    def remove(self, entry: ProviderEntry) -> None:
        """Forget `entry` (a candidate, or live unless a newer session replaced it)."""
        self._candidates.discard(entry)
        if self.is_current(entry):
            del self._providers[entry.provider_id]
            self._remember_models(entry.models)
            self._bump()

    def update_models(self, entry: ProviderEntry, models: Iterable[ModelInfo]) -> None:
        current = self.is_current(entry)
        if current:  # a candidate's models are nobody's to remember yet
            self._remember_models(entry.models)
        entry.models = {info.id: info for info in models}
        if current:
            self._remember_models(entry.models)
            self._bump()

    def _remember_models(self, models: Iterable[str]) -> None:
        """Note when each model was last served. The dict stays in order of that time (an id
        seen again moves to the end), so what has expired, or is past the bound, is at the
        front."""
        now = trio.current_time()
        seen = self._model_seen
        for model in models:
            seen.pop(model, None)
            seen[model] = now
        while seen:
            oldest = next(iter(seen))
            if len(seen) <= MAX_REMEMBERED_MODELS and now - seen[oldest] < MODEL_MEMORY_S:
                break
            del seen[oldest]

    def is_current(self, entry: ProviderEntry) -> bool:
        return self._providers.get(entry.provider_id) is entry

    # Trust ----------------------------------------------------------------------------------

    def challenge_passed(self, entry: ProviderEntry) -> None:
        entry.challenge_failures = 0
        entry.last_challenge_pass = trio.current_time()
        entry.last_challenge_at = time.time()
        entry.trusted = entry.banned_reason is None
        self._bump()

    def challenge_failed(self, entry: ProviderEntry) -> bool:
        """Count a failed challenge; True when it made the provider untrusted."""
        entry.challenge_failures += 1
        entry.last_challenge_at = time.time()
        self._bump()  # a waiter counting on this provider's first pass may be hopeless now
        if entry.challenge_failures >= CHALLENGE_FAILURES_TO_UNTRUST and entry.trusted:
            entry.trusted = False
            return True
        return False

    def ban(self, entry: ProviderEntry, reason: str) -> None:
        """Never route to this session again (it broke the protocol's crypto contract)."""
        if entry.owner is not None and self.remote_report is not None:
            self.remote_report(entry, "", "base", 0, reason)  # its owner bans it everywhere
        entry.banned_reason = reason
        entry.trusted = False
        self._bump()

    def set_draining(self, entry: ProviderEntry, draining: bool) -> None:
        if entry.draining != draining:
            entry.draining = draining
            self._bump()

    def set_held(self, entry: ProviderEntry, held: bool) -> None:
        """An operator's drain (held) or undrain of a live entry; requests in flight go on."""
        if entry.held != held:
            entry.held = held
            self._bump()  # an undrain may make queued requests routable; a drain hopeless

    def clear_cooldowns(self, entry: ProviderEntry) -> None:
        """An operator's reset of every breaker key of `entry`'s provider: it serves at once."""
        self.breaker.forget_provider(entry.provider_id)
        self._bump()

    # Routing --------------------------------------------------------------------------------

    def refusal(self, entry: ProviderEntry, traits: RequestTraits) -> str | None:
        return refusal(entry, traits, self.gates, trio.current_time())

    def preflight(self, traits: RequestTraits) -> Preflight:
        """Ready, queue, unavailable (with the reason) or unknown model: never waits."""
        now = trio.current_time()
        serving = [e for e in self._providers.values() if traits.model in e.models]
        if not serving:
            return self._preflight_unserved(traits.model, now)
        if all(too_short(e.models[traits.model], traits) for e in serving):
            return Preflight("too_long", _too_long(traits, serving))
        refusals = {e.provider_id: refusal(e, traits, self.gates, now) for e in serving}
        capable = [e for e in serving if refusals[e.provider_id] is None]
        if any(e.has_free_slot for e in capable):
            return Preflight("ready")
        if capable:
            return Preflight("queue", f"every provider of model {shown(traits.model)} is busy")
        if AWAITING_ATTESTATION in refusals.values():
            return Preflight(
                "queue", f"the providers of model {shown(traits.model)} are connecting"
            )
        return Preflight("unavailable", _explain(traits.model, refusals.values()))

    def _preflight_unserved(self, model: str, now: float) -> Preflight:
        seen = self._model_seen.get(model)
        if seen is not None and now - seen < MODEL_MEMORY_S:
            return Preflight("queue", f"no provider of model {shown(model)} is connected right now")
        return Preflight("unknown_model", f"the model {shown(model)} does not exist")

    def reserve(
        self,
        traits: RequestTraits,
        *,
        exclude: frozenset[str] = frozenset(),
        avoid_version: str | None = None,
        explore: bool = False,
    ) -> Lease | None:
        """Choose the provider expected to finish first and take a slot on it, atomically.

        `explore`: a request's first choice, which may re-measure a stale provider; backups
        and retries want the fastest.
        """
        now = trio.current_time()
        candidates = [
            e
            for e in self._providers.values()
            if e.provider_id not in exclude
            and e.has_free_slot
            and refusal(e, traits, self.gates, now) is None
        ]
        if avoid_version is not None:
            other = [e for e in candidates if e.version != avoid_version]
            candidates = other or candidates
        if not candidates:
            return None
        entry = self._selector.pick(candidates, traits, now, explore=explore)
        entry.in_flight += 1
        by_model = entry.in_flight_by_model
        by_model[traits.model] = by_model.get(traits.model, 0) + 1
        return Lease(entry, traits.model)

    def slots(self, traits: RequestTraits) -> tuple[int, int]:
        """(free, all) slots of the providers that could serve `traits` now."""
        now = trio.current_time()
        capable = [
            e for e in self._providers.values() if refusal(e, traits, self.gates, now) is None
        ]
        free = sum(max(0, e.max_concurrency - e.in_flight) for e in capable)
        return free, sum(e.max_concurrency for e in capable)

    def take(self, entry: ProviderEntry, model: str) -> Lease:
        """A slot on `entry` for a request another instance routed here (its owner's view)."""
        entry.in_flight += 1
        entry.in_flight_by_model[model] = entry.in_flight_by_model.get(model, 0) + 1
        return Lease(entry, model)

    def release(self, lease: Lease) -> None:
        if not lease.released:
            lease.released = True
            entry = lease.entry
            entry.in_flight -= 1
            left = entry.in_flight_by_model.pop(lease.model, 1) - 1
            if left:
                entry.in_flight_by_model[lease.model] = left
            self._bump(load=True)

    # Outcomes -------------------------------------------------------------------------------

    def record_ttft(self, entry: ProviderEntry, traits: RequestTraits, seconds: float) -> None:
        """A first-token time on `entry`, from its own dispatch (or a lower bound of one)."""
        now = trio.current_time()
        key = traits.latency_key
        entry.ttft.setdefault(key, TtftWindow(PROVIDER_WINDOW)).add(seconds, now)
        self.ttft.setdefault(key, TtftWindow(FLEET_WINDOW)).add(seconds, now)

    def record_success(
        self, entry: ProviderEntry, model: str, shape: Shape, *, decode_tps: float | None
    ) -> None:
        if entry.owner is None:
            self.breaker.record_success((entry.provider_id, model, shape), trio.current_time())
        elif self.remote_success is not None and self.is_current(entry):
            self.remote_success(entry, model, shape)  # a remote provider's breaker is its owner's
        if decode_tps is not None:
            entry.decode_tps[model] = _ewma(entry.decode_tps.get(model), decode_tps)

    def record_failure(self, entry: ProviderEntry, model: str, shape: Shape, status: int) -> bool:
        """A failed attempt; True when it put (provider, model, shape) into cooldown.

        A session that is no longer the provider's (superseded by a reconnect, or gone) is
        not struck: its streams fail because it ended, and the strike would land on the
        identity's new session, whose breaker starts clean.
        """
        if not self.is_current(entry):
            return False
        if entry.owner is not None:  # only its owner strikes it: tell the owner
            if self.remote_report is not None:
                self.remote_report(entry, model, shape, status, None)
            return False
        opened = self.breaker.record_failure(
            (entry.provider_id, model, shape), status, trio.current_time()
        )
        if opened:
            self.metrics.cooldown_entered(shape)
            self._bump()  # the cooldown timer must learn the new expiry; waiters may be hopeless
        return opened

    def cooldown_expired(self) -> None:
        """Called by the supervisor when a cooldown ends: queued requests may route again."""
        self.breaker.sweep(trio.current_time())
        self._bump()

    def _bump(self, *, load: bool = False) -> None:
        if not load:
            self.changes += 1
        self.generation.value += 1


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + EWMA_WEIGHT * (sample - old)


def _too_long(traits: RequestTraits, serving: Iterable[ProviderEntry]) -> str:
    longest = max(e.models[traits.model].context_length or 0 for e in serving)
    return (
        f"this request needs about {traits.context_tokens} tokens (the prompt, estimated, plus "
        f"max_tokens), more than the largest context of {shown(traits.model)}: {longest} tokens"
    )


def shown(model: str) -> str:
    """A model name as quoted in a message: cut short, since it is the consumer's input."""
    text = (
        model if len(model) <= MAX_SHOWN_MODEL_CHARS else model[: MAX_SHOWN_MODEL_CHARS - 1] + "…"
    )
    return f'"{text}"'


def _explain(model: str, refusals: Iterable[str | None]) -> str:
    counts = Counter(reason for reason in refusals if reason is not None)
    if len(counts) == 1:
        (reason,) = counts
        return f"every provider of model {shown(model)} is {reason}"
    parts = "; ".join(f"{_count(n)} {reason}" for reason, n in counts.most_common())
    return f"no provider of model {shown(model)} can serve this request: {parts}"


def _count(n: int) -> str:
    return "1 provider is" if n == 1 else f"{n} providers are"
