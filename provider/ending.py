"""Why a session with the daemon ended, in words an operator can act on.

Every session returns one `SessionEnd`. The close codes are the daemon's (PROTOCOL.md §1):
1008 policy (a rejected token arrives as `trust_status: rejected` first, then 1008), 4001
superseded, 4002 stale, 1001 daemon shutting down or moving the node to another instance
(a deploy or a rebalance, docs/cluster.md): the node reconnects within a second.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from trio_websocket import CloseReason

from protocol.messages import CloseCode


class EndKind(enum.Enum):
    UNREACHABLE = "daemon unreachable"
    REJECTED = "registration rejected"
    POLICY = "protocol violation"
    SUPERSEDED = "superseded"
    STALE = "stale"
    GOING_AWAY = "daemon shutting down"
    LOST = "connection lost"
    UNRESPONSIVE = "daemon unresponsive"
    CLOSED = "closed"
    DRAINED = "drained"


@dataclass(frozen=True)
class SessionEnd:
    kind: EndKind
    detail: str
    # Seconds from the WebSocket opening to its end; 0 when it never opened.
    uptime: float = 0.0

    def describe(self) -> str:
        return f"{self.kind.value}: {self.detail}"


def from_close(reason: CloseReason | None, rejection: str | None, uptime: float) -> SessionEnd:
    """The end a close frame (or its absence) means; `rejection` is a trust_status reason."""
    if rejection is not None:
        detail = f"the daemon refused this node ({rejection}); check --token"
        return SessionEnd(EndKind.REJECTED, detail, uptime)
    if reason is None:
        return SessionEnd(EndKind.LOST, "the connection dropped", uptime)
    kind, detail = _by_code(reason.code)
    if reason.reason:
        detail = f"{detail} ({reason.reason})"
    return SessionEnd(kind, detail, uptime)


def _by_code(code: int) -> tuple[EndKind, str]:
    match code:
        case CloseCode.POLICY:
            return EndKind.POLICY, "the daemon closed the connection for a policy violation"
        case CloseCode.SUPERSEDED:
            return EndKind.SUPERSEDED, "another node with this identity key connected"
        case CloseCode.STALE:
            return EndKind.STALE, "the daemon heard nothing from this node for too long"
        case CloseCode.GOING_AWAY:
            return EndKind.GOING_AWAY, "the daemon is shutting down or moving this node"
        case 1006:  # RFC 6455: the connection ended without a close frame
            return EndKind.LOST, "the connection dropped without a close frame"
    return EndKind.CLOSED, f"the daemon closed the connection with code {code}"
