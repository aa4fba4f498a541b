"""The attack catalogue of the security suite: hostile clients and providers against a real
daemon, each attack reporting whether the daemon refused it.

Shared by `tests/test_security_*.py` (each test runs a category in-process and asserts every
attack was refused and nothing leaked) and `scripts/attack.py` (every category against one
daemon it starts, printing the counts). An attack is an async function of a `Target`; it
returns one `Verdict` per thing it tried. It asserts nothing itself: a result the daemon should
not have given is a `Verdict` with `refused=False` and the reason, so the script can count it.

Routes are enumerated from the code (`daemon.api.app.create_router`: the Router's routes and
prefixes, and the quart app's url_map for the admin API), so a route added later is attacked
without anyone listing it here.
"""

from __future__ import annotations

import json
import re
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import trio
import trio_websocket
from nacl.signing import SigningKey

from daemon.api.app import create_router
from daemon.api.serve import RunningDaemon
from protocol import crypto
from protocol.messages import (
    AttestationChallenge,
    AttestationResponse,
    InferenceComplete,
    InferenceError,
    InferenceResponseChunk,
    ModelInfo,
    Register,
    TrustStatus,
    Usage,
    decode_daemon_frame,
    encode,
)
from tests.fakes.provider import (
    Chunk,
    Cleartext,
    Complete,
    FakeProvider,
    Hold,
    Plaintext,
    Script,
    Stall,
    Step,
    Wait,
    answer,
    content_chunk,
    finish_chunk,
    open_provider_socket,
    role_chunk,
)

# Routes that need no credential; /ws/provider has its own (attacked by the provider category).
PUBLIC: Final = frozenset({"/health", "/readyz"})
# What stands for an id in a path parameter (`<key_id>`, a model id after `/v1/models/`).
SAMPLE_ID: Final = "attack-sample-id"
# The message text of every honest request: the log check greps for it.
SECRET_TEXT: Final = "the-password-is-swordfish-4711"
BOUND_S: Final = 8.0
# What the target daemon is started with (`target_env`): short bounds, so attacks end fast.
QUEUE_MAX: Final = 2
KEEPALIVE_S: Final = 1.0
BODY_TIMEOUT_S: Final = 1.0
INFERENCE_TIMEOUT_S: Final = 2.0
CHALLENGE_ANSWER_S: Final = 0.3


def target_env() -> dict[str, str]:
    """The settings (without the DINFER_ prefix) of a daemon the whole catalogue runs against."""
    return {
        "queue_max": str(QUEUE_MAX),
        "keepalive_timeout_s": str(KEEPALIVE_S),
        "body_read_timeout_s": str(BODY_TIMEOUT_S),
        "inference_timeout_s": str(INFERENCE_TIMEOUT_S),
        "ttft_base_s": "1",
        "preamble_timeout_s": "0.5",
        "hedge_mode": "off",
        "challenge_interval_s": "0.4",
        "challenge_answer_s": str(CHALLENGE_ANSWER_S),
        "register_timeout_s": "1",
    }


@dataclass(frozen=True)
class Verdict:
    category: str
    attack: str
    refused: bool
    detail: str = ""


@dataclass
class Target:
    """A running daemon, the credentials an attacker may hold, and an honest provider."""

    daemon: RunningDaemon
    admin_key: str
    nursery: trio.Nursery
    key: str = ""  # a live consumer key
    revoked_key: str = ""
    # (description, credential) pairs that must be refused like no credential at all.
    dead_keys: list[tuple[str, str]] = field(default_factory=list)
    honest: FakeProvider | None = None
    releases: list[trio.Event] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)  # everything the log check greps for

    @property
    def sup(self) -> Any:
        return self.daemon.supervisor

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.daemon.base_url, timeout=BOUND_S)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}


def _held(target: Target) -> Script:
    """The honest provider's answer to a request that asks to be held: committed (content
    sent), then held until the test releases it."""
    release = trio.Event()
    target.releases.append(release)
    return [
        role_chunk("h"),
        content_chunk("held", "h"),
        Hold(release),
        content_chunk(" and done", "h"),
        finish_chunk("h"),
        Chunk("data: [DONE]"),
        Complete(),
    ]


def _honest_behaviour(target: Target) -> Callable[[dict[str, Any]], Script]:
    def behave(body: dict[str, Any]) -> Script:
        if body.get("model") == "h":
            return _held(target)
        return answer("honest", " answer", model=body.get("model", "m"))

    return behave


