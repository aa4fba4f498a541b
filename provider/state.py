"""What the supervisor and its sessions share: the backend, the models, the drain switch.

The supervisor (`provider.node`) owns one `NodeState` for the node's lifetime and keeps it up
to date; each WebSocket session reads it and waits on its AsyncValues, so a session started
after a reconnect picks up where the last one left off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import trio
from trio_util import AsyncBool, AsyncValue

from protocol.messages import ModelInfo
from provider.backend import Backend
from provider.models import GENERIC_KIND
from provider.tokenizer import Tokenizer


@dataclass
class NodeState:
    backend: Backend
    backend_kind: str = GENERIC_KIND
    models: AsyncValue[tuple[ModelInfo, ...]] = field(default_factory=lambda: AsyncValue(()))
    draining: AsyncBool = field(default_factory=AsyncBool)
    # When draining, in-flight requests get until this (trio clock) time to finish.
    drain_deadline: float = math.inf
    # The backend's tokenizer, shared by every request so its routes are learnt once.
    tokenizer: Tokenizer = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer = Tokenizer(self.backend)

    def context_length(self, model_id: str | None) -> int | None:
        """The advertised context of `model_id`, in tokens; None when it is not known."""
        for model in self.models.value:
            if model.id == model_id:
                return model.context_length
        return None

    def start_draining(self, grace: float) -> None:
        """Stop taking requests; idempotent, so a second call never extends the grace."""
        if not self.draining.value:
            self.drain_deadline = trio.current_time() + grace
            self.draining.value = True
