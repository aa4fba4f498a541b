"""Counting text with the backend's own tokenizer, and remembering whether it has one.

llama-cpp-python serves `POST /extras/tokenize` (`{"model", "input"}`, BOS added and special
tokens parsed) and llama-server `POST /tokenize` (`{"content", "add_special"}`); both answer
`{"tokens": [...]}` and each answers 404 to the other's route, as Ollama does to both. One
`Tokenizer` per backend remembers the route that answered. A route refused with a 404 or a 400
(another server's shape) is not asked again; once every route was refused, none is asked for
`ROUTE_RETRY` seconds, so a backend without a tokenizer costs one refused call per route per
interval, not one per request.

`count` makes at most one round trip: the route known to answer or, while none is, the next one
not yet refused. A failure (down, timed out, an answer of another shape) gives None: the caller
estimates. `counted` counts a served request's prompt as its template renders it where the
node has the template (`provider.rendered`), else its text alone, which misses the template's
own tokens.
"""

from __future__ import annotations

import math
from typing import Any, Final

import msgspec
import trio

from protocol.messages import Usage
from provider.backend import Backend
from provider.failures import RequestFailure
from provider.rendered import prompt_to_count
from provider.repair import PreparedRequest
from provider.templates import TemplateSet

# Each route: its path, the field its text goes in, and what else it needs to count like the
# server counts a prompt (llama-server adds BOS only when asked).
ROUTES: Final[tuple[tuple[str, str, dict[str, Any]], ...]] = (
    ("/extras/tokenize", "input", {}),
    ("/tokenize", "content", {"add_special": True}),
)
# A backend with no tokenizer is asked again after this long (it may have been replaced).
ROUTE_RETRY: Final = 600.0
# The longest a served request's terminal frame waits for its prompt to be counted.
COUNT_TIMEOUT: Final = 2.0
# The failures that say "no such route here", not "the backend is in trouble".
_ABSENT: Final = frozenset({"not_found", "bad_request"})


class Tokenizer:
    """The tokenizer of one backend, as far as it has one."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        # The chat templates the operator gave, by model id (kept up to date by the node).
        self.templates: dict[str, TemplateSet] = {}
        self._route: int | None = None  # index into ROUTES of the route that answered
        self._refused: set[int] = set()
        self._retry_at = -math.inf

    async def count(self, model: str | None, text: str) -> int | None:
        """Tokens in `text` by the backend's tokenizer, in one round trip; None if unknown."""
        index = self._next_route()
        if index is None:
            return None
        path, field, extra = ROUTES[index]
        try:
            answer = await self.backend.post_json(path, {"model": model, field: text, **extra})
        except RequestFailure as failure:
            if failure.reason in _ABSENT:
                self._refuse(index)
            return None  # down or slow this time: asked again next time
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            self._refuse(index)  # a 200 of another shape: not a tokenizer
            return None
        self._route = index
        return len(tokens)

    def _next_route(self) -> int | None:
        if self._route is not None:
            return self._route
        if len(self._refused) == len(ROUTES) and trio.current_time() >= self._retry_at:
            self._refused.clear()
        return next((i for i in range(len(ROUTES)) if i not in self._refused), None)

    def _refuse(self, index: int) -> None:
        self._refused.add(index)
        if self._route == index:
            self._route = None
        if len(self._refused) == len(ROUTES):
            self._retry_at = trio.current_time() + ROUTE_RETRY


async def counted(tokenizer: Tokenizer, usage: Usage, prepared: PreparedRequest) -> Usage:
    """`usage` with the tokenizer's prompt count when it was estimated and the count comes soon.

    Asked after the stream, never beside it: llama-cpp-python serves one request at a time and
    by default interrupts a stream when another request arrives (`interrupt_requests`), so a
    concurrent count would cut the answer short. The terminal frame waits at most
    COUNT_TIMEOUT; the content is already with the consumer by then.
    """
    if not usage.estimated:
        return usage
    templates = tokenizer.templates.get(prepared.model or "")
    with trio.move_on_after(COUNT_TIMEOUT):
        text = await prompt_to_count(prepared, templates)
        count = await tokenizer.count(prepared.model, text)
        if count is not None:
            return msgspec.structs.replace(usage, prompt_tokens=count, estimated=None)
    return usage
