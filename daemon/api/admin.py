"""The admin API (`/v1/admin/...`): provider tokens, consumer keys, the provider and hedging views,
and an operator's hands on a provider (clear its breaker cooldowns, drain it and undrain it:
in a cluster, at the instance that holds the provider, the answer's `applied` saying
`local` or `forwarded`), and the usage ledger's summaries (`GET /v1/admin/usage`).

Every route takes `Authorization: Bearer $DINFER_ADMIN_KEY`, compared in constant time;
without an admin key configured, every call is refused.

Keys: list, get, create (with limits), `PATCH` (set limits; null clears one), rotate (a new
secret, shown once; the old one is refused from then on), revoke. A key is never shown with
its secret or digest, only when issued. Limit values are validated by `daemon.key_policy`
(the CLI uses the same), and a bad one is a 400 naming the field in `param`.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, assert_never

import msgspec
import trio
from quart import Blueprint, Response, current_app, request

from daemon.api.errors import ApiError, error_body
from daemon.api.handler import timing_for
from daemon.api.usage import query_from, usage_groups
from daemon.cluster.remote_admin import Action, Applied, NotThere, Outcome, Unreachable, apply
from daemon.key_policy import NO_LIMITS, LimitError, parse_changes
from daemon.nursery.hedging import Hedger
from daemon.nursery.supervisor import Supervisor
from daemon.routing.latency import BAND_LABELS, BAND_LIMITS, LatencyKey, TtftWindow
from daemon.routing.registry import Registry
from daemon.routing.types import ProviderEntry
from protocol.messages import ModelInfo

admin = Blueprint("admin", __name__, url_prefix="/v1/admin")
Handler = Callable[..., Awaitable[Response]]


def supervisor() -> Supervisor:
    sup: Supervisor = current_app.config["DINFER_SUPERVISOR"]
    return sup


def json_error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> Response:
    body = error_body(status, message, code, param)
    return Response(body, status, content_type="application/json")


def requires_admin(handler: Handler) -> Handler:
    @wraps(handler)
    async def guarded(*args: Any, **kwargs: Any) -> Response:
        expected = supervisor().settings.admin_key
        if expected is None:
            return json_error(
                403, "the admin API is disabled: set DINFER_ADMIN_KEY", "admin_disabled"
            )
        scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
        valid = scheme.lower() == "bearer" and hmac.compare_digest(
            offered.strip().encode(), expected.encode()
        )
        if not valid:
            return json_error(401, "a valid admin bearer key is required", "invalid_admin_key")
        return await handler(*args, **kwargs)

    return guarded


async def _json_body() -> Any:
    """The body as JSON, whatever its content type; None when it is not JSON. Not quart's
    `get_json(silent=True)`: a body that is not UTF-8 raises there (a 500)."""
    raw = await request.get_data(as_text=False)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


async def _name_from_body() -> str | Response:
    body = await _json_body()
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name.strip():
        return json_error(
            400, 'the body must be a JSON object with a non-empty "name"', "invalid_name"
        )
    return name


async def _issue(create: Callable[[str], Awaitable[Any]], secret_field: str) -> Response:
    name = await _name_from_body()
    if isinstance(name, Response):
        return name
    try:
        issued = await create(name)
    except ValueError as exc:
        return json_error(400, str(exc), "invalid_name")
    return _json({"id": issued.id, secret_field: issued.secret, "name": name}, 201)


def _json(payload: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(payload), status, content_type="application/json")


@admin.post("/provider-tokens")
@requires_admin
async def create_provider_token() -> Response:
    return await _issue(supervisor().store.create_provider_token, "token")


@admin.delete("/provider-tokens/<token_id>")
@requires_admin
async def revoke_provider_token(token_id: str) -> Response:
    sup = supervisor()
    if not await sup.store.revoke_provider_token(token_id):
        return json_error(404, f"no live provider token {token_id!r}", "token_not_found")
    return _json({"id": token_id, "revoked": True, "disconnected": sup.kick_token(token_id)})


@admin.get("/provider-tokens")
@requires_admin
async def list_provider_tokens() -> Response:
    tokens = await supervisor().store.list_provider_tokens()
    return _json({"tokens": [token.to_json() for token in tokens]})


@admin.get("/keys")
@requires_admin
async def list_api_keys() -> Response:
    keys = await supervisor().store.list_api_keys()
    return _json({"keys": [key.to_json() for key in keys]})


@admin.get("/keys/<key_id>")
@requires_admin
async def get_api_key(key_id: str) -> Response:
    record = await supervisor().store.get_api_key(key_id)
    if record is None:
        return _no_key(key_id)
    return _json(record.to_json())


@admin.post("/keys")
@requires_admin
async def create_api_key() -> Response:
    body = await _json_body()
    name = body.pop("name", None) if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(name, str) or not name.strip():
        return json_error(
            400, 'the body must be a JSON object with a non-empty "name"', "invalid_name", "name"
        )
    try:
        limits = NO_LIMITS.with_changes(parse_changes(body))
        issued = await supervisor().store.create_api_key(name, limits)
    except LimitError as exc:
        return _bad_limit(exc)
    except ValueError as exc:
        return json_error(400, str(exc), "invalid_name", "name")
    record = await supervisor().store.get_api_key(issued.id)
    assert record is not None  # just created; keys are never deleted
    return _json({**record.to_json(), "key": issued.secret}, 201)


@admin.patch("/keys/<key_id>")
@requires_admin
async def update_api_key(key_id: str) -> Response:
    body = await _object_body()
    if isinstance(body, Response):
        return body
    name = body.pop("name", None)
    if name is not None and not isinstance(name, str):
        return json_error(400, '"name" must be a string', "invalid_name", "name")
    try:
        record = await supervisor().store.update_api_key(key_id, parse_changes(body), name=name)
    except LimitError as exc:
        return _bad_limit(exc)
    except ValueError as exc:
        return json_error(400, str(exc), "invalid_name", "name")
    if record is None:
        return _no_key(key_id)
    return _json(record.to_json())


@admin.post("/keys/<key_id>/rotate")
@requires_admin
async def rotate_api_key(key_id: str) -> Response:
    issued = await supervisor().store.rotate_api_key(key_id)
    if issued is None:
        return _no_key(key_id)
    return _json({"id": issued.id, "key": issued.secret})


@admin.delete("/keys/<key_id>")
@requires_admin
async def revoke_api_key(key_id: str) -> Response:
    if not await supervisor().store.revoke_api_key(key_id):
        return _no_key(key_id)
    return _json({"id": key_id, "revoked": True})


async def _object_body() -> dict[str, Any] | Response:
    body = await _json_body()
    if not isinstance(body, dict):
        return json_error(400, "the body must be a JSON object", "invalid_body")
    return body


def _bad_limit(exc: LimitError) -> Response:
    return json_error(400, str(exc), "invalid_limit", exc.field)


def _no_key(key_id: str) -> Response:
    return json_error(404, f"no live API key {key_id!r}", "key_not_found")


@admin.get("/usage")
@requires_admin
async def usage() -> Response:
    """Requests, outcomes, token sums and TTFT percentiles per group; see daemon/api/usage.py."""
    try:
        query = query_from(request.query_string, allow_key_id=True)
    except ApiError as error:
        return json_error(error.status, error.message, error.code)
    return _json(await usage_groups(supervisor(), query))


@admin.get("/providers")
@requires_admin
async def list_providers() -> Response:
    registry = supervisor().registry
    now = trio.current_time()
    return _json({"providers": [_describe(entry, registry, now) for entry in registry.providers()]})


def _provider(provider_id: str) -> ProviderEntry | Response:
    entry = supervisor().registry.get(provider_id)
    if entry is None:
        return json_error(404, f"no connected provider {provider_id!r}", "provider_not_found")
    return entry


@admin.delete("/providers/<provider_id>/cooldowns")
@requires_admin
async def clear_cooldowns(provider_id: str) -> Response:
    """Forget the provider's strikes and cooldowns: it serves every shape again at once."""
    return await _order(provider_id, Action.CLEAR_COOLDOWNS)


