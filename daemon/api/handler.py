"""The skeleton every inference route shares: admit, dispatch, commit, relay, clean up.

A route is a `Codec`: it turns the body into a `Parsed` request (routing traits and the
envelope sealed for providers) and writes the committed stream in its own wire shape. The
`InferenceRoute` handler owns its request in one task and one nursery: a sibling task watches
for the client hanging up and cancels everything (racers, providers via `cancel`, slots).
Nothing, not even the status line, is sent before the dispatch commits on a content chunk.

Every check before the commit raises `ApiError`; `__call__` is the one place that answers it,
in the codec's error shape.

The key's limits (`daemon.accounts.limits`) are checked last in `_admit`, once the model is
known and before any provider is touched; the `Permit` is settled in `__call__`'s `finally`,
however the request ends, with the tokens the provider reported. Its `x-ratelimit-*` headers
go on every answer from then on.

An admitted request counts in `supervisor.requests` until it is answered, so a drain can wait
for them; when the drain's grace is over, `_EndAtShutdown` ends it: 503 while it is still
being dispatched, the codec's in-band `server_shutting_down` error once it streams.

Each request's end is counted once in the metrics (`Tally`: its model, outcome, status,
first-token time and tokens, filled in as the request goes), whichever way it ends.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, assert_never

import trio
from trio_util import periodic

from daemon.accounts.limits import ModelNotAllowed, Permit, RateLimited
from daemon.api.asgi import (
    BodyTooLarge,
    ClientGone,
    Receive,
    Send,
    drain,
    header,
    read_body,
    send_api_error,
    watch_disconnect,
)
from daemon.api.errors import ApiError
from daemon.config import Settings
from daemon.nursery.dispatch import (
    SHUTTING_DOWN,
    Committed,
    DispatchFailed,
    Finished,
    InBandError,
    Job,
    Phases,
    dispatch,
)
from daemon.nursery.race import Timing
from daemon.nursery.supervisor import Supervisor
from daemon.routing.registry import shown
from daemon.routing.types import RequestTraits
from protocol.crypto import sealed_request_frame_bytes
from protocol.messages import MAX_FRAME_BYTES

log = logging.getLogger("dinfer.api")

Headers = list[tuple[bytes, bytes]]
ID_HEADERS: Final = (b"x-request-id",)
KEY_HINT: Final = "a valid API key is required (Authorization: Bearer KEY, or x-api-key: KEY)"


@dataclass(frozen=True, slots=True)
class Parsed:
    """A validated consumer request, as dispatch needs it; `options` is the codec's own."""

    traits: RequestTraits
    envelope: bytes  # {"endpoint": ..., "body": ...}: the plaintext sealed for each provider
    options: Any


@dataclass(slots=True)
class Tally:
    """One request's end as the metrics count it; until something else is known, the client
    went away (status 499, nginx's "client closed request")."""

    model: str = ""
    outcome: str = "client_gone"
    status: int = 499
    ttft_s: float | None = None
    tokens: tuple[int, int, int] = field(default=(0, 0, 0))  # prompt, completion, reasoning

    def fields(self, route: str, duration_s: float) -> tuple[Any, ...]:
        """`Metrics.observe_request`'s arguments, in its order."""
        ttft, tokens = self.ttft_s, self.tokens
        return (route, self.model, self.outcome, self.status, ttft, duration_s, *tokens)

    def answered(self, outcome: str, status: int) -> None:
        self.outcome, self.status = outcome, status

    def relayed(self, committed: Committed, status: int | None) -> None:
        """A committed answer's end, from what its relay got."""
        self.ttft_s = committed.phases.ttft
        match committed.ended:
            case Finished(usage=usage):
                self.answered("completed", status or 200)
                reasoning = usage.reasoning_tokens or 0
                self.tokens = (usage.prompt_tokens, usage.completion_tokens, reasoning)
            case InBandError():
                self.answered("in_band_error", status or 200)
            case None:
                pass  # the relay never got to the end: the client went away
            case ended:
                assert_never(ended)


class Codec(Protocol):
    """One route's wire shape: its request translator, its committed-stream encoder and
    its error body."""

    def parse(self, raw: bytes) -> Parsed: ...

    def render_error(self, error: ApiError) -> bytes: ...

    async def respond(
        self, send: Send, committed: Committed, headers: Headers, options: Any
    ) -> None: ...


