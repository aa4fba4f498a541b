"""The owner's side of a remote attempt: a provider's frames onto the ingress's link, verbatim.

A `Forward` is the raw sink (`daemon/routing/streams.py`) of one relayed request: the provider
session's reader calls it with each frame's text as the provider sent it, and it queues that
text on the link the dispatch came from, untouched and at once (no task switch, no decoding
or encoding here: the session decoded the frame once for its own bookkeeping, the ingress
decodes it once as a local session would). The relay task only waits for `ended`: one of the
closed outcomes below, or its cancel scope (the ingress cancelled, or went away).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from daemon.cluster import wire
from daemon.cluster.peerlink import Connection
from daemon.routing.types import SessionGone


@dataclass(frozen=True)
class Relayed:
    """The provider's terminal frame went to the ingress."""


@dataclass(frozen=True)
class SessionEnded:
    """The provider's session ended first; the ingress was told (`gone`)."""


@dataclass(frozen=True)
class IngressUnreachable:
    """The link to the ingress is closed or full: the provider must be cancelled."""


RelayEnd = Relayed | SessionEnded | IngressUnreachable


class Forward:
    def __init__(self, via: Connection, request_id: str) -> None:
        self._via = via
        self._request_id = request_id
        self._ended_send, self.ended = trio.open_memory_channel[RelayEnd](1)

    def frame(self, text: str, final: bool) -> None:
        try:
            self._via.send(wire.Kind.FRAME, self._request_id, text.encode())
        except SessionGone:
            self._end(IngressUnreachable())
            return
        if final:
            self._end(Relayed())

    def session_ended(self) -> None:
        try:
            self._via.send(wire.Kind.GONE, self._request_id)
        except SessionGone:
            pass  # the ingress lost the link too: its request ends on that
        self._end(SessionEnded())

    def _end(self, outcome: RelayEnd) -> None:
        try:
            self._ended_send.send_nowait(outcome)
        except trio.WouldBlock:
            pass  # it already ended: the first outcome stands