async def prepare(target: Target) -> None:
    """Issue the credentials (a live key, a revoked one, a provider token) and connect the
    honest provider, which serves `m` at once and `h` held (see `_held`)."""
    async with target.client() as client:
        target.key = await _issue_key(client, target.admin, "attacker-live")
        target.revoked_key = await _issue_key(client, target.admin, "attacker-revoked")
        key_id = _issued[target.revoked_key]
        response = await client.delete(f"/v1/admin/keys/{key_id}", headers=target.admin)
        assert response.status_code == 200, response.text
        expired = await _issue_key(client, target.admin, "attacker-expired")
        past = {"expires_at": "2001-01-01T00:00:00Z"}
        response = await client.patch(
            f"/v1/admin/keys/{_issued[expired]}", json=past, headers=target.admin
        )
        assert response.status_code == 200, response.text
        rotated = await _issue_key(client, target.admin, "attacker-rotated")
        response = await client.post(
            f"/v1/admin/keys/{_issued[rotated]}/rotate", headers=target.admin
        )
        assert response.status_code == 200, response.text
        response = await client.post(
            "/v1/admin/provider-tokens", json={"name": "honest"}, headers=target.admin
        )
        token = response.json()["token"]
    target.dead_keys += [
        ("revoked", target.revoked_key),
        ("expired", expired),
        ("rotated-away", rotated),
    ]
    target.secrets += [target.admin_key, target.key, target.revoked_key, token, SECRET_TEXT]
    target.secrets += [expired, rotated]
    honest = FakeProvider(
        target.daemon.provider_url,
        behaviour=_honest_behaviour(target),
        models=[ModelInfo(id="m"), ModelInfo(id="h"), ModelInfo(id="q")],
        auth_token=token,
        max_concurrency=8,
    )
    await target.nursery.start(honest.run)
    assert honest.trusted.is_set(), honest.verdicts
    target.honest = honest


_issued: dict[str, str] = {}  # secret -> id, for revoking what `_issue_key` made


async def _issue_key(client: httpx.AsyncClient, admin: dict[str, str], name: str) -> str:
    response = await client.post("/v1/admin/keys", json={"name": name}, headers=admin)
    assert response.status_code == 201, response.text
    issued = response.json()
    _issued[issued["key"]] = issued["id"]
    return str(issued["key"])


def chat(text: str = SECRET_TEXT, model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


# Error shapes ---------------------------------------------------------------------------------


def openai_shaped(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and set(body) == {"error"}
        and isinstance(body["error"], dict)
        and set(body["error"]) == {"type", "message", "code", "param"}
    )


def anthropic_shaped(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and body.get("type") == "error"
        and isinstance(body.get("error"), dict)
        and {"type", "message"} <= set(body["error"])
    )


def anthropic_route(path: str) -> bool:
    return path.startswith("/v1/messages")


def shaped(path: str, response: httpx.Response, anthropic: bool | None = None) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    if anthropic if anthropic is not None else anthropic_route(path):
        return anthropic_shaped(body)
    return openai_shaped(body)


# Route table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    path: str  # with SAMPLE_ID for every path parameter
    methods: tuple[str, ...]  # the router's own routes don't say: both are tried
    admin: bool


def route_table(daemon: RunningDaemon) -> list[Route]:
    """Every HTTP route the daemon serves, read from the code, except PUBLIC."""
    router = create_router(daemon.supervisor)
    table: list[Route] = []
    for (kind, path), _handler in router.routes.items():
        if kind == "http" and path not in PUBLIC:
            table.append(Route(path, ("GET", "POST"), path.startswith("/v1/admin")))
    for (kind, prefix), _handler in router.prefixes.items():
        if kind == "http":
            table.append(Route(prefix + SAMPLE_ID, ("GET", "POST"), prefix.startswith("/v1/admin")))
    for rule in router.fallback.url_map.iter_rules():
        path = re.sub(r"<[^>]*>", SAMPLE_ID, rule.rule)
        if path in PUBLIC or rule.websocket:
            continue
        methods = tuple(sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}))
        table.append(Route(path, methods, path.startswith("/v1/admin")))
    return table


async def _call(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], body: bytes
) -> httpx.Response:
    with trio.fail_after(BOUND_S):
        return await client.request(
            method,
            path,
            content=body if method in ("POST", "PUT", "PATCH") else None,
            headers={"content-type": "application/json", **headers},
        )


def _credentials(target: Target, route: Route) -> Iterator[tuple[str, dict[str, str]]]:
    yield "no credential", {}
    yield "a wrong bearer key", {"Authorization": "Bearer dk_wrong0000000000000000000000"}
    yield "a wrong x-api-key", {"x-api-key": "dk_wrong0000000000000000000000"}
    yield "a bearer of spaces", {"Authorization": "Bearer  x"[:-1] + "-"}
    yield "a Basic scheme", {"Authorization": f"Basic {target.key}"}
    for name, secret in target.dead_keys:
        yield f"a {name} key", {"Authorization": f"Bearer {secret}"}
        yield f"a {name} x-api-key", {"x-api-key": secret}
    if route.admin:
        yield "a consumer key", target.auth
        yield "a consumer x-api-key", {"x-api-key": target.key}
        yield "the admin key as x-api-key", {"x-api-key": target.admin_key}
    else:
        yield "the admin key", target.admin


