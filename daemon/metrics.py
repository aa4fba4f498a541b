"""The daemon's Prometheus metrics: every metric object, its labels, and how label values stay
bounded.

One `Metrics` per daemon, each with its own `CollectorRegistry` (never the process's global
one), so a test process can run several daemons. Events are counted where they happen, at
cached label children, once per request or attempt, never per relayed chunk. What is state
rather than an event (providers connected, in flight per provider, queue depth, backups, whose
counters the hedger keeps anyway) is read at scrape time from a `Sampled` snapshot the
supervisor's sampler returns: nothing on the hot path, and a provider's series vanish with it.

Label values are bounded by construction. Routes, outcomes, statuses, results, reasons, shapes
and token kinds are small closed sets. A model is labelled by its name only when a connected
provider advertises it, and at most `MAX_MODEL_LABELS` names ever get a label; any other model
(a consumer's random name, the names past the cap) is `other`. Provider ids and versions come
only from connected providers, and vanish when they leave. No request id is ever a label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The most distinct model names that ever get a label of their own; the rest are `other`.
MAX_MODEL_LABELS: Final = 64
OTHER: Final = "other"
# A provider's version as a label is cut to this many characters (it is the node's input).
MAX_VERSION_CHARS: Final = 32
# No `_created` series: a second sample per series that graphs never use. (The switch is the
# library's, process-wide; nothing else in the daemon's process exposes metrics.)
disable_created_metrics()

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
DURATION_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS: Final = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class ProviderSample:
    """One live provider at scrape time."""

    provider_id: str
    version: str
    trusted: bool
    in_flight: int


@dataclass(frozen=True, slots=True)
class Sampled:
    """The daemon's state at scrape time, as the supervisor's sampler reads it."""

    providers: list[ProviderSample] = field(default_factory=list)
    queued: dict[str, int] = field(default_factory=dict)  # waiting requests per model
    backups_started: int = 0
    backups_won: int = 0


Sampler = Callable[[], Sampled]


@dataclass(slots=True)
class _RequestSeries:
    """The cached children one (route, model, outcome, status) request lands on."""

    count: Any
    ttft: Any
    duration: Any
    prompt: Any
    completion: Any
    reasoning: Any


class Metrics:
    """Every metric of one daemon, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "dinfer_requests",
            "Consumer requests answered, by route, model, outcome and HTTP status",
            ["route", "model", "outcome", "status"],
            registry=r,
        )
        self._ttft = Histogram(
            "dinfer_ttft_seconds",
            "Time from admission to the first content chunk, per model",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self._duration = Histogram(
            "dinfer_request_duration_seconds",
            "Time from admission to the end of the answer, per model",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._tokens = Counter(
            "dinfer_tokens",
            "Tokens the providers reported, by model and kind (prompt, completion, reasoning)",
            ["model", "kind"],
            registry=r,
        )
        self._attempts = Counter(
            "dinfer_dispatch_attempts",
            "Dispatch attempts by result: success, retry (failed before content, another "
            "attempt followed), timeout or failure (the last attempt failed)",
            ["result"],
            registry=r,
        )
        self._in_band = Counter(
            "dinfer_in_band_errors",
            "Committed answers that ended in an in-band error, by reason",
            ["reason"],
            registry=r,
        )
        self._cooldowns = Counter(
            "dinfer_breaker_cooldowns",
            "Breaker cooldowns entered by a (provider, model, shape), by shape",
            ["shape"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "dinfer_queue_wait_seconds",
            "Time a request waited for a provider's slot (0 when one was free at once)",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.chunks = Counter(
            "dinfer_relayed_chunks", "Chunks relayed to consumers after the commit", registry=r
        )
        self._series: dict[tuple[str, str, str, int], _RequestSeries] = {}
        self._children: dict[tuple[Counter, str], Any] = {}
        self._models: set[str] = set()
        self._advertised: Callable[[str], bool] = lambda _model: False

    # Wiring --------------------------------------------------------------------------------

    def watch_models(self, advertised: Callable[[str], bool]) -> None:
        """Who says whether a model is advertised by a connected provider (the registry)."""
        self._advertised = advertised

    def watch(self, sampler: Sampler) -> None:
        """Read the daemon's state through `sampler` at each scrape."""
        self.registry.register(_StateCollector(sampler, self.model_label))

    def render(self) -> bytes:
        """The exposition text of every metric, for `GET /metrics`."""
        return generate_latest(self.registry)

    # Label values --------------------------------------------------------------------------

    def model_label(self, model: str) -> str:
        """`model` when a provider advertises it (and the cap allows), else `other`."""
        if model in self._models:
            return model
        if len(self._models) < MAX_MODEL_LABELS and self._advertised(model):
            self._models.add(model)
            return model
        return OTHER

    # Events --------------------------------------------------------------------------------

    def observe_request(
        self,
        route: str,
        model: str,
        outcome: str,
        status: int,
        ttft_s: float | None,
        duration_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        reasoning_tokens: int,
    ) -> None:
        """One consumer request's end: counted once, with its timings and tokens."""
        series = self._request_series(route, self.model_label(model), outcome, status)
        series.count.inc()
        if ttft_s is not None:
            series.ttft.observe(ttft_s)
        series.duration.observe(duration_s)
        if prompt_tokens:
            series.prompt.inc(prompt_tokens)
        if completion_tokens:
            series.completion.inc(completion_tokens)
        if reasoning_tokens:
            series.reasoning.inc(reasoning_tokens)

    def attempt(self, result: str) -> None:
        """A dispatch attempt ended: success, retry, timeout or failure."""
        self._child(self._attempts, result).inc()

    def in_band_error(self, reason: str) -> None:
        self._child(self._in_band, reason).inc()

    def cooldown_entered(self, shape: str) -> None:
        self._child(self._cooldowns, shape).inc()

    def _child(self, metric: Counter, value: str) -> Any:
        key = (metric, value)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(value)
        return child

    def _request_series(self, route: str, model: str, outcome: str, status: int) -> _RequestSeries:
        key = (route, model, outcome, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _RequestSeries(
                self._requests.labels(route, model, outcome, str(status)),
                self._ttft.labels(model),
                self._duration.labels(model),
                self._tokens.labels(model, "prompt"),
                self._tokens.labels(model, "completion"),
                self._tokens.labels(model, "reasoning"),
            )
        return series


class _StateCollector(Collector):
    """What is read at scrape time rather than counted: see `Sampled`."""

    def __init__(self, sampler: Sampler, model_label: Callable[[str], str]) -> None:
        self._sample = sampler
        self._model_label = model_label

    def describe(self) -> list[Metric]:
        return []  # unchecked: its series come and go with the providers

    def collect(self) -> list[Metric]:
        sampled = self._sample()
        connected = GaugeMetricFamily(
            "dinfer_providers_connected",
            "Live providers, by version and trust",
            labels=["version", "trusted"],
        )
        counts: dict[tuple[str, str], int] = {}
        in_flight = GaugeMetricFamily(
            "dinfer_provider_in_flight",
            "Requests holding a slot on each live provider",
            labels=["provider_id"],
        )
        for p in sampled.providers:
            key = (p.version[:MAX_VERSION_CHARS], "true" if p.trusted else "false")
            counts[key] = counts.get(key, 0) + 1
            in_flight.add_metric([p.provider_id], p.in_flight)
        for labels, n in sorted(counts.items()):
            connected.add_metric(list(labels), n)
        return [
            connected,
            in_flight,
            self._queue_depth(sampled.queued),
            CounterMetricFamily(
                "dinfer_backups_started",
                "Backup racers started at the hedge point",
                value=sampled.backups_started,
            ),
            CounterMetricFamily(
                "dinfer_backups_won",
                "Backup racers that won their race",
                value=sampled.backups_won,
            ),
        ]

    def _queue_depth(self, queued: dict[str, int]) -> GaugeMetricFamily:
        depth = GaugeMetricFamily(
            "dinfer_queue_depth",
            "Requests waiting for a provider's slot, per model",
            labels=["model"],
        )
        by_label: dict[str, int] = {}
        for model, n in queued.items():
            label = self._model_label(model)
            by_label[label] = by_label.get(label, 0) + n
        for label, n in sorted(by_label.items()):
            depth.add_metric([label], n)
        return depth