@admin.post("/providers/<provider_id>/drain")
@requires_admin
async def drain_provider(provider_id: str) -> Response:
    """No new requests for the provider; those in flight finish. A reconnect undrains it."""
    return await _order(provider_id, Action.DRAIN)


@admin.delete("/providers/<provider_id>/drain")
@requires_admin
async def undrain_provider(provider_id: str) -> Response:
    return await _order(provider_id, Action.UNDRAIN)


async def _order(provider_id: str, action: Action) -> Response:
    """Apply an operator's order where the provider's session is: here, or (in a cluster)
    at the instance that holds it (daemon/cluster/remote_admin.py); the answer says which."""
    entry = _provider(provider_id)
    if isinstance(entry, Response):
        return entry
    sup = supervisor()
    cluster = sup.cluster
    outcome: Outcome
    if cluster is None:
        outcome = Applied(apply(sup.registry, entry, action), None)
    elif entry.owner is None:
        outcome = cluster.admin.apply_here(entry, action)
    else:
        outcome = await cluster.admin.forward(entry, entry.owner, action)
    match outcome:
        case Applied(answer=answer, owner=owner):
            view: dict[str, Any] = {"provider_id": provider_id}
            if action is Action.CLEAR_COOLDOWNS:
                view["cleared"] = answer.cleared
            else:
                view |= {"drained": answer.drained, "in_flight": answer.in_flight}
            if owner is None:
                return _json({**view, "applied": "local"})
            return _json({**view, "applied": "forwarded", "owner": owner})
        case NotThere(owner=owner):
            return json_error(
                404,
                f"provider {provider_id!r} is no longer connected to its daemon ({owner})",
                "provider_not_found",
            )
        case Unreachable(owner=owner, reason=reason, sent=sent):
            if not sent:
                return json_error(503, f"{reason} ({owner}): try again", "owner_unreachable")
            return json_error(
                502,
                f"{reason} ({owner}): the order may or may not have been applied;"
                " GET /v1/admin/providers shows its state",
                "owner_no_answer",
            )
        case never:
            assert_never(never)


