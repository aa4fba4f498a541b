"""Which capable provider gets a request: expected speed, load, near ties, exploration.

A provider's cost is the time it is expected to take: its first-token time plus the decode
time of `max_tokens`, stretched by the share of its slots already taken. Observed figures for
the request's (model, prompt band) replace the advertised ones as soon as one exists: the
median of its recent first-token times (a straggler moves a median far less than a mean) and
the EWMA of its decode speed for the model.

Costs within `NEAR_TIE` of the best are a tie broken at random, which spreads load across
equal providers. In a cluster, a request goes to a provider connected to this instance
whenever one can serve it and has a free slot (no hop through Redis); remote providers are
chosen among only when none can. Speed and load cannot be compared across instances: a local
entry counts every request on its provider (relayed ones too) and is measured without a hop,
a remote entry counts only this instance's requests and its first-token times include the
hop and both daemons' queues.

A provider judged slow would never be measured again, so every `EXPLORE_EVERY`-th first
choice goes to the candidate measured longest ago (a local one, when a local one can serve),
if that was over `EXPLORE_AFTER_S` ago: a provider that was slow once gets another chance to
show it recovered, about once per `EXPLORE_AFTER_S` at most, since that sample makes it fresh
again. A provider
never measured is judged by what it advertised, and measured once it is chosen, as a backup
or a retry if not first.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Final

from daemon.routing.types import ProviderEntry, RequestTraits

# Costs within this fraction of the best are a near tie, broken at random to spread load.
NEAR_TIE: Final = 0.10
# Speeds assumed for a provider that advertised none and has not been observed yet.
DEFAULT_PREFILL_TPS: Final = 500.0
DEFAULT_DECODE_TPS: Final = 20.0
# One first choice in this many explores (5%), when a candidate is stale.
EXPLORE_EVERY: Final = 20
EXPLORE_AFTER_S: Final = 10.0


def expected_seconds(entry: ProviderEntry, traits: RequestTraits, now: float) -> float:
    """Expected completion time: first token + decode, stretched by the provider's load."""
    alone = _first_token_s(entry, traits, now) + traits.max_tokens / _decode_tps(entry, traits)
    return alone * (1 + entry.in_flight / entry.max_concurrency)


def _first_token_s(entry: ProviderEntry, traits: RequestTraits, now: float) -> float:
    window = entry.ttft.get(traits.latency_key)
    observed = window.quantile(0.5, now) if window is not None else None
    if observed is not None:
        return observed
    return traits.prompt_tokens / (entry.advertised_prefill_tps or DEFAULT_PREFILL_TPS)


def _decode_tps(entry: ProviderEntry, traits: RequestTraits) -> float:
    observed = entry.decode_tps.get(traits.model)
    return observed or entry.advertised_decode_tps or DEFAULT_DECODE_TPS


def _measured_at(entry: ProviderEntry, traits: RequestTraits) -> float:
    """When `entry` was last measured for this request's kind; infinity: never."""
    window = entry.ttft.get(traits.latency_key)
    newest = window.newest_at if window is not None else None
    return math.inf if newest is None else newest


class Selector:
    """The choice among candidates; owns the tie-break randomness and the exploration turn."""

    def __init__(self, seed: int | None) -> None:
        self._rng = random.Random(seed)
        self._first_choices = 0

    def pick(
        self,
        candidates: Sequence[ProviderEntry],
        traits: RequestTraits,
        now: float,
        *,
        explore: bool,
    ) -> ProviderEntry:
        candidates = _local_first(candidates)  # exploring too: a remote one is not re-measured
        if explore and len(candidates) > 1:
            self._first_choices += 1
            if self._first_choices % EXPLORE_EVERY == 0:
                stale = self._stalest(candidates, traits, now)
                if stale is not None:
                    return stale
        costs = [(expected_seconds(e, traits, now), e) for e in candidates]
        best = min(cost for cost, _ in costs)
        near = [e for cost, e in costs if cost <= best * (1 + NEAR_TIE)]
        return near[0] if len(near) == 1 else self._rng.choice(near)

    def _stalest(
        self, candidates: Sequence[ProviderEntry], traits: RequestTraits, now: float
    ) -> ProviderEntry | None:
        stalest = min(candidates, key=lambda e: _measured_at(e, traits))
        return stalest if _measured_at(stalest, traits) <= now - EXPLORE_AFTER_S else None


def _local_first(candidates: Sequence[ProviderEntry]) -> Sequence[ProviderEntry]:
    """In a cluster: the local candidates, if there are any."""
    return [e for e in candidates if e.owner is None] or candidates
