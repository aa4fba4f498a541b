"""`GET /v1/usage`: a consumer key's own usage, from the ledger (daemon/accounts/usage.py).

The same query as the admin route's `GET /v1/admin/usage` (`since`, `until`, `model`,
`group_by`), always narrowed to the calling key; `key_id` is not accepted. Authenticated by the
consumer key like the other consumer routes, errors in OpenAI's shape. Rows sent to the
ledger's writer before the call are counted (it waits for them to be committed).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Final
from urllib.parse import parse_qsl

import msgspec
import trio

from daemon.accounts.usage import UsageQuery, parse_query, query_usage
from daemon.api.asgi import Receive, Send, drain, send_api_error, send_json
from daemon.api.errors import ApiError, openai_error
from daemon.api.handler import authenticate, request_id_headers
from daemon.nursery.supervisor import Supervisor

PATH: Final = "/v1/usage"
_encoder: Final = msgspec.json.Encoder()


def query_from(query_string: bytes, *, allow_key_id: bool) -> UsageQuery:
    """The query of a request's query string; ApiError 400 for a bad parameter."""
    params = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    try:
        return parse_query(params, allow_key_id=allow_key_id)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None


async def usage_groups(sup: Supervisor, query: UsageQuery) -> dict[str, Any]:
    await sup.ledger.flush()
    groups = await trio.to_thread.run_sync(query_usage, sup.store.path, query)
    return {"object": "usage", "group_by": query.group_by, "data": groups}


class UsageRoute:
    """The ASGI handler of `GET /v1/usage`."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        ident = request_id_headers()
        try:
            payload = await self._answer(scope, receive)
        except ApiError as error:
            await send_api_error(send, error, ident, openai_error)
            return
        await send_json(send, 200, _encoder.encode(payload), ident)

    async def _answer(self, scope: dict[str, Any], receive: Receive) -> dict[str, Any]:
        if scope["method"] != "GET":
            await drain(receive)
            raise ApiError(405, "method_not_allowed", "use GET")
        key_id = await authenticate(self._sup, scope)
        query = query_from(scope.get("query_string", b""), allow_key_id=False)
        return await usage_groups(self._sup, replace(query, key_id=key_id))
