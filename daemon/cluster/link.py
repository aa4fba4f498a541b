"""The ingress's side of a remote provider: a `ProviderLink` whose frames cross a link.

A `Peer` is another instance as this one's requests see it: the streams of the requests it
relays for us, and when we last heard from it. A `RemoteLink` is one provider that peer
holds; dispatch talks to it exactly as to a local session (`daemon/routing/types.py`): the
race, the hedge, the deadlines and the relay cannot tell them apart. Nothing here waits:
`post` queues a message for the instance's one writer and raises SessionGone when it cannot.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from daemon.cluster import wire
from daemon.routing.streams import StreamFrame, Streams
from daemon.routing.types import SessionGone
from protocol.messages import EncryptedPayload

# (target instance, kind, request id, data): queue one message on the link to the target;
# SessionGone if it cannot go out (the link is closed, or its writer is this far behind).
Post = Callable[[str, wire.Kind, str, bytes], None]


class Peer:
    def __init__(self, instance: str, post: Post) -> None:
        self.instance = instance
        self.streams = Streams()
        self.last_heard = trio.current_time()
        self.pinged_at = -math.inf
        self.dead: str | None = None  # why it is taken for dead, if it is
        self._post = post

    def heard(self) -> None:
        self.last_heard = trio.current_time()
        self.dead = None

    def post(self, kind: wire.Kind, request_id: str, data: bytes = b"") -> None:
        if self.dead is not None:
            raise SessionGone
        self._post(self.instance, kind, request_id, data)

    def died(self, reason: str) -> None:
        """Every request it relays ends now (a disconnect: failover before content)."""
        self.dead = reason
        self.streams.close_all()


class RemoteLink:
    """One provider held by `peer`, as a ProviderLink."""

    def __init__(self, peer: Peer, provider_id: str, epoch: int) -> None:
        self.peer = peer
        self.provider_id = provider_id
        self.epoch = epoch

    def open_stream(self, request_id: str) -> trio.MemoryReceiveChannel[StreamFrame]:
        if not len(self.peer.streams):
            self.peer.last_heard = trio.current_time()  # silence counts from now
        return self.peer.streams.open(request_id)

    def start(self, request_id: str, body: EncryptedPayload, model: str = "") -> None:
        dispatch = wire.Dispatch(self.provider_id, self.epoch, model, body)
        self.peer.post(wire.Kind.DISPATCH, request_id, wire.encode(dispatch))

    def cancel(self, request_id: str) -> None:
        self.peer.streams.finish(request_id)
        try:
            self.peer.post(wire.Kind.CANCEL, request_id)
        except SessionGone:
            pass  # its owner cancels what it relays when it loses us (node.py)

    def finish(self, request_id: str) -> None:
        self.peer.streams.finish(request_id)

    def kick(self, code: int, reason: str) -> None:
        """A newer session of this identity proved itself here: its owner closes this one."""
        report = wire.Report(self.provider_id, "", "", code, reason[:120])
        try:
            self.peer.post(wire.Kind.KICK, "", wire.encode(report))
        except SessionGone:
            pass  # the epochs settle it when the directory is back (node.py)

    def fell_behind(self, request_id: str) -> bool:
        return self.peer.streams.fell_behind(request_id)