async def attack_credentials(target: Target) -> list[Verdict]:
    """Every route, every method, every bad credential → 401/403 in the route's own shape,
    or 405 for a method the route does not serve; never anything else. The right credential
    must get past the check (or the attack proves nothing)."""
    verdicts = []
    body = json.dumps(chat()).encode()
    async with target.client() as client:
        for route in route_table(target.daemon):
            for credential, headers in _credentials(target, route):
                statuses = []
                for method in route.methods:
                    response = await _call(client, method, route.path, headers, body)
                    statuses.append(response.status_code)
                    bad = _bad_refusal(route, response)
                    name = f"{method} {route.path} with {credential}"
                    verdicts.append(Verdict("credentials", name, bad is None, bad or ""))
                if 401 not in statuses and 403 not in statuses:
                    verdicts.append(
                        Verdict(
                            "credentials",
                            f"{route.path} with {credential}",
                            False,
                            f"no method was refused for the credential: {statuses}",
                        )
                    )
            good = target.admin if route.admin else target.auth
            statuses = [
                (await _call(client, method, route.path, good, b"{}")).status_code
                for method in route.methods
            ]
            verdicts.append(
                Verdict(
                    "credentials",
                    f"{route.path} with the right credential gets past the check",
                    any(status not in (401, 403, 405) for status in statuses),
                    f"statuses {statuses}",
                )
            )
        # The model list answers an Anthropic client in Anthropic's shape.
        for path in ("/v1/models", f"/v1/models/{SAMPLE_ID}"):
            response = await _call(client, "GET", path, {"anthropic-version": "2023-06-01"}, b"")
            ok = response.status_code == 401 and shaped(path, response, anthropic=True)
            verdicts.append(
                Verdict(
                    "credentials",
                    f"GET {path} (anthropic-version) with no key",
                    ok,
                    f"{response.status_code} {response.text[:200]}",
                )
            )
    verdicts += await _metrics_listener(target)
    return verdicts


async def _metrics_listener(target: Target) -> list[Verdict]:
    """The /metrics listener has no credential by design (it binds to loopback): it must serve
    only /metrics, and nothing secret (no key, token, or request text) may appear in it."""
    base = target.daemon.metrics_url
    if base is None:
        return []
    verdicts = []
    async with httpx.AsyncClient(base_url=base, timeout=BOUND_S) as client:
        scraped = await client.get("/metrics")
        found = [secret[:6] for secret in target.secrets if secret in scraped.text]
        verdicts.append(
            Verdict(
                "credentials",
                "GET /metrics shows no secret and no request text",
                scraped.status_code == 200 and not found,
                f"{scraped.status_code}, secrets starting {found}",
            )
        )
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/admin/keys"), ("POST", "/")):
            response = await client.request(method, path, headers=target.admin)
            verdicts.append(
                Verdict(
                    "credentials",
                    f"{method} {path} on the metrics listener",
                    response.status_code in (404, 405),
                    f"{response.status_code} {response.text[:200]}",
                )
            )
    return verdicts


def _bad_refusal(route: Route, response: httpx.Response) -> str | None:
    """Why `response` is not a proper refusal of a bad credential, or None."""
    status = response.status_code
    if status == 405:
        return None if shaped(route.path, response) or route.admin else "405 not in shape"
    if status not in (401, 403):
        return f"{status}: got through ({response.text[:200]})"
    if not shaped(route.path, response):
        return f"{status} not in the route's error shape: {response.text[:200]}"
    return None


# Provider impersonation -----------------------------------------------------------------------


@asynccontextmanager
async def honest_stream_running(target: Target) -> Any:
    """An honest streamed request in flight (committed, held) for as long as the block runs;
    yields a function that releases it and returns a Verdict on whether it completed whole."""
    assert target.honest is not None
    result: dict[str, Any] = {}
    done = trio.Event()
    before = len(target.releases)

    async def consume() -> None:
        try:
            async with target.client() as client:
                with trio.fail_after(BOUND_S * 2):
                    response = await client.post(
                        "/v1/chat/completions",
                        json=chat(model="h", stream=True),
                        headers=target.auth,
                    )
            result["status"], result["text"] = response.status_code, response.text
        except Exception as exc:  # reported as a verdict, not raised into the attack's nursery
            result["error"] = repr(exc)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        with trio.fail_after(BOUND_S):
            while len(target.releases) == before:  # noqa: ASYNC110 - the fake records it
                await trio.sleep(0.01)
        release = target.releases[before]

        async def finish(category: str) -> Verdict:
            release.set()
            with trio.fail_after(BOUND_S):
                await done.wait()
            text = result.get("text", "")
            whole = (
                result.get("status") == 200
                and "held" in text
                and " and done" in text
                and text.rstrip().endswith("data: [DONE]")
                and '"error"' not in text
            )
            return Verdict(
                category, "a concurrent honest request completes whole", whole, str(result)[:300]
            )

        yield finish


