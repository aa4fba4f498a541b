"""When a race may start a backup racer: the hedge point, the budget, overload, the counters.

The hedge point (Dean and Barroso, "The Tail at Scale"): a backup starts once the primary has
gone without content past the `percentile` of recent first-token times for the request's
(model, prompt band): the primary provider's own when it has enough samples, else the
fleet's; clamped between `floor_s` and the deadline-ratio point (`ttft * speculative_ratio`),
which is also the point while too few samples exist. Mode `fixed` always uses the ratio point
(the rule before hedging learned), `off` never hedges.

Two guards on the percentile:
- Losers are measured too. A primary cancelled because its backup won is recorded at the time
  it lost, a lower bound of its first-token time (`race.py`): leaving it out would keep only
  the winners, the point learned from them would creep down, and the budget would go to
  primaries about to answer.
- A cliff. First-token times are often a fast body plus rare stragglers; when the stragglers
  are about as common as the percentile's tail, the percentile flips between the edge of the
  body and the stragglers. The point is therefore at most `CLIFF_FACTOR` times the percentile
  with twice the tail (p90 for p95): just past the body. A smooth distribution seldom meets
  this bound: a log-normal's p95 stays under 1.5 times its p90 up to a sigma of 1.1.

At the hedge point, in this order: no backup under overload (a request waits in the model's
queue, or under a quarter of the capable slots are free: hedging must never turn a slow fleet
into a saturated one); none beyond the budget (`budget.py`); none without a free provider.
`HedgeCounters` counts each outcome, and the backups that won.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Final, Literal, assert_never

import trio

from daemon.config import HedgeMode, Settings
from daemon.nursery.budget import HedgeBudget
from daemon.routing.admission import AdmissionQueue
from daemon.routing.latency import LatencyKey, TtftWindow
from daemon.routing.registry import Registry
from daemon.routing.types import Lease, ProviderEntry, RequestTraits

CLIFF_FACTOR: Final = 1.5
# Below this share of free capable slots, the fleet is close to saturation: no backups.
OVERLOAD_FREE_SHARE: Final = 0.25
# Fewest samples for a learned point: 20, and at least one beyond the percentile (100 at p99).
MIN_SAMPLES: Final = 20


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    mode: HedgeMode
    percentile: float
    floor_s: float
    budget: float
    window_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> HedgePolicy:
        return cls(
            settings.hedge_mode,
            settings.hedge_percentile,
            settings.hedge_min_ms / 1000,
            settings.hedge_budget,
            settings.hedge_window_s,
        )


Source = Literal["provider", "fleet", "ratio"]


@dataclass(frozen=True, slots=True)
class HedgePoint:
    """When a backup may start, in seconds after its primary; and what it was learned from."""

    delay: float
    source: Source


def learned(window: TtftWindow | None, percentile: float, now: float) -> float | None:
    """The percentile of `window`, bounded at a cliff; None with too few samples."""
    needed = max(MIN_SAMPLES, math.ceil(100 / (100 - percentile)))
    if window is None or window.count(now) < needed:
        return None
    point = window.quantile(percentile / 100, now)
    body = window.quantile(max(0.0, 2 * percentile - 100) / 100, now)
    assert point is not None and body is not None
    return min(point, CLIFF_FACTOR * body)


# What happens at the hedge point -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backup:
    lease: Lease


@dataclass(frozen=True, slots=True)
class Overloaded:
    reason: str


@dataclass(frozen=True, slots=True)
class OverBudget:
    pass


@dataclass(frozen=True, slots=True)
class NoProvider:
    pass


HedgeDecision = Backup | Overloaded | OverBudget | NoProvider


@dataclass
class HedgeCounters:
    """Since start-up; plain integers, for the admin view now and a metrics exporter later."""

    started: int = 0
    won: int = 0
    skipped_overload: int = 0
    skipped_budget: int = 0
    skipped_no_provider: int = 0

    def snapshot(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Hedger:
    """The daemon's one hedging state: policy, budget and counters; races consult it."""

    def __init__(self, policy: HedgePolicy, registry: Registry, queue: AdmissionQueue) -> None:
        self.policy = policy
        self.budget = HedgeBudget(policy.budget, policy.window_s)
        self.counters = HedgeCounters()
        self._registry = registry
        self._queue = queue

    def retune(self, policy: HedgePolicy) -> None:
        """Reloaded settings: the new policy from now on; a new window starts a new budget."""
        if (policy.budget, policy.window_s) != (self.policy.budget, self.policy.window_s):
            self.budget = HedgeBudget(policy.budget, policy.window_s)
        self.policy = policy

    def point(
        self, key: LatencyKey, ratio: float, primary: ProviderEntry | None = None
    ) -> HedgePoint | None:
        """When a primary gets a backup; None: never.

        `key`: the request's (model, prompt band); `ratio`: its deadline-ratio point; without
        a `primary`, the fleet's point (what the admin view shows).
        """
        match self.policy.mode:
            case "off":
                return None
            case "fixed":
                return HedgePoint(ratio, "ratio")
            case "learned":
                return self._learned(key, ratio, primary)
            case mode:
                assert_never(mode)

    def _learned(self, key: LatencyKey, ratio: float, primary: ProviderEntry | None) -> HedgePoint:
        now = trio.current_time()
        own = primary.ttft.get(key) if primary is not None else None
        sources: tuple[tuple[Source, TtftWindow | None], ...] = (
            ("provider", own),
            ("fleet", self._registry.ttft.get(key)),
        )
        for source, window in sources:
            seconds = learned(window, self.policy.percentile, now)
            if seconds is not None:
                return HedgePoint(self._clamp(seconds, ratio), source)
        return HedgePoint(ratio, "ratio")

    def _clamp(self, seconds: float, ratio: float) -> float:
        return min(max(seconds, self.policy.floor_s), ratio)

    def budget_totals(self) -> tuple[int, int]:
        """This instance's budget window, for the cluster's other instances."""
        return self.budget.totals(trio.current_time())

    def budget_elsewhere(self, dispatches: int, backups: int) -> None:
        """The cluster's other instances' budget windows: the budget is shared."""
        self.budget.elsewhere = (dispatches, backups)

    def dispatched(self) -> None:
        """A race started its primary: the budget grows."""
        self.budget.deposit(trio.current_time())

    def decide(self, traits: RequestTraits, exclude: frozenset[str]) -> HedgeDecision:
        """At the hedge point: a backup's lease, or why there is none (each one counted)."""
        now = trio.current_time()
        reason = self._overload(traits)
        if reason is not None:
            self.counters.skipped_overload += 1
            return Overloaded(reason)
        if not self.budget.allows(now):
            self.counters.skipped_budget += 1
            return OverBudget()
        lease = self._registry.reserve(traits, exclude=exclude)
        if lease is None:
            self.counters.skipped_no_provider += 1
            return NoProvider()
        self.budget.spend(now)
        self.counters.started += 1
        return Backup(lease)

    def backup_won(self) -> None:
        self.counters.won += 1

    def _overload(self, traits: RequestTraits) -> str | None:
        if self._queue.waiting(traits.model):
            return "requests are waiting in the queue for this model"
        free, total = self._registry.slots(traits)
        if free < total * OVERLOAD_FREE_SHARE:
            return f"only {free} of {total} capable slots are free"
        return None
