"""`GET /v1/models` and `GET /v1/models/{id}`: the models the network can serve right now.

A model is listed while at least one provider serving it is routable for some request shape,
as the one eligibility predicate (`Registry.refusal`) judges: trusted and freshly attested,
not draining, its template able to render that shape, not cooling down. Each entry says what
a client needs to choose: how many providers are routable, the largest context any of them
advertises, and whether tool or image requests would pass the gates. Busy providers count:
a request for them queues.

OpenAI's shape by default; a request carrying `anthropic-version` gets Anthropic's (list
with cursors, `created_at` in RFC 3339, errors as `{"type": "error", ...}`), so both SDKs work.
Not an inference route: no body, no dispatch, just the consumer-key check and the registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec

from daemon.api.asgi import Receive, Send, drain, header, send_api_error, send_json
from daemon.api.errors import ApiError, anthropic_error, openai_error
from daemon.api.handler import ID_HEADERS, authenticate, request_id_headers
from daemon.api.messages import REQUEST_ID_HEADERS
from daemon.nursery.supervisor import Supervisor
from daemon.routing.registry import Registry, shown
from daemon.routing.types import ProviderEntry, RequestTraits

LIST_PATH: Final = "/v1/models"
ITEM_PREFIX: Final = "/v1/models/"
# Anthropic's page size: its default and its ceiling.
DEFAULT_LIMIT: Final = 20
MAX_LIMIT: Final = 1000

_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class ModelView:
    """One model as the routable providers of it advertise it now."""

    id: str
    providers: int
    context_length: int | None
    tools: bool
    vision: bool


class ModelsRoute:
    """The ASGI handler of both paths: the path says list or item, a header says whose shape."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor
        # Models have no creation date here: the daemon's start is stable across calls, so a
        # client caching the list sees no spurious change.
        self._created = int(time.time())

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        shape = ANTHROPIC if header(scope, b"anthropic-version") is not None else OPENAI
        ident = request_id_headers(shape.id_headers)
        try:
            payload = await self._answer(scope, receive, shape)
        except ApiError as error:
            await send_api_error(send, error, ident, shape.render_error)
            return
        await send_json(send, 200, _encoder.encode(payload), ident)

    async def _answer(self, scope: dict[str, Any], receive: Receive, shape: Shape) -> Any:
        if scope["method"] != "GET":
            await drain(receive)
            raise ApiError(405, "method_not_allowed", "use GET")
        await authenticate(self._sup, scope, shape.auth_hint)
        models = catalogue(self._sup.registry)
        path: str = scope["path"]
        if path == LIST_PATH:
            return shape.page(models, _query(scope), self._created)
        wanted = path.removeprefix(ITEM_PREFIX)
        for view in models:
            if view.id == wanted:
                return shape.item(view, self._created)
        raise ApiError(404, "model_not_found", f"the model {shown(wanted)} does not exist")


def catalogue(registry: Registry) -> list[ModelView]:
    """Every model some provider can be routed to now, sorted by id."""
    serving: dict[str, list[ProviderEntry]] = {}
    for entry in registry.providers():
        for model in entry.models:
            if _routable(registry, entry, model):
                serving.setdefault(model, []).append(entry)
    return [_view(registry, model, entries) for model, entries in sorted(serving.items())]


def _shapes(model: str) -> tuple[RequestTraits, RequestTraits, RequestTraits]:
    """A plain, a tool and an image request for `model`: (base, tools, vision)."""
    return (
        RequestTraits(model),
        RequestTraits(model, has_tools=True),
        RequestTraits(model, has_media=True),
    )


def _routable(registry: Registry, entry: ProviderEntry, model: str) -> bool:
    return any(registry.refusal(entry, traits) is None for traits in _shapes(model))


def _view(registry: Registry, model: str, entries: Sequence[ProviderEntry]) -> ModelView:
    _, tools, vision = _shapes(model)
    contexts = [c for e in entries if (c := e.models[model].context_length) is not None]
    return ModelView(
        id=model,
        providers=len(entries),
        context_length=max(contexts, default=None),
        tools=any(registry.refusal(e, tools) is None for e in entries),
        vision=any(registry.refusal(e, vision) is None for e in entries),
    )


def _query(scope: dict[str, Any]) -> dict[str, str]:
    raw = bytes(scope.get("query_string", b"")).decode("latin-1")
    return {name: values[-1] for name, values in parse_qs(raw).items()}


# The two shapes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """How one API family lists models and reports errors."""

    page: Callable[[list[ModelView], dict[str, str], int], dict[str, Any]]
    item: Callable[[ModelView, int], dict[str, Any]]
    render_error: Callable[[ApiError], bytes]
    auth_hint: str
    id_headers: tuple[bytes, ...]  # the request id under each (Anthropic's SDK reads `request-id`)


def _openai_item(view: ModelView, created: int) -> dict[str, Any]:
    return {
        "id": view.id,
        "object": "model",
        "created": created,
        "owned_by": "dinfer",
        "providers": view.providers,
        "context_length": view.context_length,
        "capabilities": {"tools": view.tools, "vision": view.vision},
    }


def _openai_page(models: list[ModelView], _query: dict[str, str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [_openai_item(view, created) for view in models]}


def _anthropic_item(view: ModelView, created: int) -> dict[str, Any]:
    return {
        "type": "model",
        "id": view.id,
        "display_name": view.id,
        "created_at": datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lifecycle": "active",
        "max_input_tokens": view.context_length,
    }


def _anthropic_page(models: list[ModelView], query: dict[str, str], created: int) -> dict[str, Any]:
    """One page in id order. The cursors compare ids, so a cursor whose model has since
    disappeared still pages on from where it was."""
    limit = _limit(query)
    after, before = query.get("after_id"), query.get("before_id")
    if before is not None:
        earlier = [view for view in models if view.id < before]
        page, has_more = earlier[-limit:], len(earlier) > limit
    else:
        later = [view for view in models if after is None or view.id > after]
        page, has_more = later[:limit], len(later) > limit
    return {
        "data": [_anthropic_item(view, created) for view in page],
        "has_more": has_more,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
    }


def _limit(query: dict[str, str]) -> int:
    text = query.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    # ASCII and short before int(): a huge or exotic digit string must be a 400, not a 500.
    if not (text.isascii() and text.isdigit() and len(text) <= 4 and 1 <= int(text) <= MAX_LIMIT):
        raise ApiError(
            400, "invalid_request", f"'limit' must be from 1 to {MAX_LIMIT}", param="limit"
        )
    return int(text)


OPENAI: Final = Shape(
    _openai_page,
    _openai_item,
    openai_error,
    "a valid API key is required (Authorization: Bearer KEY)",
    ID_HEADERS,
)
ANTHROPIC: Final = Shape(
    _anthropic_page,
    _anthropic_item,
    anthropic_error,
    "a valid API key is required (x-api-key: KEY)",
    REQUEST_ID_HEADERS,
)
