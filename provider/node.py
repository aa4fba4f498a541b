"""The supervisor: keeps the node connected, its model list current, and drains it on SIGTERM.

`ProviderNode.run` owns two things for the node's whole life: the model poller (`GET
/v1/models` at start and every 30 s, and llama-server's `GET /props` for its context size;
each model with a `--chat-template` self-checked once (`provider.selfcheck`) and kept for
counting its prompts (`provider.rendered`); a change reaches the daemon as `models_update`
through the live session) and the reconnect loop (one session at a time, forever, with
exponential backoff and full jitter between them; after a `1001 going away` within a second,
`provider.backoff`). `serve` is
the process: the HTTP client, the node, the signal watcher that turns SIGTERM into a drain,
and its reports to systemd (`READY=1` once the first model poll answered, `WATCHDOG=1` from the
event loop, `STOPPING=1` when the drain starts).
"""

from __future__ import annotations

import logging
import os
import random
import signal
from contextlib import aclosing
from typing import Final

import msgspec
import trio
from trio_util import periodic

from hosting.sd_notify import Notifier, open_notifier
from protocol.messages import ModelInfo
from provider.backend import Backend, open_client
from provider.backoff import Backoff
from provider.config import ProviderConfig, node_version
from provider.ending import EndKind, SessionEnd
from provider.failures import RequestFailure
from provider.keys import NodeKeys
from provider.models import (
    default_concurrency,
    guess_backend_kind,
    model_infos,
    props_context_length,
)
from provider.selfcheck import self_check_loaded
from provider.session import SessionSettings, run_session
from provider.state import NodeState

log = logging.getLogger(__name__)

MODEL_POLL_INTERVAL: Final = 30.0