def _describe(entry: ProviderEntry, registry: Registry, now: float) -> dict[str, Any]:
    wall_offset = time.time() - now
    return {
        "provider_id": entry.provider_id,
        "version": entry.version,
        "backend": entry.backend,
        "models": [_describe_model(info) for info in entry.models.values()],
        "in_flight": entry.in_flight,
        "in_flight_by_model": dict(sorted(entry.in_flight_by_model.items())),
        "max_concurrency": entry.max_concurrency,
        "trusted": entry.trusted,
        "draining": entry.draining,
        "drained": entry.held,
        "last_challenge_at": entry.last_challenge_at,
        "strikes": [
            {"model": model, "shape": shape, "strikes": count}
            for model, shape, count in registry.breaker.strikes(entry.provider_id, now)
        ],
        "cooldowns": [
            {
                "model": model,
                "shape": shape,
                "until": until + wall_offset,
                "seconds_left": round(until - now, 1),
            }
            for model, shape, until in registry.breaker.cooldowns(entry.provider_id, now)
        ],
        "decode_tps": {model: round(tps, 1) for model, tps in sorted(entry.decode_tps.items())},
        "speed": [
            {
                **_observed(key, window, now),
                "ttft_p95_ms": _ms(window.quantile(0.95, now)),
                "decode_tps": entry.decode_tps.get(key[0]),
            }
            for key, window in sorted(entry.ttft.items())
            if window.count(now)
        ],
    }


def _observed(key: LatencyKey, window: TtftWindow, now: float) -> dict[str, Any]:
    model, band = key
    return {
        "model": model,
        "prompt": BAND_LABELS[band],
        "samples": window.count(now),
        "ttft_p50_ms": _ms(window.quantile(0.5, now)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


@admin.get("/hedging")
@requires_admin
async def hedging() -> Response:
    sup = supervisor()
    hedger = sup.hedger
    policy, budget = hedger.policy, hedger.budget
    now = trio.current_time()
    return _json(
        {
            "mode": policy.mode,
            "percentile": policy.percentile,
            "floor_ms": _ms(policy.floor_s),
            "budget": {
                "share": budget.share,
                "window_s": budget.window_s,
                "dispatches": budget.dispatches,
                "backups": budget.backups,
                "available": budget.allows(now),
            },
            "counters": hedger.counters.snapshot(),
            "models": [
                _hedge_point(hedger, sup, key, window, now)
                for key, window in sorted(sup.registry.ttft.items())
                if window.count(now)
            ],
        }
    )


def _hedge_point(
    hedger: Hedger, sup: Supervisor, key: LatencyKey, window: TtftWindow, now: float
) -> dict[str, Any]:
    """The fleet's point for (model, band), for the band's shortest prompt (the deadline-ratio
    point grows with the prompt); a provider with enough samples of its own uses its own."""
    timing = timing_for(sup.settings, (0, *BAND_LIMITS)[key[1]])
    point = hedger.point(key, timing.ttft * timing.speculative_ratio)
    return {
        **_observed(key, window, now),
        "hedge_at_ms": None if point is None else _ms(point.delay),
        "source": None if point is None else point.source,
    }


def _describe_model(info: ModelInfo) -> dict[str, Any]:
    """A model as its node described it. The render verdicts are tri-state (PROTOCOL.md §5):
    an absent one is "no opinion" and stays absent here, never null or false."""
    view: dict[str, Any] = {"id": info.id, "is_vision": bool(info.is_vision)}
    if info.template_render_ok is not None:
        view["template_render_ok"] = info.template_render_ok
    if info.template_render is not None:
        view["template_render"] = msgspec.to_builtins(info.template_render)  # omits absent
    if info.context_length is not None:
        view["context_length"] = info.context_length
    return view
