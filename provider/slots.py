"""The node's request slots: at most `capacity` requests in flight, each with its cancel scope.

The scopes are kept by request id so `cancel` can abort one request at once. A slot is freed
as soon as its request has nothing more to say to the daemon (its terminal is about to be
queued, or it was cancelled), so the next request is never refused because of one that has
finished; `running` counts request tasks until they have fully unwound, which is what a drain
waits for. Every mutation is a plain method with no `await`, so it is atomic under Trio.
"""

from __future__ import annotations

import trio
from trio_util import AsyncValue


class Slots:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._scopes: dict[str, trio.CancelScope] = {}
        self.running: AsyncValue[int] = AsyncValue(0)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._scopes

    @property
    def in_use(self) -> int:
        return len(self._scopes)

    @property
    def full(self) -> bool:
        return self.in_use >= self.capacity

    def claim(self, request_id: str) -> trio.CancelScope:
        """Take a slot for a new request task; pair it with one `task_done()`."""
        scope = trio.CancelScope()
        self._scopes[request_id] = scope
        self.running.value += 1
        return scope

    def release(self, request_id: str) -> None:
        """Free the request's slot (idempotent)."""
        self._scopes.pop(request_id, None)

    def task_done(self) -> None:
        self.running.value -= 1

    def cancel(self, request_id: str, reason: str) -> bool:
        """Abort one request; False when it is not in flight (finished or never seen)."""
        scope = self._scopes.get(request_id)
        if scope is None:
            return False
        scope.cancel(reason=reason)
        # The request sends nothing more: its slot is free even while its task unwinds.
        self.release(request_id)
        return True
