"""The admission queue: a per-model FIFO of requests waiting for a capable provider's slot.

`admit()` answers at once when it can: a lease, a 404 for an unknown model, a 503 when no
connected provider is capable. Only when every capable provider is busy (or the model's
providers are reconnecting) does the request wait, at most `timeout` seconds in a queue of at
most `max_per_model`. The pump task, owned by the supervisor, parks on the registry's
generation counter; every change (a slot freed, a provider registered or passed a challenge,
a cooldown ended) re-runs the eligibility predicate for each waiter in FIFO order, so a
waiter that cannot use a freed provider never blocks one behind it that can.

In a cluster the limit is the cluster's: `changes` moves whenever a queue's depth does (the
cluster shares `depths()` with its peers, daemon/cluster/queues.py) and `waiting_elsewhere`
holds the others' depths as they last said them, so a request is refused as `QueueFull` when
the requests waiting for its model here and elsewhere reach `max_per_model`. Alone, the
others' depths stay empty: the limit is this instance's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, assert_never

import trio
from trio_util import AsyncValue

from daemon.routing.registry import Preflight, Registry, shown
from daemon.routing.types import Lease, RequestTraits


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A request that cannot be admitted, and the HTTP status and code to answer with."""

    message: str
    retry_after: int | None = None
    status: ClassVar[int] = 503
    code: ClassVar[str] = "service_unavailable"

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class UnknownModel(_Refusal):
    status: ClassVar[int] = 404
    code: ClassVar[str] = "model_not_found"


@dataclass(frozen=True, slots=True)
class Unavailable(_Refusal):
    status: ClassVar[int] = 503
    code: ClassVar[str] = "no_capable_provider"


@dataclass(frozen=True, slots=True)
class ContextTooLong(_Refusal):
    """The request cannot fit the context of any provider of its model: never retryable."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "context_length_exceeded"


@dataclass(frozen=True, slots=True)
class QueueFull(_Refusal):
    status: ClassVar[int] = 429
    code: ClassVar[str] = "queue_full"


@dataclass(frozen=True, slots=True)
class QueueTimeout(_Refusal):
    status: ClassVar[int] = 429
    code: ClassVar[str] = "queue_timeout"


Refusal = UnknownModel | Unavailable | ContextTooLong | QueueFull | QueueTimeout


@dataclass(eq=False)
class _Waiter:
    traits: RequestTraits
    done: trio.Event = field(default_factory=trio.Event)
    lease: Lease | None = None
    failure: Refusal | None = None


class AdmissionQueue:
    def __init__(self, registry: Registry, *, max_per_model: int, timeout: float) -> None:
        self._registry = registry
        self._max = max_per_model
        self._timeout = timeout
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._elsewhere: dict[str, int] = {}  # model -> waiting at the cluster's other instances
        self.changes = AsyncValue(0)  # moves whenever a depth does: the cluster shares them

    def retune(self, *, max_per_model: int, timeout: float) -> None:
        """New knobs from a reload; requests already waiting keep the deadline they got."""
        self._max, self._timeout = max_per_model, timeout

    def waiting(self, model: str) -> int:
        return len(self._waiting.get(model, ()))

    def depths(self) -> dict[str, int]:
        """Requests waiting per model (the metrics' queue depth)."""
        return {model: len(queue) for model, queue in self._waiting.items()}

    def waiting_elsewhere(self, depths: dict[str, int]) -> None:
        """The cluster's other instances' depths per model: the limit is the cluster's."""
        self._elsewhere = depths

    async def admit(self, traits: RequestTraits) -> Lease | Refusal:
        """A slot on the best capable provider, waiting in the queue if all are busy."""
        # Earlier waiters get first pick of anything already free; what they leave, none of
        # them can use, so the newcomer may take it without jumping the queue.
        self._pump()
        preflight = self._registry.preflight(traits)
        if preflight.verdict == "ready":
            lease = self._registry.reserve(traits, explore=True)
            if lease is not None:
                return lease
        return self._refusal(preflight) or await self._wait(traits)

    def _refusal(self, preflight: Preflight) -> Refusal | None:
        """What the preflight says without waiting; None: wait in the queue."""
        match preflight.verdict:
            case "unknown_model":
                return UnknownModel(preflight.reason)
            case "too_long":
                return ContextTooLong(preflight.reason)
            case "unavailable":
                return Unavailable(preflight.reason, retry_after=self._retry_after())
            case "ready" | "queue":
                return None
            case verdict:
                assert_never(verdict)

    async def _wait(self, traits: RequestTraits) -> Lease | Refusal:
        queue = self._waiting.get(traits.model)
        here = 0 if queue is None else len(queue)
        elsewhere = self._elsewhere.get(traits.model, 0)
        if here + elsewhere >= self._max:
            where = " in the cluster" if elsewhere else ""
            return QueueFull(
                f"the queue for model {shown(traits.model)} is full ({self._max} waiting{where})",
                retry_after=self._retry_after(),
            )
        if queue is None:
            queue = self._waiting[traits.model] = deque()
        waiter = _Waiter(traits)
        queue.append(waiter)
        self.changes.value += 1
        try:
            with trio.move_on_after(self._timeout):
                await waiter.done.wait()
        except BaseException:
            if waiter.lease is not None:  # granted as the client went away: give it back
                self._registry.release(waiter.lease)
            raise
        finally:
            self._leave(waiter)
        return self._outcome(waiter)

    def _leave(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.traits.model)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.changes.value += 1
        if queue is not None and not queue:
            del self._waiting[waiter.traits.model]
        if not waiter.done.is_set():
            waiter.done.set()  # timed out or cancelled: the pump must not grant it any more

    def _outcome(self, waiter: _Waiter) -> Lease | Refusal:
        if waiter.lease is not None:
            return waiter.lease
        if waiter.failure is not None:
            return waiter.failure
        return QueueTimeout(
            f"no provider of model {shown(waiter.traits.model)} became free"
            f" within {self._timeout:g} s",
            retry_after=self._retry_after(),
        )

    def _retry_after(self) -> int:
        return max(1, round(self._timeout / 4))

    # The pump ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Re-offer freed capacity to waiters after every registry change (supervisor task)."""
        task_status.started()
        while True:
            await self._registry.generation.wait_transition()
            self._pump()

    def _pump(self) -> None:
        for queue in list(self._waiting.values()):
            for waiter in list(queue):
                self._offer(queue, waiter)

    def _offer(self, queue: deque[_Waiter], waiter: _Waiter) -> None:
        if waiter.done.is_set():
            return
        lease = self._registry.reserve(waiter.traits, explore=True)
        if lease is not None:
            waiter.lease = lease
        else:
            waiter.failure = self._hopeless(waiter.traits)
            if waiter.failure is None:
                return
        queue.remove(waiter)
        self.changes.value += 1
        waiter.done.set()

    def _hopeless(self, traits: RequestTraits) -> Refusal | None:
        """A waiter whose model lost every capable provider fails now, not at its timeout."""
        return self._refusal(self._registry.preflight(traits))
