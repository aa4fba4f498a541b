"""The chaos soak (issue 14): many requests across every consumer route through the real daemon
on loopback and a fleet of fake providers speaking the real protocol, a share of attempts
faulted, a share of consumers hanging up mid-stream; then the invariants are checked.

    PYTHONPATH=. .venv/bin/python scripts/soak.py --requests 10000 --concurrency 64

Checks, after the run (exit 1 on any violation):
- every request ended within its bound, with a full answer or one clean error (a stream has
  exactly one terminal event, last, valid for its route; an error body has the route's shape);
- nothing leaked: supervisor.requests, supervisor.in_flight, registry slots in flight, the
  admission queue, registry entries (== fake sessions connected), the trio task count;
- the usage ledger: one row per request, none open, each outcome matching what the client saw,
  and tokens equal to what the committed provider reported (per row and per key);
- limits held: no key over its max_concurrency at any instant (seen from the providers: a
  request counts while any attempt of it runs on one; a provider that stops reading cannot
  see the daemon's cancels, so its attempts stop counting when it goes deaf), no more
  requests of an rpm key reached a provider than its bucket allows;
- RSS back near its start.

How a hang-up is charged (settle.py, handler.LATE_TERMINAL_S): a consumer who leaves after the
commit leaves the provider running, unread, for up to LATE_TERMINAL_S; if its terminal comes
in time the row is `client_gone` with the provider's reported tokens (tokens_estimated 0),
else `client_gone` with what was counted (estimated). A hang-up the daemon noticed only after
relaying the end is simply `completed`. The soak's hang-up streams end well within the bound
unless faulted, so an estimated hang-up row is allowed only when its committed attempt was
faulted.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_websocket

from daemon.api.serve import RunningDaemon, serve
from daemon.config import load_settings
from protocol import crypto
from tests.conftest import ADMIN_KEY, FAST_ENV
from tests.fakes.provider import (
    Chunk,
    Cleartext,
    Complete,
    Drop,
    Fail,
    FakeProvider,
    Plaintext,
    Stall,
    Step,
    Wait,
    content_chunk,
    finish_chunk,
    role_chunk,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TAG = re.compile(r"soak-(\d+)-(\d+)-([hn])")
KINDS = ("chat_stream", "chat", "completions", "responses", "messages")
FAULTS = (
    "error_before",
    "error_after",
    "disconnect",
    "stall_before",
    "stall_after",
    "garbage",
    "wrong_key",
    "plaintext",
    "deaf",
    "slow",
)
# Faults that end the provider's session (the fake reconnects with a fresh identity).
FATAL = {"disconnect", "garbage", "wrong_key", "plaintext", "deaf"}
# The keys: (name, limits). Request i uses KEYS[i % len(KEYS)].
KEYS: list[tuple[str, dict[str, int]]] = [
    ("free", {}),
    ("free2", {}),
    ("concurrency", {"max_concurrency": 3}),
    ("rpm", {"rpm": 600}),
    ("tpm", {"tpm": 20000}),
]


def tokens_of(idx: int) -> tuple[int, int]:
    """What the providers report for request `idx` (deterministic, so each row is checkable)."""
    return 10 + idx % 7, 3 + idx % 11


@dataclass
class Config:
    requests: int = 10_000
    concurrency: int = 64
    providers: int = 12
    provider_slots: int = 8
    fault_rate: float = 0.2
    hangup_rate: float = 0.05
    seed: int = 14
    request_bound_s: float = 30.0
    stall_s: float = 0.0  # unused: stalls last until the daemon's deadline cancels them
    deaf_s: float = 1.5  # how long a provider that stopped reading stays connected
    slow_s: float = 0.05  # the pause between a slow provider's chunks
    env: dict[str, str] = field(
        default_factory=lambda: {
            "DINFER_TTFT_BASE_S": "1",
            "DINFER_PREAMBLE_TIMEOUT_S": "1",
            "DINFER_INFERENCE_TIMEOUT_S": "2",
            "DINFER_HEARTBEAT_TIMEOUT_S": "5",
            "DINFER_BREAKER_THRESHOLD": "1000000",
            "DINFER_QUEUE_TIMEOUT_S": "10",
            "DINFER_QUEUE_MAX": "10000",
            "DINFER_DRAIN_GRACE_S": "1",
        }
    )
    rss_tolerance_mib: float = 64.0


@dataclass
class Fleet:
    """What the fake providers did, for the checks."""

    cfg: Config
    rng: random.Random
    faults: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    # (provider_id, idx) -> (prompt, completion) each Complete sent
    completes: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    faulted: set[tuple[str, int]] = field(default_factory=set)
    killed: set[str] = field(default_factory=set)  # sessions a fatal fault ended
    # per key index: attempts active now per request idx; the most distinct requests at once
    active: dict[int, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    peak: Counter[int] = field(default_factory=Counter)
    reached: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    answered: set[int] = field(default_factory=set)  # requests whose consumer saw the end
    sessions: int = 0  # sessions opened over the run
    live: set[ChaosProvider] = field(default_factory=set)
    stop: trio.Event = field(default_factory=trio.Event)

    def script(self, provider: ChaosProvider, body: dict[str, Any]) -> list[Step]:
        found = TAG.search(json.dumps(body))
        assert found, "a soak request carries its tag"
        idx, hangup = int(found[1]), found[3] == "h"
        self.attempts += 1
        completions = "prompt" in body
        prompt, completion = tokens_of(idx)
        chunk = _text_chunk if completions else _chat_chunk
        first = [_text_chunk("") if completions else role_chunk(), chunk("alpha")]
        rest: list[Step] = [chunk(" beta"), chunk(" gamma")]
        if hangup:
            rest.insert(0, Wait(0.1))  # the consumer leaves at "alpha"
        end: list[Step] = [
            _text_chunk("", "stop") if completions else finish_chunk(),
            Chunk("data: [DONE]"),
            Complete(prompt, completion),
        ]
        if self.rng.random() >= self.cfg.fault_rate:
            return [*first, *rest, *end]
        fault = self.rng.choice(FAULTS)
        self.faults[fault] += 1
        self.faulted.add((provider.provider_id, idx))
        if fault in FATAL:
            self.killed.add(provider.provider_id)
            provider.doomed = True
        match fault:
            case "error_before":
                return [Fail(500)]
            case "error_after":
                return [*first, Fail(500)]
            case "disconnect":
                return self.rng.choice([[Drop()], [*first, Drop()]])
            case "stall_before":
                return [Stall()]
            case "stall_after":
                return [*first, Stall()]
            case "garbage":
                return [*self.rng.choice([[], first]), Garbage()]
            case "wrong_key":
                return [*self.rng.choice([[], first]), Plaintext()]
            case "plaintext":
                return [*self.rng.choice([[], first]), Cleartext("data: {}")]
            case "deaf":
                return [*self.rng.choice([[], first]), Deaf()]
            case _:  # slow
                pause = Wait(self.cfg.slow_s)
                return [first[0], pause, first[1], pause, *rest, pause, *end]

    def began(self, key: int, idx: int) -> None:
        active = self.active[key]
        active[idx] += 1
        self.reached[key].add(idx)
        # A request counts while an attempt of it runs here and its consumer has not seen the
        # end: a cancel the daemon sent may still be on its way to the provider when the
        # daemon has already released the key's slot and admitted the next request.
        running = sum(1 for i in active if i not in self.answered)
        self.peak[key] = max(self.peak[key], running)

    def ended(self, key: int, idx: int) -> None:
        active = self.active[key]
        active[idx] -= 1
        if not active[idx]:
            del active[idx]


@dataclass(frozen=True)
class Garbage:
    """A frame that is not JSON at all."""


@dataclass(frozen=True)
class Deaf:
    """Stop reading the socket (and send nothing), then drop the connection."""


class ChaosProvider(FakeProvider):
    """A FakeProvider whose scripts come from the fleet, with two more faults."""

    fleet: Fleet
    __hash__ = object.__hash__  # one per session: the fleet keeps a set of the live ones

    def __init__(self, url: str, fleet: Fleet, slots: int) -> None:
        super().__init__(url, behaviour=lambda body: fleet.script(self, body))
        self.max_concurrency = slots
        self.fleet = fleet
        self.deaf = trio.Event()
        self.gone = trio.Event()
        self.doomed = False  # a fatal fault is under way: this session is about to end
        self.counting: dict[str, tuple[int, int]] = {}  # request id -> (key, idx), running

    async def _read(self, ws: trio_websocket.WebSocketConnection, task_status: Any) -> None:
        async with trio.open_nursery() as nursery:

            async def deafen() -> None:
                await self.deaf.wait()
                nursery.cancel_scope.cancel(reason="the provider stopped reading")

            nursery.start_soon(deafen)
            await super()._read(ws, task_status)
            nursery.cancel_scope.cancel(reason="the socket ended")
        await self.gone.wait()  # deaf: the Deaf step drops the socket

    async def _serve_request(self, ws: Any, request: Any) -> None:
        plaintext, _ = crypto.open_request(request.encrypted_body, self.box_key)
        found = TAG.search(plaintext.decode())
        assert found, "a soak request carries its tag"
        idx, key = int(found[1]), int(found[2])
        self.fleet.began(key, idx)
        self.counting[request.request_id] = (key, idx)
        try:
            await super()._serve_request(ws, request)
        finally:
            if self.counting.pop(request.request_id, None) is not None:
                self.fleet.ended(key, idx)

    def stop_counting(self) -> None:
        """Deaf: the daemon's cancels go unread from now on, so what this provider still runs
        says nothing of what the daemon holds; its attempts stop counting for the limits."""
        for key, idx in self.counting.values():
            self.fleet.ended(key, idx)
        self.counting.clear()

    async def _give_up(self, ws: Any) -> None:
        await trio.sleep(self.fleet.cfg.deaf_s)
        try:
            await ws.aclose(code=1011, reason="deaf provider gave up")
        finally:
            self.gone.set()

    async def _play(self, ws: Any, request_id: str, sealer: Any, step: Any) -> bool:
        match step:
            case Garbage():
                await ws.send_message("this is not a frame {")
                await trio.sleep_forever()  # the daemon closes the session
            case Deaf():
                self.deaf.set()
                self.stop_counting()
                # Not in this request's scope: a cancel read just before must not stop it.
                self._nursery.start_soon(self._give_up, ws)
                return False
            case Complete(prompt_tokens=p, completion_tokens=c):
                self.fleet.completes[(self.provider_id, _idx_of(self, request_id))] = (p, c)
        return await super()._play(ws, request_id, sealer, step)


def _idx_of(provider: ChaosProvider, request_id: str) -> int:
    position = provider.request_ids.index(request_id)
    found = TAG.search(json.dumps(provider.received[position]["body"]))
    assert found
    return int(found[1])


def _chat_chunk(text: str) -> Chunk:
    return content_chunk(text)


def _text_chunk(text: str, finish_reason: str | None = None) -> Chunk:
    event = {
        "id": "cmpl-soak",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    return Chunk("data: " + json.dumps(event))


async def run_member(
    fleet: Fleet, url: str, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """One provider machine: connects, serves, and after any fault reconnects afresh."""
    first = True
    while not fleet.stop.is_set():
        fake = ChaosProvider(url, fleet, fleet.cfg.provider_slots)
        fleet.sessions += 1
        fleet.live.add(fake)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(fake.run)
                if first:
                    task_status.started()
                    first = False
                await _stop_or_close(fleet, fake)
                nursery.cancel_scope.cancel(reason="the soak is over or the session closed")
        finally:
            fleet.live.discard(fake)
        await trio.sleep(0.05)


async def _stop_or_close(fleet: Fleet, fake: ChaosProvider) -> None:
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel(reason="one of them happened")

        nursery.start_soon(wait, fleet.stop)
        nursery.start_soon(wait, fake.closed)


# Consumers -----------------------------------------------------------------------------------


@dataclass
class Seen:
    """What one consumer saw."""

    idx: int
    key: int
    kind: str
    stream: bool
    hangup: bool
    status: int | None = None
    request_id: str | None = None
    verdict: str = "hung"  # full | error | in_band | left | hung | invalid
    detail: str = ""


def body_for(kind: str, stream: bool, tag: str) -> tuple[str, dict[str, Any]]:
    hello = [{"role": "user", "content": f"say hi {tag}"}]
    match kind:
        case "chat" | "chat_stream":
            return "/v1/chat/completions", {"model": "m", "messages": hello, "stream": stream}
        case "completions":
            return "/v1/completions", {"model": "m", "prompt": f"hi {tag}", "stream": stream}
        case "responses":
            return "/v1/responses", {"model": "m", "input": f"hi {tag}", "stream": stream}
        case _:
            body = {"model": "m", "max_tokens": 16, "messages": hello, "stream": stream}
            return "/v1/messages", body


async def consume(
    client: httpx.AsyncClient, seen: Seen, auth: dict[str, str], bound: float
) -> None:
    tag = f"soak-{seen.idx}-{seen.key}-{'h' if seen.hangup else 'n'}"
    path, body = body_for(seen.kind, seen.stream, tag)
    try:
        await _exchange(client, seen, auth, bound, path, body)
    except httpx.TransportError as error:  # the connection ended without a whole answer
        seen.verdict, seen.detail = "dropped", f"{type(error).__name__}: {error}"


async def _exchange(
    client: httpx.AsyncClient,
    seen: Seen,
    auth: dict[str, str],
    bound: float,
    path: str,
    body: dict[str, Any],
) -> None:
    data = b""
    with trio.move_on_after(bound):
        async with client.stream("POST", path, json=body, headers=auth) as response:
            seen.status = response.status_code
            seen.request_id = response.headers.get("x-request-id")
            parts = response.aiter_bytes()
            try:
                async for part in parts:
                    data += part
                    if seen.hangup and response.status_code == 200 and b"alpha" in data:
                        seen.verdict = "left"
                        return  # leaving the block closes the connection: a hang-up
            finally:
                await parts.aclose()  # type: ignore[attr-defined]
        seen.verdict, seen.detail = judge(seen, data)


def judge(seen: Seen, data: bytes) -> tuple[str, str]:
    """full | error | in_band, or invalid with why."""
    anthropic = seen.kind == "messages"
    if seen.status != 200:
        try:
            error = json.loads(data)
        except ValueError:
            return "invalid", f"error body is not JSON: {data[:200]!r}"
        shaped = (
            error.get("type") == "error" and {"type", "message"} <= set(error.get("error", {}))
            if anthropic
            else set(error) == {"error"} and {"type", "message", "code"} <= set(error["error"])
        )
        return ("error", "") if shaped else ("invalid", f"error shape: {error}")
    if not seen.stream:
        answer = json.loads(data)
        text = {
            "chat": lambda a: a["choices"][0]["message"]["content"],
            "completions": lambda a: a["choices"][0]["text"],
            "responses": lambda a: a["output"][0]["content"][0]["text"],
            "messages": lambda a: a["content"][0]["text"],
        }[seen.kind](answer)
        return ("full", "") if text == "alpha beta gamma" else ("invalid", f"text {text!r}")
    return judge_stream(seen.kind, data.decode())


def judge_stream(kind: str, text: str) -> tuple[str, str]:
    datas = [ln[6:] for ln in text.split("\n") if ln.startswith("data: ")]
    if kind in {"chat_stream", "completions"}:
        if datas.count("[DONE]") != 1 or datas[-1] != "[DONE]":
            return "invalid", "not exactly one [DONE], last"
        events = [json.loads(d) for d in datas[:-1]]
        errors = [e for e in events if "error" in e]
        finishes = [e for e in events for c in e.get("choices", ()) if c.get("finish_reason")]
        if errors:
            ok = len(errors) == 1 and events[-1] is errors[0]
            return ("in_band", "") if ok else ("invalid", "error not once and last")
        return ("full", "") if len(finishes) == 1 else ("invalid", f"{len(finishes)} finishes")
    events = [json.loads(d) for d in datas]
    types = [e.get("type") for e in events]
    terminal = (
        {"response.completed", "response.failed", "response.incomplete", "error"}
        if kind == "responses"
        else {"message_stop", "error"}
    )
    ends = [t for t in types if t in terminal]
    if len(ends) != 1 or types[-1] != ends[0]:
        return "invalid", f"terminal events {ends}, last {types[-1:]}"
    return ("full", "") if ends[0] in {"response.completed", "message_stop"} else ("in_band", "")


# The run ---------------------------------------------------------------------------------------


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def task_count() -> int:
    # trio.lowlevel, because no public API counts tasks: the leak check walks the task tree
    # from the root to count every task alive.
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


async def poll(condition: Callable[[], bool], bound: float) -> bool:
    with trio.move_on_after(bound):
        while not condition():  # noqa: ASYNC110 - polled state, bounded
            await trio.sleep(0.05)
        return True
    return False


@dataclass
class Report:
    figures: dict[str, Any]
    violations: list[str]

    def print(self, out: Any = sys.stdout) -> None:
        for name, value in self.figures.items():
            print(f"{name:>24}: {value}", file=out)
        print(f"{'violations':>24}: {len(self.violations)}", file=out)
        for v in self.violations[:50]:
            print(f"  VIOLATION: {v}", file=out)


async def run_soak(cfg: Config) -> Report:
    with tempfile.TemporaryDirectory(prefix="dinfer-soak-") as data_dir:
        env = {**FAST_ENV, **cfg.env, "DINFER_DATA_DIR": data_dir}
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            daemon: RunningDaemon = await nursery.start(
                lambda task_status: serve(
                    load_settings(env), shutdown_trigger=stop.wait, task_status=task_status
                )
            )
            try:
                return await _soak(cfg, daemon, nursery)
            finally:
                stop.set()


async def _soak(cfg: Config, daemon: RunningDaemon, nursery: trio.Nursery) -> Report:
    sup = daemon.supervisor
    rng = random.Random(cfg.seed)
    fleet = Fleet(cfg, random.Random(cfg.seed + 1))
    violations: list[str] = []
    limits = httpx.Limits(max_connections=cfg.concurrency + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=daemon.base_url, timeout=None, limits=limits) as admin:
        keys = []
        for name, lim in KEYS:
            r = await admin.post("/v1/admin/keys", json={"name": name, **lim}, headers=ADMIN)
            assert r.status_code == 201, r.text
            keys.append({"Authorization": f"Bearer {r.json()['key']}"})
    async with trio.open_nursery() as fleet_nursery:
        for _ in range(cfg.providers):
            await fleet_nursery.start(run_member, fleet, daemon.provider_url)
        await poll(lambda: len(sup.registry.providers()) == cfg.providers, 10)
        tasks_before, rss_before = task_count(), rss_kib()
        seen = [
            Seen(
                i,
                i % len(KEYS),
                kind := rng.choice(KINDS),
                stream := kind == "chat_stream" or (kind != "chat" and rng.random() < 0.5),
                stream and rng.random() < cfg.hangup_rate,
            )
            for i in range(cfg.requests)
        ]
        started = time.monotonic()
        limiter = trio.CapacityLimiter(cfg.concurrency)
        async with httpx.AsyncClient(
            base_url=daemon.base_url, timeout=None, limits=limits
        ) as client:

            async def one(s: Seen) -> None:
                async with limiter:
                    try:
                        await consume(client, s, keys[s.key], cfg.request_bound_s)
                    finally:
                        fleet.answered.add(s.idx)

            async with trio.open_nursery() as consumers:
                for s in seen:
                    consumers.start_soon(one, s)
        elapsed = time.monotonic() - started
        # Quiescence: the fleet whole again, every request's state gone.
        settled = await poll(
            lambda: (
                sup.requests.value == 0
                and not sup.in_flight
                and len(fleet.live) == cfg.providers
                and len(sup.registry.connected()) == cfg.providers
                and all(f.trusted.is_set() and not f.doomed for f in fleet.live)
            ),
            15,
        )
        if not settled:
            violations.append(
                f"not back to rest within 15 s: {sup.requests.value} requests, "
                f"{len(sup.in_flight)} in flight, {len(fleet.live)} fakes live, "
                f"{sum(f.trusted.is_set() and not f.doomed for f in fleet.live)} healthy, "
                f"{len(sup.registry.connected())} registry entries; the others: "
                + "; ".join(
                    f"trusted={f.trusted.is_set()} doomed={f.doomed} deaf={f.deaf.is_set()} "
                    f"gone={f.gone.is_set()} verdicts={[v.status for v in f.verdicts]} "
                    f"in registry={sup.registry.get(f.provider_id) is not None} "
                    f"streams={len(f._streams)} close={f.close_code}"
                    for f in fleet.live
                    if not (f.trusted.is_set() and not f.doomed)
                )
            )
        await poll(lambda: task_count() == tasks_before, 10)
        tasks_after, rss_after = task_count(), rss_kib()
        leaks = {
            "supervisor.requests": sup.requests.value,
            "supervisor.in_flight": len(sup.in_flight),
            "registry slots in flight": sum(e.in_flight for e in sup.registry.connected()),
            "registry by-model counts": sum(
                sum(e.in_flight_by_model.values()) for e in sup.registry.connected()
            ),
            "queue depth": sum(sup.queue.depths().values()),
            "registry entries - sessions": len(sup.registry.connected()) - len(fleet.live),
            "trio tasks (after - before)": tasks_after - tasks_before,
        }
        fleet.stop.set()
    for name, value in leaks.items():
        if value:
            violations.append(f"leak: {name} = {value}")
    await sup.ledger.flush()
    rows = _rows(sup.store.path)
    violations += check(cfg, seen, rows, fleet, elapsed)
    growth = (rss_after - rss_before) / 1024
    if growth > cfg.rss_tolerance_mib:
        violations.append(f"RSS grew {growth:.1f} MiB (tolerance {cfg.rss_tolerance_mib})")
    verdicts = Counter(s.verdict for s in seen)
    figures: dict[str, Any] = {
        "requests": cfg.requests,
        "concurrency": cfg.concurrency,
        "time_s": round(elapsed, 1),
        "requests_per_s": round(cfg.requests / elapsed, 1),
        "attempts": fleet.attempts,
        "faults_injected": sum(fleet.faults.values()),
        "faults_by_kind": dict(sorted(fleet.faults.items())),
        "provider_sessions": fleet.sessions,
        "client_verdicts": dict(sorted(verdicts.items())),
        "statuses": dict(sorted(Counter(s.status for s in seen).items(), key=str)),
        "lost_or_hung": verdicts["hung"] + verdicts["dropped"],
        "leaked": sum(1 for v in leaks.values() if v),
        "leak_counts": leaks,
        "rows": len(rows),
        "row_outcomes": dict(sorted(Counter(r["outcome"] for r in rows).items(), key=str)),
        "peak_concurrency_key": fleet.peak[_key("concurrency")],
        "rss_mib_before_after": (round(rss_before / 1024, 1), round(rss_after / 1024, 1)),
    }
    return Report(figures, violations)


def _key(name: str) -> int:
    return [n for n, _ in KEYS].index(name)


def _rows(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage")]
    finally:
        conn.close()


def check(
    cfg: Config, seen: list[Seen], rows: list[dict[str, Any]], fleet: Fleet, elapsed: float
) -> list[str]:
    bad: list[str] = []
    for s in seen:
        if s.verdict in {"hung", "invalid", "dropped"}:
            bad.append(f"request {s.idx} ({s.kind}, stream={s.stream}) {s.verdict} {s.detail}")
    by_id = {r["request_id"]: r for r in rows}
    if len(by_id) != len(rows):
        bad.append("two rows share a request id")
    if len(rows) != len(seen):
        bad.append(f"{len(rows)} rows for {len(seen)} requests")
    if open_rows := [r for r in rows if r["outcome"] is None]:
        bad.append(f"{len(open_rows)} rows never settled")
    charged: Counter[tuple[int, str]] = Counter()
    reported: Counter[tuple[int, str]] = Counter()
    for s in seen:
        row = by_id.get(s.request_id or "")
        if row is None:
            if s.verdict != "hung":
                bad.append(f"request {s.idx}: no row for {s.request_id}")
            continue
        bad += _check_row(s, row, fleet)
        if row["outcome"] in {"completed", "client_gone"} and not row["tokens_estimated"]:
            charged[(s.key, "prompt")] += row["prompt_tokens"]
            charged[(s.key, "completion")] += row["completion_tokens"]
            sent = fleet.completes.get((row["provider_id"], s.idx), (0, 0))
            reported[(s.key, "prompt")] += sent[0]
            reported[(s.key, "completion")] += sent[1]
    if charged != reported:
        bad.append(f"per-key tokens charged {dict(charged)} != reported {dict(reported)}")
    for name, lim in KEYS:
        key = _key(name)
        if "max_concurrency" in lim and fleet.peak[key] > lim["max_concurrency"]:
            bad.append(f"key {name}: {fleet.peak[key]} at once > {lim['max_concurrency']}")
        if "rpm" in lim:
            allowed = lim["rpm"] * (1 + elapsed / 60) + 1
            if len(fleet.reached[key]) > allowed:
                bad.append(f"key {name}: {len(fleet.reached[key])} reached > rpm allows")
    return bad


def _check_row(s: Seen, row: dict[str, Any], fleet: Fleet) -> list[str]:
    where = f"request {s.idx} ({s.kind}, stream={s.stream}, hangup={s.hangup})"
    outcome, expected = row["outcome"], tokens_of(s.idx)
    committed = (row["provider_id"], s.idx)
    sent = fleet.completes.get(committed)
    tokens = (row["prompt_tokens"], row["completion_tokens"])
    match s.verdict:
        case "full":
            if outcome != "completed" or row["status"] != 200:
                return [f"{where}: answered in full but the row says {outcome} {row['status']}"]
            if tokens != expected or sent != expected or row["tokens_estimated"]:
                return [f"{where}: charged {tokens}, provider sent {sent}, expected {expected}"]
        case "in_band":
            if outcome != "in_band_error":
                return [f"{where}: failed in band but the row says {outcome}"]
        case "error":
            # A one-object answer that failed after the commit is a 502/504 whose row says
            # in_band_error (the provider had started; what it counted is charged).
            want = {"rejected" if (s.status or 0) < 500 else "failed"}
            if not s.stream and row["provider_id"] is not None:
                want = {"in_band_error"}
            if outcome not in want or row["status"] != s.status:
                return [f"{where}: {s.status} but the row says {outcome} {row['status']}"]
        case "left":
            if outcome not in {"client_gone", "completed", "in_band_error"}:
                return [f"{where}: hung up but the row says {outcome}"]
            if outcome == "completed" and tokens != expected:
                return [f"{where}: completed after a hang-up, charged {tokens}"]
            if outcome == "client_gone" and not row["tokens_estimated"] and tokens != expected:
                return [f"{where}: hung up, charged {tokens}, expected {expected}"]
            if outcome == "client_gone" and row["tokens_estimated"]:
                if committed not in fleet.faulted and row["provider_id"] not in fleet.killed:
                    return [
                        f"{where}: hung up, unfaulted, but charged an estimate {tokens} "
                        f"(ttft {row['ttft_ms']} ms, duration {row['duration_ms']} ms, "
                        f"provider sent {sent})"
                    ]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--providers", type=int, default=12)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--hangup-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    cfg = Config(
        requests=args.requests,
        concurrency=args.concurrency,
        providers=args.providers,
        fault_rate=args.fault_rate,
        hangup_rate=args.hangup_rate,
        seed=args.seed,
    )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    report = trio.run(run_soak, cfg)
    report.print()
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
