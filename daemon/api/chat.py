"""`POST /v1/chat/completions`: authenticate, validate, dispatch, then stream or assemble.

The handler owns its request in one task and one nursery: a sibling task watches for the
client hanging up and cancels everything (racers, providers via `cancel`, slots). Nothing,
not even the status line, is sent before the dispatch commits on a content chunk.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, Final

import msgspec
import trio
from trio_util import periodic

from daemon.api.asgi import (
    BodyTooLarge,
    ClientGone,
    Receive,
    Send,
    drain,
    header,
    read_body,
    send_error,
    send_json,
    watch_disconnect,
)
from daemon.api.assemble import CompletionAssembler
from daemon.api.chat_request import BadRequest, ChatRequest, parse_chat_request
from daemon.config import Settings
from daemon.nursery.dispatch import (
    Committed,
    DispatchFailed,
    InBandError,
    Job,
    Nothing,
    Phases,
    dispatch,
)
from daemon.nursery.race import Timing
from daemon.nursery.supervisor import Supervisor

log = logging.getLogger("dinfer.api")

DONE: Final = b"data: [DONE]\n\n"
_encoder: Final = msgspec.json.Encoder()


def timing_for(settings: Settings, prompt_tokens: int) -> Timing:
    """The TTFT deadline grows with the prompt: base + per-token cost of prefill."""
    ttft = settings.ttft_base_s + prompt_tokens * settings.ttft_per_token_ms / 1000
    return Timing(
        ttft=ttft,
        speculative_ratio=settings.speculative_ratio,
        preamble=settings.preamble_timeout_s,
        inference=settings.inference_timeout_s,
    )


class ChatCompletions:
    """The ASGI handler of `/v1/chat/completions`."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor
        self._settings = supervisor.settings

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        request_id = str(uuid.uuid4())
        ident = [(b"x-request-id", request_id.encode())]
        if scope["method"] != "POST":
            await drain(receive)
            await send_error(send, 405, "use POST", "method_not_allowed", headers=ident)
            return
        try:
            raw = await read_body(scope, receive, self._settings.max_body_bytes)
        except ClientGone:
            return
        except BodyTooLarge:
            limit = self._settings.max_body_bytes
            await send_error(
                send,
                413,
                f"the request body exceeds {limit} bytes",
                "request_too_large",
                headers=ident,
            )
            return
        if not await self._authorized(scope):
            await send_error(
                send,
                401,
                "a valid API key is required (Authorization: Bearer KEY)",
                "invalid_api_key",
                headers=ident,
            )
            return
        if self._sup.draining:
            await send_error(
                send,
                503,
                "the daemon is shutting down",
                "shutting_down",
                retry_after=5,
                headers=ident,
            )
            return
        try:
            request = parse_chat_request(raw)
        except BadRequest as exc:
            await send_error(send, 400, str(exc), "invalid_request", exc.param, headers=ident)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, receive, nursery.cancel_scope)
            await self._serve(request, ident, send, nursery)
            nursery.cancel_scope.cancel()

    async def _authorized(self, scope: dict[str, Any]) -> bool:
        value = header(scope, b"authorization") or ""
        scheme, _, key = value.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        return await self._sup.store.find_api_key(key.strip()) is not None

    async def _serve(
        self,
        request: ChatRequest,
        ident: list[tuple[bytes, bytes]],
        send: Send,
        nursery: trio.Nursery,
    ) -> None:
        job = Job(
            traits=request.traits,
            plaintext=request.envelope,
            timing=timing_for(self._settings, request.traits.prompt_tokens),
            max_attempts=self._settings.max_attempts,
        )
        try:
            committed = await dispatch(job, self._sup.registry, self._sup.queue)
        except DispatchFailed as exc:
            await send_error(
                send, exc.status, str(exc), exc.code, retry_after=exc.retry_after, headers=ident
            )
            return
        relay = TimedSend(send)
        limit = self._settings.inference_timeout_s
        nursery.start_soon(_abandon_if_stalled, relay, committed, limit)
        try:
            headers = [*ident, *_commit_headers(committed)]
            if request.stream:
                await _stream(
                    relay, committed, headers, request.include_usage, request.traits.model
                )
            else:
                await _complete(relay, committed, headers, request.traits.model)
        finally:
            committed.close()


class TimedSend:
    """The consumer's `send`, remembering since when a write has been waiting."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.waiting_since: float | None = None

    async def __call__(self, message: dict[str, Any]) -> None:
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


def _commit_headers(committed: Committed) -> list[tuple[bytes, bytes]]:
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


async def _stream(
    send: Send,
    committed: Committed,
    headers: list[tuple[bytes, bytes]],
    include_usage: bool,
    model: str,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *headers,
            ],
        }
    )
    usage_sent = False
    parts: list[bytes] = []
    event = await committed.next_event()
    while event is not None:
        if isinstance(event, InBandError):
            error = _encoder.encode({"error": {"type": event.kind, "message": event.message}})
            parts.append(b"data: " + error + b"\n\n")
            break
        usage_only = _usage_only(event.event)
        usage_sent = usage_sent or usage_only
        if include_usage or not usage_only:
            parts.append(event.line.encode() + b"\n\n")
        polled = committed.poll()
        if polled is Nothing.BUFFERED:  # nothing more waiting: write what we have, then wait
            await _body(send, b"".join(parts), more=True)
            parts = []
            event = await committed.next_event()
        else:
            event = polled
    else:
        if include_usage and not usage_sent and committed.usage is not None:
            parts.append(_usage_chunk(committed, model))
    parts.append(DONE)
    await _body(send, b"".join(parts), more=False)


def _usage_chunk(committed: Committed, model: str) -> bytes:
    """The usage chunk the consumer asked for, built from `inference_complete`."""
    assert committed.usage is not None
    usage = committed.usage
    chunk = {
        "id": f"chatcmpl-{committed.racer.stream.request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    }
    return b"data: " + _encoder.encode(chunk) + b"\n\n"


def _usage_only(event: dict[str, Any] | None) -> bool:
    """The usage chunk the daemon always asks providers for, unasked by this consumer."""
    return event is not None and not event.get("choices") and event.get("usage") is not None


async def _body(send: Send, data: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _complete(
    send: Send, committed: Committed, headers: list[tuple[bytes, bytes]], model: str
) -> None:
    assembler = CompletionAssembler(model)
    while (event := await committed.next_event()) is not None:
        if isinstance(event, InBandError):
            status = 504 if event.kind == "timeout" else 502
            await send_error(
                send,
                status,
                f"the provider failed mid-answer: {event.message}",
                event.kind,
                headers=headers,
            )
            return
        assembler.add(event.event)
    await send_json(send, 200, _encoder.encode(assembler.result(committed.usage)), headers)