def consumer_key(scope: dict[str, Any]) -> str | None:
    """The key of `Authorization: Bearer KEY`, or of `x-api-key: KEY` (Anthropic's SDK)."""
    scheme, _, key = (header(scope, b"authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return (header(scope, b"x-api-key") or "").strip() or None


def timing_for(settings: Settings, prompt_tokens: int) -> Timing:
    """The TTFT deadline grows with the prompt: base + per-token cost of prefill."""
    ttft = settings.ttft_base_s + prompt_tokens * settings.ttft_per_token_ms / 1000
    return Timing(
        ttft=ttft,
        speculative_ratio=settings.speculative_ratio,
        preamble=settings.preamble_timeout_s,
        inference=settings.inference_timeout_s,
    )


def request_id_headers(names: Sequence[bytes] = ID_HEADERS) -> Headers:
    """A fresh request id under each of `names` (Anthropic's SDK reads `request-id`)."""
    request_id = str(uuid.uuid4()).encode()
    return [(name, request_id) for name in names]


async def read_consumer_body(
    sup: Supervisor, scope: dict[str, Any], receive: Receive
) -> tuple[bytes, str]:
    """The first checks of every consumer POST route: the method, the body's size, the key;
    the body and the key's id."""
    if scope["method"] != "POST":
        await drain(receive)
        raise ApiError(405, "method_not_allowed", "use POST")
    limit = sup.settings.max_body_bytes
    try:
        raw = await read_body(scope, receive, limit)
    except BodyTooLarge:
        raise ApiError(
            413, "request_too_large", f"the request body exceeds {limit} bytes"
        ) from None
    return raw, await authenticate(sup, scope)


async def authenticate(sup: Supervisor, scope: dict[str, Any], hint: str = KEY_HINT) -> str:
    """The id of the request's live, unexpired consumer key; else 401 (`hint` says how)."""
    key = consumer_key(scope)
    key_id = None if key is None else await sup.store.find_api_key(key)
    if key_id is None:
        raise ApiError(401, "invalid_api_key", hint)
    if sup.limiter.expired(sup.store.api_key_limits(key_id)):
        raise ApiError(401, "api_key_expired", "this API key has expired")
    return key_id


def admit_limits(sup: Supervisor, key_id: str, model: str) -> Permit:
    """The key's limits for one request of `model`: its permit, or the refusal as ApiError."""
    limits = sup.store.api_key_limits(key_id)
    match sup.limiter.admit(key_id, limits, model):
        case Permit() as permit:
            return permit
        case RateLimited(message=message, retry_after=retry_after, headers=headers):
            raise ApiError(
                429, "rate_limit_exceeded", message, retry_after=retry_after, headers=headers
            )
        case ModelNotAllowed(model=refused, headers=headers):
            message = f"this API key may not use the model {shown(refused)}"
            raise ApiError(403, "model_not_allowed", message, param="model", headers=headers)
        case refusal:
            assert_never(refusal)


class InferenceRoute:
    """The ASGI handler of one inference route."""

    def __init__(
        self, supervisor: Supervisor, codec: Codec, *, id_headers: Sequence[bytes] = ID_HEADERS
    ) -> None:
        self._sup = supervisor
        self._codec = codec
        self._id_headers = tuple(id_headers)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        started = trio.current_time()
        tally = Tally()
        try:
            await self._handle(scope, receive, send, tally)
        finally:
            self._sup.metrics.observe_request(
                *tally.fields(scope["path"], trio.current_time() - started)
            )

    async def _handle(
        self, scope: dict[str, Any], receive: Receive, send: Send, tally: Tally
    ) -> None:
        ident = request_id_headers(self._id_headers)
        try:
            request, permit = await self._admit(scope, receive, tally)
        except ClientGone:
            return
        except ApiError as error:
            tally.answered("rejected", error.status)
            await send_api_error(send, error, ident, self._codec.render_error)
            return
        ender = _EndAtShutdown()
        self._sup.requests.value += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_disconnect, receive, nursery.cancel_scope)
                nursery.start_soon(ender.run, self._sup.grace_over)
                await self._serve(request, [*ident, *permit.headers], send, nursery, ender, tally)
                nursery.cancel_scope.cancel(reason="the answer is complete")
        finally:
            self._sup.requests.value -= 1
            permit.settle(_reported_tokens(ender.committed))

    @property
    def _settings(self) -> Settings:
        return self._sup.settings  # read per request: a reload may have replaced them

    async def _admit(
        self, scope: dict[str, Any], receive: Receive, tally: Tally
    ) -> tuple[Parsed, Permit]:
        """Every check before dispatch, in the order a client can act on them."""
        raw, key_id = await read_consumer_body(self._sup, scope, receive)
        if self._sup.draining:
            raise ApiError(503, "shutting_down", "the daemon is shutting down", retry_after=5)
        request = self._codec.parse(raw)
        tally.model = request.traits.model
        if sealed_request_frame_bytes(len(request.envelope)) > MAX_FRAME_BYTES:
            raise ApiError(
                413,
                "request_too_large",
                "the request is too large to send to a provider: sealed, it would exceed the "
                "protocol's 10 MiB frame",
            )
        return request, admit_limits(self._sup, key_id, request.traits.model)

    async def _serve(
        self,
        request: Parsed,
        ident: Headers,
        send: Send,
        nursery: trio.Nursery,
        ender: _EndAtShutdown,
        tally: Tally,
    ) -> None:
        job = Job(
            traits=request.traits,
            plaintext=request.envelope,
            timing=timing_for(self._settings, request.traits.prompt_tokens),
            max_attempts=self._settings.max_attempts,
        )
        with trio.CancelScope() as dispatching:
            ender.dispatching = dispatching
            outcome = await dispatch(job, self._sup.registry, self._sup.queue, self._sup.hedger)
        ender.dispatching = None
        if dispatching.cancelled_caught:
            tally.answered("failed", 503)
            error = ApiError(503, "shutting_down", "the daemon is shutting down", retry_after=5)
            await send_api_error(send, error, ident, self._codec.render_error)
            return
        match outcome:
            case DispatchFailed(status, message, code, retry_after):
                tally.answered("rejected" if status < 500 else "failed", status)
                error = ApiError(status, code, message, retry_after=retry_after)
                await send_api_error(send, error, ident, self._codec.render_error)
            case Committed() as committed:
                ender.committed = committed
                await self._relay(
                    request, committed, [*ident, *_commit_headers(committed)], send, nursery, tally
                )
            case outcome:
                assert_never(outcome)

    async def _relay(
        self,
        request: Parsed,
        committed: Committed,
        headers: Headers,
        send: Send,
        nursery: trio.Nursery,
        tally: Tally,
    ) -> None:
        relay = TimedSend(send)
        limit = self._settings.inference_timeout_s
        nursery.start_soon(_abandon_if_stalled, relay, committed, limit)
        try:
            await self._codec.respond(relay, committed, headers, request.options)
        finally:
            committed.close()
            self._sup.metrics.chunks.inc(committed.chunks)
            tally.relayed(committed, relay.status)


class _EndAtShutdown:
    """Ends one request when the drain grace is over, whichever phase it is in."""

    def __init__(self) -> None:
        self.dispatching: trio.CancelScope | None = None
        self.committed: Committed | None = None

    async def run(self, grace_over: trio.Event) -> None:
        await grace_over.wait()
        if self.dispatching is not None:
            self.dispatching.cancel(reason="the daemon's drain grace is over")
        elif self.committed is not None:
            self.committed.close(SHUTTING_DOWN)


class TimedSend:
    """The consumer's `send`, remembering since when a write has been waiting."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.waiting_since: float | None = None
        self.status: int | None = None  # of the response's start, once sent

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        self.waiting_since = trio.current_time()
        try:
            await self._send(message)
        finally:
            self.waiting_since = None


async def _abandon_if_stalled(relay: TimedSend, committed: Committed, limit: float) -> None:
    """Free the provider when the consumer stops reading but keeps the connection open.

    Hypercorn shields its socket writes from cancellation, so no deadline around the write
    can end it: this watchdog looks at the write's age a few times per `limit` instead, and
    cancels the provider and frees its slot; the write itself ends when the socket does.
    """
    async with aclosing(periodic(limit / 4)) as ticks:
        async for _ in ticks:
            since = relay.waiting_since
            if since is not None and trio.current_time() - since >= limit:
                log.info("the consumer stopped reading for %g s: releasing the provider", limit)
                committed.close()
                return


def _reported_tokens(committed: Committed | None) -> int:
    """Prompt + completion tokens the provider reported at the stream's end, else 0."""
    usage = None if committed is None else committed.usage
    return 0 if usage is None else usage.prompt_tokens + usage.completion_tokens


def _commit_headers(committed: Committed) -> Headers:
    return [
        (b"x-provider-id", committed.provider_id.encode()),
        (b"server-timing", _server_timing(committed.phases).encode()),
    ]


def _server_timing(phases: Phases) -> str:
    return ", ".join(
        f"{name};dur={seconds * 1000:.1f}"
        for name, seconds in (
            ("queue", phases.queue),
            ("route", phases.route),
            ("ttft", phases.ttft),
        )
    )