async def _raw_register(
    ws: Any,
    *,
    identity: SigningKey,
    box_public: str,
    identity_key: str | None = None,
    models: list[ModelInfo] | None = None,
) -> None:
    await ws.send_message(
        encode(
            Register(
                protocol=1,
                version="0.7.0",
                backend="attacker",
                public_key=box_public,
                identity_key=identity_key or crypto.encode_key(identity.verify_key),
                models=models or [ModelInfo(id="m")],
            )
        )
    )


async def _next_frame(ws: Any) -> Any:
    with trio.fail_after(BOUND_S):
        return decode_daemon_frame(await ws.get_message())


async def _closed_with(ws: Any) -> int | None:
    """Read until the daemon closes; its close code (None: it did not close in time)."""
    with trio.move_on_after(BOUND_S):
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as closed:
            return int(closed.reason.code) if closed.reason else None
    return None


def _entry(target: Target, provider_id: str) -> Any:
    return target.sup.registry.get(provider_id)


async def _bad_signature(target: Target) -> Verdict:
    fake = FakeProvider(target.daemon.provider_url, sign_wrongly=True)
    await _start(target, fake)
    first = fake.verdicts[0].status if fake.verdicts else None
    entry = _entry(target, fake.provider_id)
    ok = first != "trusted" and (entry is None or not entry.trusted)
    await _stop(fake)
    return Verdict("impersonation", "a bad challenge signature", ok, f"first verdict {first}")


_scopes: dict[int, trio.CancelScope] = {}


async def _start(target: Target, fake: FakeProvider) -> None:
    """Connect an attacking fake in a scope of its own, so `_stop` can end it at once."""
    scope = trio.CancelScope()
    _scopes[id(fake)] = scope

    async def run(*, task_status: trio.TaskStatus[FakeProvider]) -> None:
        with scope:
            await fake.run(task_status=task_status)

    await target.nursery.start(run)


async def _stop(fake: FakeProvider) -> None:
    _scopes.pop(id(fake)).cancel(reason="the attack is over")
    with trio.fail_after(BOUND_S):
        await fake.closed.wait()


async def _unknown_nonce(target: Target) -> Verdict:
    identity, box = crypto.generate_identity_key(), crypto.generate_box_key()
    async with open_provider_socket(target.daemon.provider_url) as ws:
        await _raw_register(ws, identity=identity, box_public=crypto.encode_key(box.public_key))
        challenge = await _next_frame(ws)
        assert isinstance(challenge, AttestationChallenge)
        forged_nonce = crypto.new_challenge_nonce()  # a nonce the daemon never issued
        signature = crypto.sign_challenge(identity, forged_nonce, challenge.timestamp)
        await ws.send_message(encode(AttestationResponse(nonce=forged_nonce, signature=signature)))
        verdict = await _next_frame(ws)
    ok = isinstance(verdict, TrustStatus) and verdict.status != "trusted"
    return Verdict("impersonation", "an answer to an unknown nonce", ok, repr(verdict))


async def _replayed_nonce(target: Target) -> Verdict:
    """Pass the first challenge, then answer every later one with that first answer: each
    is ignored, and after three the provider is untrusted."""
    identity, box = crypto.generate_identity_key(), crypto.generate_box_key()
    statuses = []
    async with open_provider_socket(target.daemon.provider_url) as ws:
        await _raw_register(ws, identity=identity, box_public=crypto.encode_key(box.public_key))
        first = await _next_frame(ws)
        assert isinstance(first, AttestationChallenge)
        recorded = AttestationResponse(
            nonce=first.nonce,
            signature=crypto.sign_challenge(identity, first.nonce, first.timestamp),
        )
        await ws.send_message(encode(recorded))
        with trio.fail_after(BOUND_S):
            while len(statuses) < 4:
                frame = await _next_frame(ws)
                if isinstance(frame, AttestationChallenge):
                    await ws.send_message(encode(recorded))  # replay; and a second time
                    await ws.send_message(encode(recorded))
                elif isinstance(frame, TrustStatus):
                    statuses.append(frame.status)
    ok = statuses[0] == "trusted" and statuses[-1] == "untrusted"
    return Verdict("impersonation", "a replayed challenge answer", ok, f"verdicts {statuses}")


async def _identity_claim(target: Target) -> Verdict:
    """A second connection claims the honest provider's identity (it has the public key,
    not the private one): closed, and the honest session keeps its place."""
    assert target.honest is not None
    honest = target.honest
    impostor = crypto.generate_identity_key()
    box = crypto.generate_box_key()
    async with open_provider_socket(target.daemon.provider_url) as ws:
        await _raw_register(
            ws,
            identity=impostor,
            box_public=crypto.encode_key(box.public_key),
            identity_key=crypto.encode_key(honest.identity.verify_key),
        )
        challenge = await _next_frame(ws)
        assert isinstance(challenge, AttestationChallenge)
        signature = crypto.sign_challenge(impostor, challenge.nonce, challenge.timestamp)
        await ws.send_message(
            encode(AttestationResponse(nonce=challenge.nonce, signature=signature))
        )
        code = await _closed_with(ws)
    entry = _entry(target, honest.provider_id)
    ok = code == 1008 and entry is not None and entry.trusted and not honest.closed.is_set()
    return Verdict(
        "impersonation",
        "a second connection claiming a live identity",
        ok,
        f"closed with {code}; honest still trusted: {bool(entry and entry.trusted)}",
    )


