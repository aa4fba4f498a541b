"""Provider sessions over real sockets: registration refusals, superseding, malformed frames,
disconnects, attestation challenges and heartbeats (PROTOCOL.md §1, §4, §5).

Refusals and frame-level faults use a raw trio-websocket connection (`RawProvider`) so a test
controls every byte; well-behaved providers are `FakeProvider`s. Ordering proofs lean on the
session's one reader: frames are handled in the order sent, so a verdict for a challenge
answered after some frames proves those frames were handled first, without any sleep.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from itertools import cycle, islice
from typing import Any, TypeVar

import httpx
import msgspec
import pytest
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    wrap_client_stream,
)

from daemon.api.serve import RunningDaemon
from daemon.routing.session import MAX_MALFORMED_FRAMES, ProviderSession
from daemon.routing.types import ProviderEntry, RequestTraits
from protocol import crypto
from protocol.messages import (
    MAX_CONCURRENCY,
    MAX_FRAME_BYTES,
    MAX_LABEL_CHARS,
    MAX_MODEL_ID_CHARS,
    MAX_MODELS,
    AttestationChallenge,
    AttestationResponse,
    DaemonMessage,
    Heartbeat,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceResponseChunk,
    ModelInfo,
    ModelsUpdate,
    ProtocolError,
    TrustStatus,
    Usage,
    decode_daemon_frame,
    encode,
)
from tests.conftest import ADMIN_KEY, StartDaemon
from tests.consumer_harness import OpenApi, assert_openai_error, chat_body, in_turn
from tests.fakes.provider import (
    Chunk,
    Cleartext,
    Complete,
    FakeProvider,
    Hold,
    Plaintext,
    Stall,
    Step,
    always,
    answer,
    content_chunk,
    finish_chunk,
    open_provider_socket,
    role_chunk,
)

M = TypeVar("M")
BOUND_S = 5  # every wait in this module is bounded: a hang fails, it never stalls the suite

# Helpers ------------------------------------------------------------------------------------

_ABSENT: Any = object()  # a register field to leave out


class RawProvider:
    """A provider whose every frame the test writes by hand."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.identity = crypto.generate_identity_key()
        self.box_key = crypto.generate_box_key()

    @property
    def provider_id(self) -> str:
        return crypto.provider_id(self.identity.verify_key)

    def register_fields(self, **changes: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "type": "register",
            "protocol": 1,
            "version": "0.7.0",
            "backend": "fake",
            "public_key": crypto.encode_key(self.box_key.public_key),
            "identity_key": crypto.encode_key(self.identity.verify_key),
            "models": [{"id": "m"}],
        }
        fields.update(changes)
        return {k: v for k, v in fields.items() if v is not _ABSENT}

    async def send(self, frame: Any) -> None:
        """Send a raw text or binary frame, a dict as JSON text, or a protocol message."""
        if isinstance(frame, dict):
            frame = msgspec.json.encode(frame).decode()
        elif not isinstance(frame, str | bytes):
            frame = encode(frame)
        await self.ws.send_message(frame)

    async def register(self, **changes: Any) -> AttestationChallenge:
        """Register and return the challenge the daemon sends at once."""
        await self.send(self.register_fields(**changes))
        return await self.expect(AttestationChallenge)

    async def expect(self, kind: type[M]) -> M:
        message = await self.receive()
        assert isinstance(message, kind), message
        return message

    async def receive(self) -> DaemonMessage:
        message = decode_daemon_frame(await self.ws.get_message())
        assert not isinstance(message, ProtocolError), message
        return message

    async def answer(self, challenge: AttestationChallenge, *, correct: bool = True) -> None:
        signed_nonce = challenge.nonce if correct else challenge.nonce + "x"
        signature = crypto.sign_challenge(self.identity, signed_nonce, challenge.timestamp)
        await self.send(AttestationResponse(nonce=challenge.nonce, signature=signature))

    async def become_trusted(self) -> None:
        await self.answer(await self.register())
        assert (await self.expect(TrustStatus)).status == "trusted"

    async def closed(self) -> CloseReason:
        """Read until the daemon closes the connection; fail on any other frame."""
        with pytest.raises(ConnectionClosed) as closed:
            frame = await self.ws.get_message()
            raise AssertionError(f"expected the connection to close, got {frame!r}")
        reason = closed.value.reason
        assert reason is not None
        return reason


