"""The admin API (`/v1/admin/...`): provider tokens, consumer keys, the provider and hedging views,
and the usage ledger's summaries (`GET /v1/admin/usage`).

Every route takes `Authorization: Bearer $DINFER_ADMIN_KEY`, compared in constant time;
without an admin key configured, every call is refused.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

import msgspec
import trio
from quart import Blueprint, Response, current_app, request

from daemon.api.errors import ApiError, error_body
from daemon.api.handler import timing_for
from daemon.api.usage import query_from, usage_groups
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


def json_error(status: int, message: str, code: str | None = None) -> Response:
    return Response(error_body(status, message, code), status, content_type="application/json")


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


async def _name_from_body() -> str | Response:
    body = await request.get_json(force=True, silent=True)
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


@admin.post("/keys")
@requires_admin
async def create_api_key() -> Response:
    return await _issue(supervisor().store.create_api_key, "key")


@admin.delete("/keys/<key_id>")
@requires_admin
async def revoke_api_key(key_id: str) -> Response:
    if not await supervisor().store.revoke_api_key(key_id):
        return json_error(404, f"no live API key {key_id!r}", "key_not_found")
    return _json({"id": key_id, "revoked": True})


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


def _describe(entry: ProviderEntry, registry: Registry, now: float) -> dict[str, Any]:
    wall_offset = time.time() - now
    return {
        "provider_id": entry.provider_id,
        "version": entry.version,
        "backend": entry.backend,
        "models": [_describe_model(info) for info in entry.models.values()],
        "in_flight": entry.in_flight,
        "max_concurrency": entry.max_concurrency,
        "trusted": entry.trusted,
        "draining": entry.draining,
        "last_challenge_at": entry.last_challenge_at,
        "cooldowns": [
            {"model": model, "shape": shape, "until": until + wall_offset}
            for model, shape, until in registry.breaker.cooldowns(entry.provider_id, now)
        ],
        "speed": [
            {**_observed(key, window, now), "decode_tps": entry.decode_tps.get(key[0])}
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