async def _stolen_box_key(target: Target) -> Verdict:
    """Another identity registers the honest provider's public (box) key, to get requests
    sealed to it routed its way: refused with 1008."""
    assert target.honest is not None
    identity = crypto.generate_identity_key()
    async with open_provider_socket(target.daemon.provider_url) as ws:
        await _raw_register(
            ws,
            identity=identity,
            box_public=crypto.encode_key(target.honest.box_key.public_key),
        )
        code = await _closed_with(ws)
    return Verdict(
        "impersonation",
        "registering another provider's public key",
        code == 1008,
        f"closed with {code}",
    )


async def _bad_chunk(target: Target, step: Step, name: str) -> Verdict:
    """A provider whose chunks break the encryption contract (the only one serving its
    model): nothing of it reaches the consumer, who gets 502, and the provider loses trust."""
    fake = FakeProvider(
        target.daemon.provider_url,
        behaviour=lambda _b: [step, Stall()],
        models=[ModelInfo(id="bad")],
    )
    await _start(target, fake)
    async with target.client() as client:
        with trio.fail_after(BOUND_S):
            response = await client.post(
                "/v1/chat/completions", json=chat(model="bad"), headers=target.auth
            )
    entry = _entry(target, fake.provider_id)
    untrusted = entry is None or not entry.trusted
    ok = (
        fake.request_seen.is_set()
        and response.status_code == 502
        and "data: " not in response.text
        and untrusted
    )
    await _stop(fake)
    return Verdict(
        "impersonation",
        name,
        ok,
        f"{response.status_code} {response.text[:120]}, untrusted: {untrusted}",
    )


async def _cross_session_frames(target: Target) -> Verdict:
    """A trusted provider sends frames for the honest provider's request ids (a chunk, an
    error and a completion): dropped; the honest request is not touched."""
    assert target.honest is not None
    honest = target.honest
    identity, box = crypto.generate_identity_key(), crypto.generate_box_key()
    seen = len(honest.request_ids)
    async with honest_stream_running(target) as finish:
        stolen = honest.request_ids[seen]
        async with open_provider_socket(target.daemon.provider_url) as ws:
            await _raw_register(ws, identity=identity, box_public=crypto.encode_key(box.public_key))
            challenge = await _next_frame(ws)
            assert isinstance(challenge, AttestationChallenge)
            signature = crypto.sign_challenge(identity, challenge.nonce, challenge.timestamp)
            await ws.send_message(
                encode(AttestationResponse(nonce=challenge.nonce, signature=signature))
            )
            payload = crypto.seal_request(b'data: {"hijacked": true}', box.public_key)[0]
            for frame in (
                InferenceResponseChunk(request_id=stolen, encrypted_data=payload),
                InferenceError(request_id=stolen, error="hijacked", status_code=500),
                InferenceComplete(
                    request_id=stolen, usage=Usage(prompt_tokens=1, completion_tokens=1)
                ),
            ):
                await ws.send_message(encode(frame))
            await ws.send_message(encode(AttestationResponse(nonce="x", signature="y")))
        verdict = await finish("impersonation")
    return Verdict(
        "impersonation", "frames for another provider's request id", verdict.refused, verdict.detail
    )


async def attack_providers(target: Target) -> list[Verdict]:
    verdicts = []
    async with honest_stream_running(target) as finish:
        verdicts.append(await _bad_signature(target))
        verdicts.append(await _unknown_nonce(target))
        verdicts.append(await _identity_claim(target))
        verdicts.append(await _stolen_box_key(target))
        verdicts.append(await finish("impersonation"))
    verdicts.append(await _replayed_nonce(target))
    verdicts.append(
        await _bad_chunk(target, Plaintext(), "a chunk sealed with the wrong sender key")
    )
    verdicts.append(await _bad_chunk(target, Cleartext(SECRET_TEXT), "a plaintext chunk"))
    verdicts.append(
        await _bad_chunk(
            target, Cleartext(SECRET_TEXT, sealed=True), "a sealed chunk with plaintext beside it"
        )
    )
    verdicts.append(await _cross_session_frames(target))
    return verdicts


# Limits ---------------------------------------------------------------------------------------


def _body_routes(target: Target) -> list[Route]:
    return [r for r in route_table(target.daemon) if "POST" in r.methods or "PATCH" in r.methods]