@asynccontextmanager
async def raw_provider(daemon: RunningDaemon) -> AsyncIterator[RawProvider]:
    async with open_provider_socket(daemon.provider_url) as ws:
        yield RawProvider(ws)


async def refused(daemon: RunningDaemon, frame: Any) -> tuple[TrustStatus, CloseReason]:
    """Send one first frame; return the daemon's verdict and how it closed the connection."""
    async with raw_provider(daemon) as provider:
        if frame is not None:
            await provider.send(frame(provider) if callable(frame) else frame)
        verdict = await provider.expect(TrustStatus)
        return verdict, await provider.closed()


def assert_rejected(verdict: TrustStatus, close: CloseReason, *reason_parts: str) -> None:
    assert verdict.status == "rejected"
    assert verdict.reason is not None
    for part in reason_parts:
        assert part in verdict.reason, (part, verdict.reason)
    assert close.code == 1008
    assert close.reason == verdict.reason[:120]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def session_of(entry: ProviderEntry | None) -> ProviderSession:
    assert entry is not None
    assert isinstance(entry.session, ProviderSession)
    return entry.session


def ready(daemon: RunningDaemon, model: str = "m") -> str:
    return daemon.supervisor.registry.preflight(RequestTraits(model=model)).verdict


async def started(nursery: trio.Nursery, fake: FakeProvider) -> FakeProvider:
    with trio.fail_after(BOUND_S):
        started_fake: FakeProvider = await nursery.start(fake.run)
    return started_fake


