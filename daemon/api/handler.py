"""The skeleton every inference route shares: admit, dispatch, commit, relay, clean up.

A route is a `Codec`: it turns the body into a `Parsed` request (routing traits and the
envelope sealed for providers) and writes the committed stream in its own wire shape. The
`InferenceRoute` handler owns its request in one task and one nursery: a sibling task watches
for the client hanging up and cancels everything (racers, providers via `cancel`, slots).
Nothing, not even the status line, is sent before the dispatch commits on a content chunk.

Every check before the commit raises `ApiError`; `__call__` is the one place that answers it,
in the codec's error shape.

An admitted request counts in `supervisor.requests` until it is answered, so a drain can wait
for them; when the drain's grace is over, `_EndAtShutdown` ends it: 503 while it is still
being dispatched, the codec's in-band `server_shutting_down` error once it streams. The
supervisor calls it (`in_flight`): a request has one helper task, `_Watch`, and no more.

Every request with a valid key has a row in the usage ledger (daemon/accounts/ledger.py),
opened once the key is known and settled exactly once by `__call__` from how the request
ended (`settle.py`); a crash or an abrupt stop settles it as failed. A consumer who hangs up
after the commit leaves the provider running for up to `LATE_TERMINAL_S`, read and not relayed,
so the row records the usage its terminal reports; after that the provider is cancelled and
the row records what was counted.

The same end feeds the key's limits (`Permit.settle`, charged the tokens the row records) and
the request metrics, so a request is counted, charged and recorded once, from one `Settlement`.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, assert_never

import trio

from daemon.accounts.ledger import Settlement
from daemon.accounts.limits import ModelNotAllowed, Permit, RateLimited
from daemon.api import settle
from daemon.api.asgi import (
    BodyTooLarge,
    ClientGone,
    Receive,
    Send,
    drain,
    header,
    read_body,
    send_api_error,
)
from daemon.api.errors import ApiError
from daemon.config import Settings
from daemon.nursery.dispatch import (
    SHUTTING_DOWN,
    Committed,
    DispatchFailed,
    Job,
    Phases,
    RelayEnd,
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
# How long a stream whose consumer hung up after the commit may run on, unread, for the
# provider's terminal to say what it used.
LATE_TERMINAL_S: Final = 2.0
# A request that ended by an exception or a cancellation (the daemon stopping at once).
CUT_SHORT: Final = Settlement(503, "failed")


@dataclass(frozen=True, slots=True)
class Parsed:
    """A validated consumer request, as dispatch needs it; `options` is the codec's own."""

    traits: RequestTraits
    envelope: bytes  # {"endpoint": ..., "body": ...}: the plaintext sealed for each provider
    options: Any


class Codec(Protocol):
    """One route's wire shape: its request translator, its committed-stream encoder and
    its error body."""

    def parse(self, raw: bytes) -> Parsed: ...

    def render_error(self, error: ApiError) -> bytes: ...

    async def respond(
        self, send: Send, committed: Committed, headers: Headers, options: Any
    ) -> RelayEnd: ...


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


async def consumer_key_id(sup: Supervisor, scope: dict[str, Any]) -> str | None:
    """The id of the live key the request carries, else None."""
    key = consumer_key(scope)
    return None if key is None else await sup.store.find_api_key(key)


async def read_consumer_body(
    sup: Supervisor, scope: dict[str, Any], receive: Receive
) -> tuple[bytes, str]:
    """The first checks of every consumer POST route: the method, the key, the body's size;
    the body and the key's id."""
    key_id = await consumer_key_id(sup, scope)
    return await read_checked_body(sup, scope, receive, key_id), check_key(sup, key_id)


async def read_checked_body(
    sup: Supervisor, scope: dict[str, Any], receive: Receive, key_id: str | None
) -> bytes:
    """read_consumer_body with the key already looked up (`key_id` None: no valid key)."""
    if scope["method"] != "POST":
        await drain(receive)
        raise ApiError(405, "method_not_allowed", "use POST")
    # The key before the body: a client without a valid one must not make the daemon buffer it.
    try:
        check_key(sup, key_id)
    except ApiError:
        await drain(receive)
        raise
    limit = sup.settings.max_body_bytes
    try:
        return await read_body(scope, receive, limit)
    except BodyTooLarge:
        raise ApiError(
            413, "request_too_large", f"the request body exceeds {limit} bytes"
        ) from None