async def attack_bodies(target: Target) -> list[Verdict]:
    """Hostile JSON on every route that takes a body: deep nesting, huge numbers, not JSON.
    A 4xx in the route's shape, never a 500."""
    deep = b"[" * 100_000 + b"]" * 100_000
    bodies = {
        "100,000 nested arrays": deep,
        "100,000 nested objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "nested arrays in a field": b'{"model":"m","messages":' + deep + b"}",
        "1e999999": json.dumps(chat(temperature=0.5)).replace("0.5", "1e999999").encode(),
        "-1e999999 max_tokens": json.dumps(chat(max_tokens=7)).replace("7", "-1e999999").encode(),
        "10**10000 as an int": json.dumps(chat(max_tokens=7)).replace("7", "1" * 10_001).encode(),
        "10**10000 in an unknown field": json.dumps(chat(x=7)).replace("7", "9" * 10_001).encode(),
        "10**10000 as a name": b'{"name":' + b"9" * 10_001 + b"}",
        "not UTF-8": b'{"model":"\xff\xfe"}',
        "a lone surrogate": b'{"model":"\\ud800","name":"\\ud800"}',
        "NaN": b'{"model":"m","temperature":NaN}',
    }
    verdicts = []
    async with target.client() as client:
        for route in _body_routes(target):
            # A fresh connection each: a route that answers without reading a body (404 for
            # an unknown id) leaves Hypercorn closing the connection under the next request.
            credential = target.admin if route.admin else target.auth
            headers = {**credential, "connection": "close"}
            for name, body in bodies.items():
                for method in [m for m in route.methods if m in ("POST", "PATCH")]:
                    response = await _call(client, method, route.path, headers, body)
                    status = response.status_code
                    ok = 400 <= status < 500 and status not in (401, 403)
                    ok = ok and (route.admin or shaped(route.path, response))
                    verdicts.append(
                        Verdict(
                            "bodies",
                            f"{method} {route.path}: {name}",
                            ok,
                            f"{status} {response.text[:200]}",
                        )
                    )
    return verdicts


async def attack_sizes(target: Target) -> list[Verdict]:
    verdicts = []
    limit = target.sup.settings.max_body_bytes
    good = json.dumps(chat()).encode()
    async with target.client() as client:
        over = good + b" " * (limit + 1 - len(good))
        for path in ("/v1/chat/completions", "/v1/messages"):
            response = await _call(client, "POST", path, target.auth, over)
            verdicts.append(
                Verdict(
                    "limits",
                    f"a body of limit + 1 bytes on {path}",
                    response.status_code == 413 and shaped(path, response),
                    str(response.status_code),
                )
            )
            response = await _call(client, "POST", path, {}, over)
            verdicts.append(
                Verdict(
                    "limits",
                    f"an unauthenticated body over the limit on {path}",
                    response.status_code == 401 and shaped(path, response),
                    str(response.status_code),
                )
            )
        # Within the body limit, over the 10 MiB frame once sealed.
        frame = json.dumps(chat(text="y" * (10 * 1024 * 1024 + 1))).encode()
        if len(frame) <= limit:
            response = await _call(client, "POST", "/v1/chat/completions", target.auth, frame)
            verdicts.append(
                Verdict(
                    "limits",
                    "a body whose sealed frame exceeds 10 MiB",
                    response.status_code == 413,
                    str(response.status_code),
                )
            )
    verdicts.append(await _huge_header(target))
    verdicts.append(await _oversized_provider_frame(target))
    return verdicts


async def _raw_exchange(target: Target, data: bytes, bound: float = BOUND_S) -> bytes:
    """Send `data` on a fresh connection, read until the daemon closes or `bound`."""
    host, port = _address(target)
    received = b""
    with trio.move_on_after(bound):
        async with await trio.open_tcp_stream(host, port) as stream:
            try:
                await stream.send_all(data)
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass
            return received
    return received + b"<no close>"


def _address(target: Target) -> tuple[str, int]:
    host, port = target.daemon.base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _huge_header(target: Target) -> Verdict:
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 256 * 1024 + b"\r\n\r\n"
    received = await _raw_exchange(target, head)
    ok = received.startswith(b"HTTP/1.1 431") or received == b""
    return Verdict("limits", "a 256 KiB request header", ok, received[:60].decode("latin-1"))


async def _oversized_provider_frame(target: Target) -> Verdict:
    """A provider sends a frame over the 10 MiB limit as its first frame: refused with 1008
    (later ones count as malformed frames, tests/test_provider_sessions.py); nothing else
    is affected."""
    codes = []
    async with honest_stream_running(target) as finish:
        async with open_provider_socket(target.daemon.provider_url) as ws:
            padding = "p" * (10 * 1024 * 1024 + 1)
            await ws.send_message(json.dumps({"type": "register", "x": padding}))
            codes.append(await _closed_with(ws))
        honest = await finish("limits")
    ok = honest.refused and codes == [1008]
    return Verdict(
        "limits", "a provider frame over 10 MiB", ok, f"closed with {codes}; {honest.detail}"
    )


