"""The official `openai` SDK pointed at a real daemon: clients, fakes, and a worker thread.

Shared by the chat and Responses SDK tests. Non-streaming calls use `AsyncOpenAI` under Trio;
streaming calls use the synchronous client in a worker thread (`in_thread`), because the
async stream leaves its inner generators unclosed, which Trio reports as a ResourceWarning.
`strict` makes every client validate each event and object against the SDK's own types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import openai
import trio

from daemon.api.serve import RunningDaemon
from tests.conftest import StartDaemon
from tests.consumer_harness import BOUND_S, DISPATCH_ENV, create_key
from tests.fakes.provider import Behaviour, FakeProvider, start_fakes

T = TypeVar("T")


@dataclass
class Sdk:
    daemon: RunningDaemon
    key: str
    nursery: trio.Nursery
    strict: bool = False

    @property
    def base_url(self) -> str:
        return self.daemon.base_url + "/v1"

    async def connect(self, *behaviours: Behaviour) -> list[FakeProvider]:
        fakes = [FakeProvider(self.daemon.provider_url, behaviour=b) for b in behaviours]
        return await start_fakes(self.nursery, fakes)

    def _options(self, key: str | None) -> dict[str, Any]:
        options: dict[str, Any] = {
            "base_url": self.base_url,
            "api_key": key or self.key,
            "max_retries": 0,
            "timeout": BOUND_S,
        }
        if self.strict:
            options["_strict_response_validation"] = True
        return options

    def async_client(self, key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(**self._options(key))

    async def in_thread(self, call: Callable[[openai.OpenAI], T]) -> T:
        """Run `call` with a synchronous client in a worker thread."""

        def run() -> T:
            with openai.OpenAI(**self._options(None)) as client:
                return call(client)

        with trio.fail_after(BOUND_S):
            return await trio.to_thread.run_sync(run)


async def open_sdk(start_daemon: StartDaemon, nursery: trio.Nursery, *, strict: bool) -> Sdk:
    """A daemon with the dispatch test timings and a consumer key for it."""
    daemon = await start_daemon(**DISPATCH_ENV)
    async with httpx.AsyncClient(base_url=daemon.base_url, timeout=BOUND_S) as client:
        _, key = await create_key(client, "sdk")
    return Sdk(daemon, key, nursery, strict)