async def issue_token(daemon: RunningDaemon) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=daemon.base_url) as client:
        reply = await client.post(
            "/v1/admin/provider-tokens",
            json={"name": "rig"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
    assert reply.status_code == 201, reply.text
    return reply.json()["id"], reply.json()["token"]


async def revoke_token(daemon: RunningDaemon, token_id: str) -> None:
    async with httpx.AsyncClient(base_url=daemon.base_url) as client:
        reply = await client.delete(
            f"/v1/admin/provider-tokens/{token_id}",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
    assert reply.status_code == 200, reply.text


# Registration refusals ----------------------------------------------------------------------

Frame = Callable[[RawProvider], Any]

REFUSALS: list[tuple[str, Frame, tuple[str, ...]]] = [
    (
        "wrong protocol version",
        lambda p: p.register_fields(protocol=2),
        ("unsupported protocol version 2",),
    ),
    (
        "public_key not base64",
        lambda p: p.register_fields(public_key="not base64!"),
        ("public_key", "base64"),
    ),
    (
        "identity_key not base64",
        lambda p: p.register_fields(identity_key="@@@@"),
        ("identity_key", "base64"),
    ),
    (
        "public_key too short",
        lambda p: p.register_fields(public_key=b64(b"k" * 31)),
        ("public_key must be 32 bytes, got 31",),
    ),
    (
        "identity_key too long",
        lambda p: p.register_fields(identity_key=b64(b"k" * 33)),
        ("identity_key must be 32 bytes, got 33",),
    ),
    (
        "public_key a low-order point",
        lambda p: p.register_fields(public_key=b64(bytes(32))),
        ("public_key",),
    ),
    (
        "empty model id",
        lambda p: p.register_fields(models=[{"id": "m"}, {"id": ""}]),
        ("$.models[1].id",),
    ),
    (
        "duplicate model ids",
        lambda p: p.register_fields(models=[{"id": "m"}, {"id": "n"}, {"id": "m"}]),
        ("repeats a model id",),
    ),
    (
        "missing identity_key",
        lambda p: p.register_fields(identity_key=_ABSENT),
        ("missing field 'identity_key'",),
    ),
    (
        "missing models",
        lambda p: p.register_fields(models=_ABSENT),
        ("missing field 'models'",),
    ),
    (
        "protocol of the wrong JSON type",
        lambda p: p.register_fields(protocol="1"),
        ("expected 'int', got 'str'", "$.protocol"),
    ),
    (
        "max_concurrency zero",
        lambda p: p.register_fields(max_concurrency=0),
        ("$.max_concurrency",),
    ),
    (
        "too many models",
        lambda p: p.register_fields(models=[{"id": f"m{i}"} for i in range(MAX_MODELS + 1)]),
        ("$.models", f"length <= {MAX_MODELS}"),
    ),
    (
        "model id too long",
        lambda p: p.register_fields(models=[{"id": "m" * (MAX_MODEL_ID_CHARS + 1)}]),
        ("$.models[0].id", f"length <= {MAX_MODEL_ID_CHARS}"),
    ),
    (
        "quantization too long",
        lambda p: p.register_fields(models=[{"id": "m", "quantization": "q" * 65}]),
        ("$.models[0].quantization", f"length <= {MAX_LABEL_CHARS}"),
    ),
    (
        "version too long",
        lambda p: p.register_fields(version="1." * 40),
        ("$.version", f"length <= {MAX_LABEL_CHARS}"),
    ),
    (
        "backend too long",
        lambda p: p.register_fields(backend="b" * (MAX_LABEL_CHARS + 1)),
        ("$.backend", f"length <= {MAX_LABEL_CHARS}"),
    ),
    (
        "max_concurrency too high",
        lambda p: p.register_fields(max_concurrency=100_000),
        ("$.max_concurrency", f"<= {MAX_CONCURRENCY}"),
    ),
    (
        "heartbeat first",
        lambda p: Heartbeat(active_requests=0),
        ("expected a register frame first, got 'heartbeat'",),
    ),
    (
        "binary frame",
        lambda p: msgspec.json.encode(p.register_fields()),
        ("binary frames are not part of the protocol",),
    ),
    ("not JSON", lambda p: "{register", ("malformed JSON",)),
    ("not an object", lambda p: '["register"]', ("expected object, got array",)),
    ("no type", lambda p: '{"protocol": 1}', ("missing field 'type'",)),
    ("unknown type", lambda p: '{"type": "hello"}', ("unknown type 'hello'",)),
    (
        "oversized frame",
        lambda p: p.register_fields(backend="x" * MAX_FRAME_BYTES),
        ("exceeds the 10 MiB limit",),
    ),
    (
        # Under 10 Mi characters but over 10 MiB of UTF-8: the limit is on bytes.
        "oversized frame in multi-byte characters",
        lambda p: p.register_fields(backend="é" * (MAX_FRAME_BYTES // 2 + 1)),
        ("exceeds the 10 MiB limit",),
    ),
]


@pytest.mark.parametrize(
    ("frame", "reason_parts"),
    [pytest.param(frame, parts, id=name) for name, frame, parts in REFUSALS],
)
async def test_a_bad_first_frame_is_rejected_with_a_reason_and_1008(
    daemon: RunningDaemon, frame: Frame, reason_parts: tuple[str, ...]
) -> None:
    with trio.fail_after(BOUND_S):
        verdict, close = await refused(daemon, frame)
    assert_rejected(verdict, close, *reason_parts)
    assert daemon.supervisor.registry.providers() == []


async def test_a_register_at_every_bound_is_admitted(daemon: RunningDaemon) -> None:
    models = [
        {"id": f"{i:03}" + "m" * (MAX_MODEL_ID_CHARS - 3), "quantization": "q" * MAX_LABEL_CHARS}
        for i in range(MAX_MODELS)
    ]
    fields = {"version": "9" * MAX_LABEL_CHARS, "backend": "b" * MAX_LABEL_CHARS}
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            await provider.register(models=models, max_concurrency=MAX_CONCURRENCY, **fields)
            entry = daemon.supervisor.registry.get(provider.provider_id)
            assert entry is not None
            assert len(entry.models) == MAX_MODELS and entry.max_concurrency == MAX_CONCURRENCY


async def test_no_register_within_the_timeout_is_rejected(start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(register_timeout_s="0.2")
    with trio.fail_after(BOUND_S):
        verdict, close = await refused(daemon, None)
    assert_rejected(verdict, close, "no register frame within 0.2 s")


async def test_a_hang_up_before_register_leaves_the_daemon_serving(
    daemon: RunningDaemon, nursery: trio.Nursery
) -> None:
    async with raw_provider(daemon):
        pass
    async with raw_provider(daemon) as provider:
        await provider.send('{"type": ')
        await provider.ws.aclose()
    fake = await started(nursery, FakeProvider(daemon.provider_url))
    assert fake.trusted.is_set()


async def test_token_mode_rejects_a_register_without_auth_token(
    start_daemon: StartDaemon,
) -> None:
    daemon = await start_daemon(provider_auth="token")
    with trio.fail_after(BOUND_S):
        verdict, close = await refused(daemon, lambda p: p.register_fields())
    assert_rejected(verdict, close, "auth_token is required")


async def test_token_mode_rejects_an_unknown_auth_token(start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(provider_auth="token")
    with trio.fail_after(BOUND_S):
        verdict, close = await refused(
            daemon, lambda p: p.register_fields(auth_token="dpt_made_up")
        )
    assert_rejected(verdict, close, "auth_token is unknown or revoked")


async def test_token_mode_rejects_a_revoked_auth_token(start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(provider_auth="token")
    token_id, token = await issue_token(daemon)
    await revoke_token(daemon, token_id)
    with trio.fail_after(BOUND_S):
        verdict, close = await refused(daemon, lambda p: p.register_fields(auth_token=token))
    assert_rejected(verdict, close, "auth_token is unknown or revoked")


async def test_token_mode_admits_a_live_auth_token(
    start_daemon: StartDaemon, nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(provider_auth="token")
    token_id, token = await issue_token(daemon)
    fake = await started(nursery, FakeProvider(daemon.provider_url, auth_token=token))
    assert fake.trusted.is_set()
    entry = daemon.supervisor.registry.get(fake.provider_id)
    assert entry is not None and entry.token_id == token_id


# Superseding and impostors ------------------------------------------------------------------


async def claim(provider: RawProvider, victim: FakeProvider, **changes: Any) -> None:
    """Register as `victim`'s identity without its signing key (`provider` signs with its own)."""
    await provider.send(
        provider.register_fields(
            identity_key=crypto.encode_key(victim.identity.verify_key), **changes
        )
    )


async def stream_text(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The content deltas of a streamed chat completion, as they arrive."""
    async for line in lines:
        if line.startswith("data: {"):
            for choice in json.loads(line.removeprefix("data: "))["choices"]:
                if choice["delta"].get("content"):
                    yield choice["delta"]["content"]


@pytest.mark.parametrize("auth", ["open", "token"])
async def test_an_impostor_of_a_live_identity_is_closed_and_the_live_session_never_notices(
    open_api: OpenApi, auth: str
) -> None:
    api = await open_api(provider_auth=auth)
    tokens = [(await issue_token(api.daemon))[1] if auth == "token" else None for _ in "ab"]
    registry = api.daemon.supervisor.registry
    release = trio.Event()
    script = [role_chunk(), content_chunk("Hello"), Hold(release), content_chunk(" world")]
    (victim,) = await api.connect(
        api.fake(
            always([*script, finish_chunk(), Chunk("data: [DONE]"), Complete()]),
            auth_token=tokens[0],
        )
    )
    live = registry.get(victim.provider_id)
    body = chat_body(stream=True)
    with trio.fail_after(BOUND_S):
        async with (
            api.client.stream(
                "POST", "/v1/chat/completions", json=body, headers=api.auth
            ) as response,
            aclosing(stream_text(response.aiter_lines())) as texts,
        ):
            assert await anext(texts) == "Hello"  # the request is in flight on the victim
            async with raw_provider(api.daemon) as impostor:
                await claim(impostor, victim, auth_token=tokens[1])
                challenge = await impostor.expect(AttestationChallenge)
                # Challenged, but not routable and not the victim's entry.
                assert registry.get(victim.provider_id) is live
                assert registry.providers() == [live]
                await impostor.answer(challenge)  # signed with a key that is not the identity
                verdict = await impostor.expect(TrustStatus)
                close = await impostor.closed()
            release.set()
            assert [text async for text in texts] == [" world"]
    assert response.status_code == 200
    assert verdict.status == "rejected" and verdict.reason is not None
    assert "first challenge" in verdict.reason
    assert close.code == 1008
    assert not victim.closed.is_set() and victim.cancels == []
    assert registry.get(victim.provider_id) is live and registry.providers() == [live]
    assert live.trusted and live.challenge_failures == 0
    assert ready(api.daemon) == "ready"


async def test_a_reconnect_supersedes_the_live_session_only_once_it_passes_its_challenge(
    daemon: RunningDaemon, nursery: trio.Nursery
) -> None:
    registry = daemon.supervisor.registry
    first = await started(nursery, FakeProvider(daemon.provider_url))
    old_entry = registry.get(first.provider_id)
    in_flight = session_of(old_entry).open_stream("rid")
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as second:
            second.identity, second.box_key = first.identity, first.box_key  # the same node
            challenge = await second.register()
            assert registry.get(first.provider_id) is old_entry
            assert not first.closed.is_set()

            await second.answer(challenge)
            assert await second.receive() == TrustStatus(status="trusted")
            await first.closed.wait()
            with pytest.raises(trio.EndOfChannel):
                await in_flight.receive()
            assert first.close_code == 4001
            new_entry = registry.get(first.provider_id)
            assert new_entry is not None and new_entry is not old_entry
            assert session_of(new_entry) is not session_of(old_entry)
            assert registry.providers() == [new_entry]
            assert ready(daemon) == "ready"


async def test_a_public_key_registered_by_another_live_identity_is_rejected(
    daemon: RunningDaemon, nursery: trio.Nursery
) -> None:
    registry = daemon.supervisor.registry
    owner = await started(nursery, FakeProvider(daemon.provider_url))
    owners_key = crypto.encode_key(owner.box_key.public_key)
    with trio.fail_after(BOUND_S):
        verdict, close = await refused(daemon, lambda p: p.register_fields(public_key=owners_key))
    assert_rejected(verdict, close, "public_key is already registered by another provider")
    assert [entry.provider_id for entry in registry.providers()] == [owner.provider_id]
    assert not owner.closed.is_set()


async def test_revoking_a_token_closes_a_newcomer_still_waiting_for_its_first_challenge(
    start_daemon: StartDaemon, nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(provider_auth="token")
    registry = daemon.supervisor.registry
    _, own_token = await issue_token(daemon)
    victim = await started(nursery, FakeProvider(daemon.provider_url, auth_token=own_token))
    token_id, token = await issue_token(daemon)
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as impostor:
            await claim(impostor, victim, auth_token=token)
            await impostor.expect(AttestationChallenge)
            await revoke_token(daemon, token_id)
            close = await impostor.closed()
    assert close.code == 1008 and close.reason == "provider token revoked"
    assert not victim.closed.is_set()
    assert [entry.provider_id for entry in registry.providers()] == [victim.provider_id]


# Encryption violations (PROTOCOL.md §3) ----------------------------------------------------

VIOLATIONS = [
    pytest.param(Cleartext(content_chunk("leaked").line), id="plaintext data"),
    pytest.param(Cleartext(content_chunk("leaked").line, sealed=True), id="data beside a box"),
    pytest.param(Cleartext(None), id="no payload at all"),
    pytest.param(Plaintext(), id="a box under a foreign key"),
]


@pytest.mark.parametrize("violation", VIOLATIONS)
async def test_a_chunk_breaking_the_encryption_contract_fails_over_at_once_and_untrusts(
    open_api: OpenApi, violation: Step
) -> None:
    # The backup attempt's timer would start one after 50 s: answering within api.chat's
    # bound proves the first attempt failed the moment the chunk arrived.
    api = await open_api(ttft_base_s="100")
    behaviour = in_turn([role_chunk(), violation, Stall()], answer("Hello", " world"))
    fakes = await api.connect(api.fake(behaviour), api.fake(behaviour))

    reply = await api.chat()

    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "Hello world"
    registry = api.daemon.supervisor.registry
    entries = {fake.provider_id: registry.get(fake.provider_id) for fake in fakes}
    (culprit,) = [fake for fake in fakes if fake.cancels]  # told to stop its stalled stream
    entry = entries[culprit.provider_id]
    assert entry is not None and not entry.trusted
    assert entry.banned_reason == "provider returned invalid encrypted chunk"
    assert registry.refusal(entry, RequestTraits(model="m")) == "untrusted"
    assert all(e is not None and e.trusted for e in entries.values() if e is not entry)


# Malformed frames and unknown request ids ----------------------------------------------------

MALFORMED: list[Any] = [
    "not json",
    b'{"type": "heartbeat", "active_requests": 0}',
    '{"type": "hello"}',
    '{"type": "heartbeat"}',
    '{"type": "heartbeat", "active_requests": -1}',
    '{"type": "inference_complete", "request_id": 7, "usage": {}}',
    # A models_update naming a model twice is refused and counted like a bad frame.
    ModelsUpdate(models=[ModelInfo(id="a"), ModelInfo(id="a")]),
]


async def test_malformed_frames_get_no_reply_until_the_bound_then_1008(
    daemon: RunningDaemon,
) -> None:
    registry = daemon.supervisor.registry
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            challenge = await provider.register()
            kinds = [*MALFORMED, provider.register_fields()]  # a second register is malformed
            for frame in islice(cycle(kinds), MAX_MALFORMED_FRAMES):
                await provider.send(frame)
            # Frames are handled in order: any reply to a bad frame would come before this.
            await provider.answer(challenge)
            assert await provider.receive() == TrustStatus(status="trusted")
            entry = registry.get(provider.provider_id)
            assert entry is not None and entry.models.keys() == {"m"}

            await provider.send("one too many")
            close = await provider.closed()
    assert close.code == 1008
    assert "malformed" in (close.reason or "")
    assert registry.providers() == []


async def test_a_models_update_past_the_bounds_is_dropped_and_the_old_list_kept(
    daemon: RunningDaemon,
) -> None:
    registry = daemon.supervisor.registry
    too_many = ModelsUpdate(models=[ModelInfo(id=f"m{i}") for i in range(MAX_MODELS + 1)])
    too_long = ModelsUpdate(models=[ModelInfo(id="m" * (MAX_MODEL_ID_CHARS + 1))])
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            challenge = await provider.register()
            for _ in range(MAX_MALFORMED_FRAMES // 2):
                await provider.send(too_many)
                await provider.send(too_long)
            await provider.answer(challenge)  # handled after the updates: they came first
            assert await provider.receive() == TrustStatus(status="trusted")
            entry = registry.get(provider.provider_id)
            assert entry is not None and entry.models.keys() == {"m"}
            await provider.send(too_many)  # each one counted as malformed: this is one too many
            close = await provider.closed()
    assert close.code == 1008 and "malformed" in (close.reason or "")


async def test_frames_for_unknown_request_ids_are_dropped_and_not_counted(
    daemon: RunningDaemon,
) -> None:
    registry = daemon.supervisor.registry
    payload = crypto.seal_request(b"data: {}", crypto.generate_box_key().public_key)[0]
    ghosts = [
        InferenceAccepted(request_id="ghost"),
        InferenceResponseChunk(request_id="ghost", encrypted_data=payload),
        InferenceComplete(request_id="ghost", usage=Usage(prompt_tokens=1, completion_tokens=1)),
        InferenceError(request_id="ghost", error="gone", status_code=500),
    ]
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            challenge = await provider.register()
            known = session_of(registry.get(provider.provider_id)).open_stream("known")
            for _ in range(MAX_MALFORMED_FRAMES):
                for frame in ghosts:
                    await provider.send(frame)
            await provider.send(InferenceAccepted(request_id="known"))
            await provider.answer(challenge)
            assert await provider.receive() == TrustStatus(status="trusted")
            assert registry.get(provider.provider_id) is not None
    assert known.receive_nowait() == InferenceAccepted(request_id="known")
    with pytest.raises(trio.EndOfChannel):
        known.receive_nowait()  # the session ended when the provider hung up


async def test_a_terminal_ends_its_request_stream_and_later_frames_are_dropped(
    daemon: RunningDaemon,
) -> None:
    registry = daemon.supervisor.registry
    done = InferenceComplete(request_id="r1", usage=Usage(prompt_tokens=2, completion_tokens=3))
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            challenge = await provider.register()
            stream = session_of(registry.get(provider.provider_id)).open_stream("r1")
            await provider.send(InferenceAccepted(request_id="r1"))
            await provider.send(done)
            await provider.send(InferenceAccepted(request_id="r1"))
            await provider.answer(challenge)
            await provider.expect(TrustStatus)
            assert [frame async for frame in stream] == [
                InferenceAccepted(request_id="r1"),
                done,
            ]


async def test_heartbeat_and_models_update_change_the_registry_entry(
    daemon: RunningDaemon,
) -> None:
    registry = daemon.supervisor.registry
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            challenge = await provider.register()
            await provider.send(ModelsUpdate(models=[ModelInfo(id="n"), ModelInfo(id="o")]))
            await provider.send(Heartbeat(active_requests=0, status="draining"))
            await provider.answer(challenge)
            await provider.expect(TrustStatus)
            entry = registry.get(provider.provider_id)
            assert entry is not None
            assert entry.models.keys() == {"n", "o"}
            assert entry.draining
            assert ready(daemon, "n") == "unavailable"


# Disconnect ---------------------------------------------------------------------------------


async def test_a_disconnect_ends_every_in_flight_stream_and_removes_the_entry(
    daemon: RunningDaemon,
) -> None:
    registry = daemon.supervisor.registry
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            await provider.become_trusted()
            session = session_of(registry.get(provider.provider_id))
            streams = [session.open_stream(f"r{i}") for i in range(3)]
            assert ready(daemon) == "ready"
        for stream in streams:
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()
    assert registry.get(provider.provider_id) is None
    assert registry.providers() == []


async def test_a_dropped_tcp_connection_ends_streams_and_removes_the_entry(
    daemon: RunningDaemon,
) -> None:
    registry = daemon.supervisor.registry
    host, port = daemon.base_url.removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(BOUND_S):
        async with await trio.open_tcp_stream(host, int(port)) as tcp, trio.open_nursery() as n:
            provider = RawProvider(await wrap_client_stream(n, tcp, host, "/ws/provider"))
            await provider.become_trusted()
            stream = session_of(registry.get(provider.provider_id)).open_stream("r")
            await tcp.aclose()  # no close frame: the provider's machine died
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()
    assert registry.providers() == []


async def test_a_provider_closing_with_1009_mid_request_fails_it_with_502_at_once(
    open_api: OpenApi,
) -> None:
    # A fake reads frames of at most 1 MiB (trio-websocket's default) and closes with 1009
    # on a bigger one. The backup attempt's timer would fire after 50 s: the 502 within
    # api.chat's bound shows the close itself ended the request.
    api = await open_api(ttft_base_s="100")
    (fake,) = await api.connect(api.fake())
    big = [{"role": "user", "content": "x" * (1024 * 1024)}]

    reply = await api.chat(messages=big)

    error = assert_openai_error(reply, 502)
    assert error["message"].startswith("provider disconnected")
    assert fake.close_code == 1009
    assert api.daemon.supervisor.registry.connected() == []


# Challenges ---------------------------------------------------------------------------------


async def test_a_provider_that_passes_its_first_challenge_is_routable(
    daemon: RunningDaemon, nursery: trio.Nursery
) -> None:
    fake = await started(nursery, FakeProvider(daemon.provider_url))
    assert fake.verdicts == [TrustStatus(status="trusted")]
    entry = daemon.supervisor.registry.get(fake.provider_id)
    assert entry is not None and entry.trusted and entry.last_challenge_at is not None
    assert ready(daemon) == "ready"


async def test_a_provider_is_not_routable_before_its_first_challenge_passes(
    daemon: RunningDaemon,
) -> None:
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            challenge = await provider.register()
            assert ready(daemon) != "ready"
            await provider.answer(challenge)
            await provider.expect(TrustStatus)
            assert ready(daemon) == "ready"


async def test_a_provider_that_signs_wrongly_is_untrusted_and_not_routable(
    daemon: RunningDaemon, nursery: trio.Nursery
) -> None:
    fake = await started(nursery, FakeProvider(daemon.provider_url, sign_wrongly=True))
    assert [v.status for v in fake.verdicts] == ["untrusted"]
    assert not fake.closed.is_set()
    entry = daemon.supervisor.registry.get(fake.provider_id)
    assert entry is not None and not entry.trusted
    preflight = daemon.supervisor.registry.preflight(RequestTraits(model="m"))
    assert preflight.verdict == "unavailable"
    assert "untrusted" in preflight.reason


async def test_a_provider_that_always_signs_wrongly_never_becomes_trusted(
    start_daemon: StartDaemon,
) -> None:
    daemon = await start_daemon(challenge_interval_s="0.05")
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            challenge = await provider.register()
            for _ in range(4):
                await provider.answer(challenge, correct=False)
                assert (await provider.expect(TrustStatus)).status == "untrusted"
                assert ready(daemon) == "unavailable"
                challenge = await provider.expect(AttestationChallenge)


async def test_three_consecutive_failures_make_a_trusted_provider_untrusted(
    start_daemon: StartDaemon,
) -> None:
    daemon = await start_daemon(challenge_interval_s="0.05")
    statuses = []
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            await provider.become_trusted()
            for _ in range(3):
                await provider.answer(await provider.expect(AttestationChallenge), correct=False)
                verdict = await provider.expect(TrustStatus)
                statuses.append(verdict.status)
                if verdict.status == "trusted":
                    assert ready(daemon) == "ready"
            assert verdict.reason is not None and "3 failed" in verdict.reason
            assert ready(daemon) == "unavailable"
    assert statuses == ["trusted", "trusted", "untrusted"]


async def test_a_pass_resets_the_consecutive_failure_count(start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(challenge_interval_s="0.05")
    statuses = []
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            await provider.become_trusted()
            for correct in (False, False, True, False, False):
                await provider.answer(await provider.expect(AttestationChallenge), correct=correct)
                statuses.append((await provider.expect(TrustStatus)).status)
    assert statuses == ["trusted"] * 5


async def test_an_unanswered_challenge_counts_as_a_failure(start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(challenge_answer_s="0.05")
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            await provider.register()
            verdict = await provider.expect(TrustStatus)
            entry = daemon.supervisor.registry.get(provider.provider_id)
            assert entry is not None and entry.challenge_failures == 1
    assert verdict.status == "untrusted"


async def test_an_answer_to_an_unknown_nonce_is_ignored(daemon: RunningDaemon) -> None:
    with trio.fail_after(BOUND_S):
        async with raw_provider(daemon) as provider:
            challenge = await provider.register()
            stranger = AttestationChallenge(
                nonce=crypto.new_challenge_nonce(), timestamp=challenge.timestamp
            )
            await provider.answer(stranger)  # correctly signed, but not the daemon's nonce
            await provider.answer(challenge)
            # Had the stranger counted (as a failure or a pass), this verdict would differ or
            # come before the real answer: a failure leaves a new provider untrusted.
            assert await provider.receive() == TrustStatus(status="trusted")


# Heartbeats ---------------------------------------------------------------------------------


async def test_a_silent_provider_is_closed_with_4002_and_removed(
    start_daemon: StartDaemon, nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(heartbeat_timeout_s="0.3")
    registry = daemon.supervisor.registry
    beating = await started(nursery, FakeProvider(daemon.provider_url, heartbeat_every=0.02))
    silent = await started(nursery, FakeProvider(daemon.provider_url))
    with trio.fail_after(BOUND_S):
        await silent.closed.wait()
    assert silent.close_code == 4002
    assert registry.get(silent.provider_id) is None
    # The beating provider registered before the silent one, so it has outlived a whole
    # heartbeat timeout on heartbeats alone.
    assert not beating.closed.is_set()
    assert registry.get(beating.provider_id) is not None