async def attack_queue(target: Target) -> list[Verdict]:
    """Fill the queue of a model whose one provider is busy: the next request is 429
    `queue_full` with Retry-After; the queued ones are served once the provider frees."""
    release = trio.Event()
    # Committed first (content sent), so no first-token deadline ends it while it holds.
    script: Script = [
        role_chunk("solo"),
        content_chunk("queued", "solo"),
        Hold(release),
        finish_chunk("solo"),
        Chunk("data: [DONE]"),
        Complete(),
    ]
    fake = FakeProvider(
        target.daemon.provider_url,
        behaviour=lambda _b: script,
        models=[ModelInfo(id="solo")],
        max_concurrency=1,
    )
    await _start(target, fake)
    statuses: list[int] = []
    async with target.client() as client, trio.open_nursery() as nursery:

        async def one() -> None:
            response = await client.post(
                "/v1/chat/completions", json=chat(model="solo"), headers=target.auth
            )
            statuses.append(response.status_code)

        for _ in range(1 + QUEUE_MAX):
            nursery.start_soon(one)
        with trio.fail_after(BOUND_S):
            while target.sup.queue.waiting("solo") < QUEUE_MAX:  # noqa: ASYNC110
                await trio.sleep(0.01)
        with trio.fail_after(BOUND_S):
            refused = await client.post(
                "/v1/chat/completions", json=chat(model="solo"), headers=target.auth
            )
        release.set()
    await _stop(fake)
    ok = (
        refused.status_code == 429
        and refused.json()["error"]["code"] == "queue_full"
        and "retry-after" in refused.headers
        and statuses == [200] * (1 + QUEUE_MAX)
    )
    return [
        Verdict(
            "limits",
            f"a request past DINFER_QUEUE_MAX={QUEUE_MAX}",
            ok,
            f"{refused.status_code}, queued ones: {statuses}",
        )
    ]


async def attack_held_boilerplate(target: Target) -> list[Verdict]:
    """A provider that sends only role/preamble chunks forever never commits the request:
    it ends with an error within ttft + preamble, and the slot is freed."""
    script: list[Step] = []
    for _ in range(2000):
        script += [role_chunk("boiler"), Wait(0.005)]
    fake = FakeProvider(
        target.daemon.provider_url,
        behaviour=lambda _b: script,
        models=[ModelInfo(id="boiler")],
        max_concurrency=1,
    )
    await _start(target, fake)
    started = trio.current_time()
    async with httpx.AsyncClient(base_url=target.daemon.base_url, timeout=30) as client:
        with trio.fail_after(30):
            response = await client.post(
                "/v1/chat/completions", json=chat(model="boiler"), headers=target.auth
            )
    took = trio.current_time() - started
    entry = _entry(target, fake.provider_id)
    freed = entry is not None and entry.in_flight == 0  # freed before the answer was sent
    with trio.move_on_after(BOUND_S):  # `cancel` travels on the provider's own socket
        await fake.cancel_seen.wait()
    await _stop(fake)
    in_time = took < 1 + 0.5 + 2  # ttft + preamble (target_env), and two seconds of slack
    ok = response.status_code in (502, 503, 504) and in_time and freed and fake.cancel_seen.is_set()
    return [
        Verdict(
            "limits",
            "a provider sending only boilerplate forever",
            ok,
            f"{response.status_code} after {took:.1f} s, slot freed: {freed}, "
            f"cancelled: {fake.cancel_seen.is_set()}",
        )
    ]


async def attack_connections(target: Target) -> list[Verdict]:
    verdicts = []
    host, port = _address(target)
    idle = [await trio.open_tcp_stream(host, port) for _ in range(300)]
    closed = 0

    async def wait_closed(stream: trio.SocketStream) -> None:
        nonlocal closed
        try:
            if await stream.receive_some(1) == b"":
                closed += 1
        except trio.BrokenResourceError:
            closed += 1

    try:
        async with trio.open_nursery() as nursery:
            for stream in idle:
                nursery.start_soon(wait_closed, stream)
            async with target.client() as client:
                with trio.fail_after(BOUND_S):
                    response = await client.post(
                        "/v1/chat/completions", json=chat(), headers=target.auth
                    )
            verdicts.append(
                Verdict(
                    "connections",
                    "a request beside 300 idle connections",
                    response.status_code == 200,
                    str(response.status_code),
                )
            )
            with trio.move_on_after(KEEPALIVE_S + BOUND_S):
                while closed < len(idle):  # noqa: ASYNC110 - counted by the readers
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel(reason="counted")
    finally:
        for stream in idle:
            await stream.aclose()
    verdicts.append(
        Verdict(
            "connections",
            "300 idle connections closed by the keep-alive timeout",
            closed == len(idle),
            f"{closed} of {len(idle)} closed",
        )
    )
    verdicts.append(await _slow_headers(target))
    verdicts.append(await _slow_body(target))
    verdicts.append(await _never_reads(target))
    return verdicts