async def authenticate(sup: Supervisor, scope: dict[str, Any], hint: str = KEY_HINT) -> str:
    """The id of the request's live, unexpired consumer key; else 401 (`hint` says how)."""
    return check_key(sup, await consumer_key_id(sup, scope), hint)


def check_key(sup: Supervisor, key_id: str | None, hint: str = KEY_HINT) -> str:
    """`key_id` when it names a live, unexpired key; else 401."""
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
    """The ASGI handler of one inference route (`route` names it in the usage ledger)."""

    def __init__(
        self,
        supervisor: Supervisor,
        codec: Codec,
        *,
        route: str,
        id_headers: Sequence[bytes] = ID_HEADERS,
    ) -> None:
        self._sup = supervisor
        self._codec = codec
        self._route = route
        self._id_headers = tuple(id_headers)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        started = trio.current_time()
        ident = request_id_headers(self._id_headers)
        key_id = await consumer_key_id(self._sup, scope)
        if key_id is None:  # refused without a row: nobody to charge
            self._observe(scope, await self._answer(scope, receive, send, ident, None), started)
            return
        charge = await self._sup.ledger.open(ident[0][1].decode(), key_id, self._route)
        end = CUT_SHORT
        try:
            end = await self._answer(scope, receive, send, ident, key_id)
        finally:
            # Whichever way it ended, once: the row, the key's charge, the metrics.
            if await charge.settle(end):
                self._observe(scope, end, started)

    def _observe(self, scope: dict[str, Any], end: Settlement, started: float) -> None:
        tokens = end.tokens
        self._sup.metrics.observe_request(
            scope["path"],  # one of the route table's own paths: a bounded label
            end.model or "",
            end.outcome,
            end.status,
            None if end.ttft_ms is None else end.ttft_ms / 1000,
            trio.current_time() - started,
            tokens.prompt,
            tokens.completion,
            tokens.reasoning,
        )

    async def _answer(
        self, scope: dict[str, Any], receive: Receive, send: Send, ident: Headers, key: str | None
    ) -> Settlement:
        try:
            request, permit = await self._admit(scope, receive, key)
        except ClientGone:
            return settle.gone()
        except ApiError as error:
            await send_api_error(send, error, ident, self._codec.render_error)
            return settle.refused_with(error)
        self._sup.requests.value += 1
        end = CUT_SHORT
        try:
            end = await self._handle(request, receive, send, [*ident, *permit.headers])
            return end
        finally:
            self._sup.requests.value -= 1
            permit.settle(end.tokens.prompt + end.tokens.completion)

    @property
    def _settings(self) -> Settings:
        return self._sup.settings  # read per request: a reload may have replaced them

    async def _admit(
        self, scope: dict[str, Any], receive: Receive, key: str | None
    ) -> tuple[Parsed, Permit]:
        """Every check before dispatch, in the order a client can act on them; the key's
        limits last, once the model is known, before any provider is touched."""
        raw = await read_checked_body(self._sup, scope, receive, key)
        key_id = check_key(self._sup, key)
        if self._sup.draining:
            raise ApiError(503, "shutting_down", "the daemon is shutting down", retry_after=5)
        request = self._codec.parse(raw)
        if sealed_request_frame_bytes(len(request.envelope)) > MAX_FRAME_BYTES:
            raise ApiError(
                413,
                "request_too_large",
                "the request is too large to send to a provider: sealed, it would exceed the "
                "protocol's 10 MiB frame",
            )
        return request, admit_limits(self._sup, key_id, request.traits.model)

    async def _handle(
        self, request: Parsed, receive: Receive, send: Send, ident: Headers
    ) -> Settlement:
        """Dispatch and relay in the request's nursery; a hang-up cancels it."""
        ender = _EndAtShutdown()
        relay = TimedSend(send)
        answered: Settlement | None = None
        self._sup.in_flight.add(ender)  # the drain ends it: no task of its own per request
        try:
            async with trio.open_nursery() as nursery:
                watch = _Watch(receive, nursery.cancel_scope)
                nursery.start_soon(watch.run)
                answered = await self._serve(request, ident, relay, watch, ender)
                nursery.cancel_scope.cancel(reason="the answer is complete")
            if answered is not None:
                return answered
            return await _after_hang_up(request, ender.committed, relay.status)
        finally:
            self._sup.in_flight.discard(ender)
            if ender.committed is not None:
                ender.committed.close()

    async def _serve(
        self,
        request: Parsed,
        ident: Headers,
        send: TimedSend,
        watch: _Watch,
        ender: _EndAtShutdown,
    ) -> Settlement:
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
            error = ApiError(503, "shutting_down", "the daemon is shutting down", retry_after=5)
            await send_api_error(send, error, ident, self._codec.render_error)
            return settle.refused_with(error, request.traits)
        match outcome:
            case DispatchFailed(status, message, code, retry_after):
                error = ApiError(status, code, message, retry_after=retry_after)
                await send_api_error(send, error, ident, self._codec.render_error)
                return settle.dispatch_failed(outcome, request.traits)
            case Committed() as committed:
                ender.committed = committed
                headers = [*ident, *_commit_headers(committed)]
                end = await self._relay(request, committed, headers, send, watch)
                return settle.served(committed, end, send.status or 200)
            case outcome:
                assert_never(outcome)

    async def _relay(
        self,
        request: Parsed,
        committed: Committed,
        headers: Headers,
        send: TimedSend,
        watch: _Watch,
    ) -> RelayEnd:
        watch.stalls(send, committed, self._settings.inference_timeout_s)
        try:
            return await self._codec.respond(send, committed, headers, request.options)
        finally:
            self._sup.metrics.chunks.inc(committed.chunks)


