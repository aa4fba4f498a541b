"""Usage queries over the ledger: filters, groups, and the sums and percentiles per group.

`parse_query` reads the query parameters every front end shares (the admin and consumer routes
and `dinfer usage`): `since`/`until` as RFC 3339 or unix seconds, `key_id`, `model`, and
`group_by` one of `day`, `model`, `key`, `provider` (none: one group of everything). It raises
`ValueError` saying which parameter is wrong. `query_usage` is synchronous: it opens its own
short read connection, so the caller runs it in a worker thread (or, in the CLI, directly).
Rows still open (in flight) are not counted.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

GROUPS: Final = {
    "day": "strftime('%Y-%m-%d', started_at, 'unixepoch')",
    "model": "model",
    "key": "key_id",
    "provider": "provider_id",
}
OUTCOMES: Final = (
    "completed",
    "failed",
    "rejected",
    "in_band_error",
    "client_gone",
    "aborted",
    "orphaned",
)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    since: float | None = None
    until: float | None = None
    key_id: str | None = None
    model: str | None = None
    group_by: str | None = None


def parse_time(text: str) -> float:
    """Unix seconds, or an RFC 3339 timestamp (`Z` or an offset; naive means UTC)."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"not a finite time: {text!r}")
        return value
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not RFC 3339 or unix seconds: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_query(params: Mapping[str, str], *, allow_key_id: bool = True) -> UsageQuery:
    allowed = {"since", "until", "model", "group_by", *(["key_id"] if allow_key_id else [])}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}: use {', '.join(sorted(allowed))}")
    times = {}
    for name in ("since", "until"):
        if (text := params.get(name)) is not None:
            try:
                times[name] = parse_time(text)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    group_by = params.get("group_by") or None
    if group_by is not None and group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}, got {group_by!r}")
    return UsageQuery(
        since=times.get("since"),
        until=times.get("until"),
        key_id=params.get("key_id") or None,
        model=params.get("model") or None,
        group_by=group_by,
    )


def query_usage(database: Path, query: UsageQuery) -> list[dict[str, Any]]:
    """One summary per group, ordered by the group's key."""
    where, args = _filters(query)
    group = GROUPS[query.group_by] if query.group_by else "NULL"
    sql = (
        f"SELECT {group}, outcome, prompt_tokens, completion_tokens, reasoning_tokens, ttft_ms "
        f"FROM usage WHERE {where}"
    )
    uri = f"{database.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        rows = conn.execute(sql, args).fetchall()
    finally:
        conn.close()
    groups: dict[Any, _Group] = {}
    for key, outcome, prompt, completion, reasoning, ttft in rows:
        groups.setdefault(key, _Group()).add(outcome, prompt, completion, reasoning, ttft)
    return [groups[key].summary(key) for key in sorted(groups, key=lambda k: (k is None, k or ""))]


def _filters(query: UsageQuery) -> tuple[str, list[Any]]:
    clauses = ["outcome IS NOT NULL"]
    args: list[Any] = []
    for clause, value in (
        ("started_at >= ?", query.since),
        ("started_at < ?", query.until),
        ("key_id = ?", query.key_id),
        ("model = ?", query.model),
    ):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    return " AND ".join(clauses), args


class _Group:
    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.tokens = [0, 0, 0]
        self.ttfts: list[float] = []

    def add(
        self, outcome: str, prompt: int, completion: int, reasoning: int, ttft: float | None
    ) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.tokens[0] += prompt or 0
        self.tokens[1] += completion or 0
        self.tokens[2] += reasoning or 0
        if ttft is not None:
            self.ttfts.append(ttft)

    def summary(self, key: Any) -> dict[str, Any]:
        self.ttfts.sort()
        return {
            "group": key,
            "requests": sum(self.outcomes.values()),
            "outcomes": self.outcomes,
            "prompt_tokens": self.tokens[0],
            "completion_tokens": self.tokens[1],
            "reasoning_tokens": self.tokens[2],
            "ttft_p50_ms": _percentile(self.ttfts, 0.50),
            "ttft_p95_ms": _percentile(self.ttfts, 0.95),
        }


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return round(ordered[rank - 1], 1)


@dataclass(frozen=True, slots=True)
class RecentCharges:
    """What each key was charged before this start (`Limiter.seed` measures limits from it):
    its tokens in the current UTC day, and its charges of the last minute as
    (seconds ago, tokens)."""

    day: int
    day_tokens: Mapping[str, int]
    last_minute: Mapping[str, list[tuple[float, int]]]


def recent_charges(database: Path, now: float, window: float, day_s: int) -> RecentCharges:
    """Today's and the last `window` seconds' charged tokens per key, by when each row ended
    (a row is charged when it settles). Synchronous: run it in a worker thread."""
    day = int(now // day_s)
    tokens = "prompt_tokens + completion_tokens"
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        today = conn.execute(
            f"SELECT key_id, SUM({tokens}) FROM usage WHERE ended_at >= ? GROUP BY key_id",
            (day * day_s,),
        ).fetchall()
        recent = conn.execute(
            f"SELECT key_id, ended_at, {tokens} FROM usage WHERE ended_at >= ? ORDER BY ended_at",
            (now - window,),
        ).fetchall()
    finally:
        conn.close()
    last_minute: dict[str, list[tuple[float, int]]] = {}
    for key_id, ended_at, charged in recent:
        if charged > 0:
            last_minute.setdefault(key_id, []).append((max(0.0, now - ended_at), charged))
    return RecentCharges(day, {k: n for k, n in today if n}, last_minute)
