"""An operator's hands on a provider another instance holds: forwarded to its owner.

A drain, an undrain or a cooldown reset (daemon/api/admin.py) of a remote provider is the
owner's to apply, as everything about a provider's session is: `forward` sends an `admin`
message (`AdminOrder`) to the owner and waits at most `ANSWER_S` for its `admin_done`
(`AdminAnswer`). The owner applies it to its live entry (`apply`) and its next record carries
the change to every instance (within one publish). The asking instance applies the owner's
answer to its replica at once, so its own view agrees before that record arrives.

A local provider goes through `apply` too: in a cluster a cooldown reset must also forget
the provider's cooldowns kept in Redis (`forget_cooldowns`), or its next owner would load
them again. This module imports no Redis client: the admin API imports it alone.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, assert_never

import msgspec
import trio

from daemon.cluster import wire
from daemon.cluster.link import Post
from daemon.routing.registry import Registry
from daemon.routing.types import ProviderEntry, SessionGone

ANSWER_S: Final = 2.0


class Action(enum.StrEnum):
    DRAIN = "drain"
    UNDRAIN = "undrain"
    CLEAR_COOLDOWNS = "clear_cooldowns"


class AdminOrder(msgspec.Struct, frozen=True):
    provider_id: str
    action: Action


class AdminAnswer(msgspec.Struct, frozen=True):
    provider_id: str
    found: bool  # False: the provider is not (or no longer) connected to the owner
    drained: bool = False
    in_flight: int = 0
    cleared: int = 0


@dataclass(frozen=True)
class Applied:
    """Done by the provider's owner: this instance (`owner` None) or the one named."""

    answer: AdminAnswer
    owner: str | None


@dataclass(frozen=True)
class NotThere:
    """The owner the directory names does not hold the provider (any more)."""

    owner: str


@dataclass(frozen=True)
class Unreachable:
    """The order could not be sent, or its answer did not come within ANSWER_S."""

    owner: str
    reason: str
    sent: bool  # False: never sent (the cluster's Redis is down, the owner taken for dead)


Outcome = Applied | NotThere | Unreachable

_order = msgspec.json.Decoder(AdminOrder)
_answer = msgspec.json.Decoder(AdminAnswer)


def apply(registry: Registry, entry: ProviderEntry, action: Action) -> AdminAnswer:
    """Apply `action` to `entry` here (a local entry, or a remote entry's replica)."""
    match action:
        case Action.DRAIN | Action.UNDRAIN:
            registry.set_held(entry, action is Action.DRAIN)
            return AdminAnswer(entry.provider_id, True, entry.held, entry.in_flight)
        case Action.CLEAR_COOLDOWNS:
            cleared = len(registry.breaker.cooldowns(entry.provider_id, trio.current_time()))
            registry.clear_cooldowns(entry)
            return AdminAnswer(entry.provider_id, True, entry.held, entry.in_flight, cleared)
        case never:
            assert_never(never)


class RemoteAdmin:
    def __init__(
        self, registry: Registry, post: Post, forget_cooldowns: Callable[[str], None]
    ) -> None:
        self._registry = registry
        self._post = post
        self._forget_cooldowns = forget_cooldowns
        # request id -> (the owner asked, where its answer goes)
        self._pending: dict[str, tuple[str, trio.MemorySendChannel[AdminAnswer]]] = {}

    def apply_here(self, entry: ProviderEntry, action: Action) -> Applied:
        """A local provider's order, from this instance's admin or an `admin` message."""
        answer = apply(self._registry, entry, action)
        if action is Action.CLEAR_COOLDOWNS:
            self._forget_cooldowns(entry.provider_id)
        return Applied(answer, None)

    async def forward(self, entry: ProviderEntry, owner: str, action: Action) -> Outcome:
        """Send `action` to `owner`, wait for its answer; apply that to the replica."""
        if entry.unreachable is not None:
            # Refused for routing (the owner taken for dead, or Redis down: the owner could not
            # publish the order to the others): refused for orders too, never half applied.
            return Unreachable(owner, f"the provider's daemon is {entry.unreachable}", sent=False)
        request_id = uuid.uuid4().hex
        send, receive = trio.open_memory_channel[AdminAnswer](1)
        self._pending[request_id] = (owner, send)
        try:
            order = wire.encode(AdminOrder(entry.provider_id, action))
            try:
                self._post(owner, wire.Kind.ADMIN, request_id, order)
            except SessionGone:
                return Unreachable(owner, "the provider's daemon is unreachable", sent=False)
            with trio.move_on_after(ANSWER_S):
                answer = await receive.receive()
                if not answer.found:
                    return NotThere(owner)
                if self._registry.is_current(entry):
                    apply(self._registry, entry, action)  # the owner's record will agree
                return Applied(answer, owner)
            return Unreachable(
                owner, f"the provider's daemon did not answer within {ANSWER_S:g} s", sent=True
            )
        finally:
            del self._pending[request_id]
            send.close()
            receive.close()

    def ordered(self, sender: str, request_id: str, data: bytes) -> None:
        """An `admin` message: apply it if the provider is ours, answer either way."""
        order = _order.decode(data)
        entry = self._registry.get(order.provider_id)
        if entry is None or entry.owner is not None:
            answer = AdminAnswer(order.provider_id, False)
        else:
            answer = self.apply_here(entry, order.action).answer
        try:
            self._post(sender, wire.Kind.ADMIN_DONE, request_id, wire.encode(answer))
        except SessionGone:
            pass  # the asker answers its admin with a timeout

    def answered(self, sender: str, request_id: str, data: bytes) -> None:
        """An `admin_done` message: the answer an order here waits for (if it still does),
        from the owner it was sent to and no other instance."""
        pending = self._pending.get(request_id)
        if pending is not None and pending[0] == sender:
            send = pending[1]
            try:
                send.send_nowait(_answer.decode(data))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # a duplicate answer