async def _after_hang_up(
    request: Parsed, committed: Committed | None, status: int | None
) -> Settlement:
    """The consumer hung up: before the commit nothing was served (nor charged); after it,
    the provider's late terminal says what to charge, if it comes within LATE_TERMINAL_S."""
    if committed is None:
        return settle.gone(request.traits)
    log.info("the consumer hung up after the commit: reading on for the provider's usage")
    end: RelayEnd | None = None
    with trio.move_on_after(LATE_TERMINAL_S):
        end = await settle.late_terminal(committed)
    return settle.hung_up(committed, end, status or settle.CLIENT_CLOSED)


class _EndAtShutdown:
    """Ends one request when the drain grace is over, whichever phase it is in."""

    def __init__(self) -> None:
        self.dispatching: trio.CancelScope | None = None
        self.committed: Committed | None = None

    def end(self) -> None:
        """Called by the supervisor's drain once its grace is over."""
        if self.dispatching is not None:
            self.dispatching.cancel(reason="the daemon's drain grace is over")
        elif self.committed is not None:
            self.committed.close(SHUTTING_DOWN)


class TimedSend:
    """The consumer's `send`, remembering since when a write has been waiting, and the
    status it answered with."""

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


class _Watch:
    """The request's one helper task: it cancels `request` when the client hangs up, and once
    the stream is committed it is also the stalled-consumer watchdog.

    Free the provider when the consumer stops reading but keeps the connection open: Hypercorn
    shields its socket writes from cancellation, so no deadline around the write can end it.
    The watchdog looks at the write's age every `limit / 4` from the commit, and cancels the
    provider and frees its slot; the write itself ends when the socket does. The looks are the
    deadlines of the wait for `http.disconnect`, so they cost no task.
    """

    def __init__(self, receive: Receive, request: trio.CancelScope) -> None:
        self._receive = receive
        self._request = request
        self._wait = trio.CancelScope()
        self._relay: TimedSend | None = None
        self._committed: Committed | None = None
        self._limit = self._period = math.inf

    def stalls(self, relay: TimedSend, committed: Committed, limit: float) -> None:
        """Watch `relay`'s writes from now on, every `limit / 4`."""
        self._relay, self._committed, self._limit = relay, committed, limit
        self._period = limit / 4
        self._wait.deadline = trio.current_time() + self._period

    async def run(self) -> None:
        while True:
            with self._wait:
                while (await self._receive())["type"] != "http.disconnect":
                    pass
                self._request.cancel(reason="the client disconnected")
                return
            if self._stalled():
                self._period = math.inf  # released: the client may still hang up
            self._wait = trio.CancelScope(deadline=trio.current_time() + self._period)

    def _stalled(self) -> bool:
        assert self._relay is not None and self._committed is not None
        since = self._relay.waiting_since
        if since is None or trio.current_time() - since < self._limit:
            return False
        log.info("the consumer stopped reading for %g s: releasing the provider", self._limit)
        self._committed.close()
        return True


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