class ProviderNode:
    def __init__(
        self,
        config: ProviderConfig,
        keys: NodeKeys,
        backend: Backend,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.state = NodeState(backend=backend)
        self._rng = rng or random.Random()
        self._backend_up: bool | None = None
        self._templates = dict(config.chat_templates)
        self._context_lengths = dict(config.context_lengths)
        # Verdicts by the ModelInfo they were computed for: a template is checked once per model
        # (and again only if the backend starts reporting that model differently).
        self._checked: dict[ModelInfo, ModelInfo] = {}
        self._unlisted_warned: set[str] = set()
        self._context_warned: set[str] = set()

    def drain(self) -> None:
        """Stop taking requests, finish those in flight (up to the grace), then stop."""
        self.state.start_draining(self.config.drain_grace)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained. `started` once the first model poll has answered or failed."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._poll_models)
            task_status.started()
            await self._connect_until_drained()
            nursery.cancel_scope.cancel(reason="node drained")

    # --- models ----------------------------------------------------------------------------

    async def _poll_models(self, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        # aclosing: a cancel that lands in the loop body must still finish the generator.
        async with aclosing(periodic(MODEL_POLL_INTERVAL)) as polls:
            async for _ in polls:
                await self.refresh_models()
                if not started:
                    task_status.started()
                    started = True

    async def refresh_models(self) -> None:
        """Ask the backend for its models; keep the last list while it does not answer."""
        backend = self.state.backend
        try:
            listing = await backend.list_models()
        except RequestFailure as failure:
            if self._backend_up is not False:
                log.warning("backend %s: %s", backend.base_url, failure.message)
            self._backend_up = False
            return
        if self._backend_up is not True:
            log.info("backend %s answers", backend.base_url)
        self._backend_up = True
        self.state.backend_kind = self.config.backend_name or guess_backend_kind(
            listing, backend.base_url
        )
        self._warn_unlisted_templates(listing.ids)
        infos = model_infos(
            listing, vision=self.config.vision, context_lengths=self._context_lengths
        )
        models = await self._with_verdicts(await self._with_props_context(infos))
        self._warn_unknown_contexts(models)
        if models != self.state.models.value:
            log.info("backend models: %s", ", ".join(m.id for m in models) or "(none)")
            self.state.models.value = models

    async def _with_props_context(self, models: tuple[ModelInfo, ...]) -> tuple[ModelInfo, ...]:
        # One llama-server serves one model and says its context in /props. A router serving
        # several answers for itself there, and asking per model could make it load one.
        if self.state.backend_kind != "llama.cpp" or len(models) != 1:
            return models
        (model,) = models
        if model.context_length is not None:
            return models
        try:
            props = await self.state.backend.get_json("/props")
        except RequestFailure:
            return models  # an older build or a proxy without it: the context stays unknown
        context = props_context_length(props)
        return (msgspec.structs.replace(model, context_length=context),) if context else models

    async def _with_verdicts(self, models: tuple[ModelInfo, ...]) -> tuple[ModelInfo, ...]:
        checked = []
        for model in models:
            source = self._templates.get(model.id)
            if source is not None and model not in self._checked:
                self._checked[model], templates = await self_check_loaded(model, source)
                if templates is not None:  # for counting its prompts (`provider.rendered`)
                    self.state.tokenizer.templates[model.id] = templates
            checked.append(self._checked.get(model, model))
        return tuple(checked)

    def _warn_unlisted_templates(self, ids: tuple[str, ...]) -> None:
        for model_id in self._templates.keys() - set(ids) - self._unlisted_warned:
            log.warning("--chat-template names %s, a model the backend does not list", model_id)
            self._unlisted_warned.add(model_id)

    def _warn_unknown_contexts(self, models: tuple[ModelInfo, ...]) -> None:
        # Only llama-cpp-python both hides its context size and fails over-long prompts with
        # an empty stream: without the size, those look like backend failures (provider.fit).
        if self.state.backend_kind != "llama-cpp-python":
            return
        for model in models:
            if model.context_length is None and model.id not in self._context_warned:
                log.warning(
                    "llama-cpp-python does not report the context size of %s: give it with "
                    "--context-length %s=N (the server's --n_ctx), or prompts too long for it "
                    "are reported as backend failures",
                    model.id,
                    model.id,
                )
                self._context_warned.add(model.id)

    # --- sessions --------------------------------------------------------------------------

    async def _connect_until_drained(self) -> None:
        backoff = Backoff(self._rng)
        while not self.state.draining.value:
            end = await run_session(self._session_settings(), self.state)
            _log_end(end)
            if end.kind is EndKind.DRAINED or self.state.draining.value:
                return
            if end.kind is EndKind.GOING_AWAY:  # moved by a deploy or a rebalance: go now
                delay = backoff.going_away(end.uptime)
            else:
                backoff.session_ended(end.uptime)
                delay = backoff.next_delay()
            log.info("reconnecting in %.1f s", delay)
            with trio.move_on_after(delay):
                await self.state.draining.wait_value(True)

    def _session_settings(self) -> SessionSettings:
        capacity = self.config.max_concurrency or default_concurrency(self.state.backend_kind)
        return SessionSettings(
            coordinator=self.config.coordinator,
            keys=self.keys,
            version=node_version(),
            capacity=capacity,
            token=self.config.token,
        )


def _log_end(end: SessionEnd) -> None:
    match end.kind:
        case EndKind.DRAINED:
            log.info("session ended: %s", end.describe())
        case EndKind.REJECTED | EndKind.POLICY:
            log.error("session ended: %s", end.describe())
        case _:
            log.warning("session ended: %s", end.describe())


async def serve(config: ProviderConfig, keys: NodeKeys) -> None:
    """The whole node process: runs until drained (SIGTERM) or stopped (a second SIGTERM)."""
    async with open_client(config.backend_timeout) as client, open_notifier(os.environ) as sd:
        node = ProviderNode(config, keys, Backend(client, config.backend))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain_on_sigterm, node, nursery.cancel_scope, sd)
            await nursery.start(sd.keep_alive)
            await nursery.start(_run_until_drained, node, nursery.cancel_scope)
            await sd.ready(f"serving {config.backend} to {config.coordinator}")


async def _run_until_drained(
    node: ProviderNode, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
) -> None:
    await node.run(task_status=task_status)
    scope.cancel(reason="node drained")


async def _drain_on_sigterm(node: ProviderNode, scope: trio.CancelScope, sd: Notifier) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            if node.state.draining.value:
                log.warning("second SIGTERM: stopping now")
                scope.cancel(reason="second SIGTERM")
                return
            log.info("SIGTERM: draining for up to %g s", node.config.drain_grace)
            node.drain()
            await sd.stopping(f"draining for up to {node.config.drain_grace:g} s")