async def _slow_headers(target: Target) -> Verdict:
    """Slowloris: a request head trickling in a byte at a time is cut at the keep-alive
    timeout (which bounds the head), whatever it has sent."""
    host, port = _address(target)
    started = trio.current_time()
    closed_at = None
    with trio.move_on_after(KEEPALIVE_S + BOUND_S):
        async with await trio.open_tcp_stream(host, port) as stream:
            try:
                for byte in (
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-a: b\r\n" * 1000
                ):
                    await stream.send_all(bytes([byte]))
                    with trio.move_on_after(0.05):
                        if await stream.receive_some(1024) == b"":
                            break
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            closed_at = trio.current_time() - started
    ok = closed_at is not None and closed_at < KEEPALIVE_S + 3
    return Verdict("connections", "slow headers (slowloris)", ok, f"closed after {closed_at}")


async def _slow_body(target: Target) -> Verdict:
    body = json.dumps(chat()).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {target.key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    started = trio.current_time()
    received = await _raw_exchange(target, head + body[:10], BODY_TIMEOUT_S + BOUND_S)
    took = trio.current_time() - started
    ok = received.startswith(b"HTTP/1.1 408") and took < BODY_TIMEOUT_S + 3
    return Verdict(
        "connections", "a body that stops arriving", ok, f"{received[:40]!r} after {took:.1f} s"
    )


async def _never_reads(target: Target) -> Verdict:
    """A consumer that never reads its streamed answer: the watchdog cancels the provider
    and frees its slot within the inference timeout (plus its check interval)."""
    big = "z" * 16384
    script: list[Step] = [
        role_chunk("flood"),
        *[content_chunk(big, "flood") for _ in range(640)],
        Stall(),
    ]
    fake = FakeProvider(
        target.daemon.provider_url,
        behaviour=lambda _b: script,
        models=[ModelInfo(id="flood")],
        max_concurrency=1,
    )
    await _start(target, fake)
    body = json.dumps(chat(model="flood", stream=True)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {target.key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    host, port = _address(target)
    sock = socket.create_connection((host, port))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(head + body)
        with trio.move_on_after(INFERENCE_TIMEOUT_S * 2 + BOUND_S):
            await fake.cancel_seen.wait()
        entry = _entry(target, fake.provider_id)
        freed = entry is not None and entry.in_flight == 0
    finally:
        sock.close()
    await _stop(fake)
    return Verdict(
        "connections",
        "a reader that never reads a streamed answer",
        fake.cancel_seen.is_set() and freed,
        f"cancelled: {fake.cancel_seen.is_set()}",
    )


CATEGORIES: Final[dict[str, Callable[[Target], Awaitable[list[Verdict]]]]] = {
    "credentials": attack_credentials,
    "impersonation": attack_providers,
    "bodies": attack_bodies,
    "limits": attack_sizes,
    "queue": attack_queue,
    "boilerplate": attack_held_boilerplate,
    "connections": attack_connections,
}


# Leaks ----------------------------------------------------------------------------------------


def task_names() -> list[str]:
    """Every task of this trio run. trio.lowlevel is used because this is test code counting
    what the daemon left behind: no public API lists a run's tasks."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    names, stack = [], [root]
    while stack:
        task = stack.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


# Tasks that come and go on their own: report_status's wait_any spawns these two while it
# waits for a change, not while it sleeps out its rate limit.
TRANSIENT_TASKS: Final = frozenset({"trio_util._awaitables._wait_and_call"})


def task_count() -> Counter[str]:
    """The tasks of this run by name, without the transient ones."""
    return Counter(name for name in task_names() if name not in TRANSIENT_TASKS)


def leaks(target: Target) -> list[str]:
    """What is still held once every attack ended: requests, slots, queue entries."""
    sup = target.sup
    found = []
    if sup.requests.value:
        found.append(f"{sup.requests.value} request(s) still counted in flight")
    for entry in sup.registry.providers():
        if entry.in_flight:
            found.append(f"provider {entry.provider_id} holds {entry.in_flight} slot(s)")
    for model in ("m", "h", "q", "solo", "boiler", "flood"):
        if sup.queue.waiting(model):
            found.append(f"{sup.queue.waiting(model)} waiting in the queue of {model}")
    return found


async def settle(target: Target, baseline: Counter[str]) -> list[str]:
    """Wait (bounded) for the daemon to be back at rest; what did not come back."""
    with trio.move_on_after(BOUND_S):
        while leaks(target) or task_count() - baseline:  # noqa: ASYNC110 - counted state
            await trio.sleep(0.05)
    found = leaks(target)
    if extra := task_count() - baseline:
        found.append(f"tasks above the baseline: {dict(extra)}")
    return found


@asynccontextmanager
async def open_target(
    start: Callable[..., Awaitable[RunningDaemon]],
    nursery: trio.Nursery,
    admin_key: str,
    **env: str,
) -> Any:
    daemon = await start(**{**target_env(), **env})
    target = Target(daemon, admin_key, nursery)
    async with AsyncExitStack():
        await prepare(target)
        yield target
