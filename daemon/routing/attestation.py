"""The attestation task of one provider session: challenges, answers and verdicts.

A challenge goes out the moment the provider registers, then every `challenge_interval_s`
(PROTOCOL.md §4). The provider has `challenge_answer_s` to sign `nonce + timestamp` with its
identity key; only the outstanding nonce counts, once, so an unknown or replayed answer is
ignored. Each verdict is recorded in the registry (which decides trust) and sent back as
`trust_status`. The first verdict is the session's to settle first: it decides whether a
connection that claimed a live identity takes its place or is closed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import trio
from trio_util import periodic

from daemon.config import Settings
from daemon.routing.registry import Registry
from daemon.routing.types import ProviderEntry, SessionGone
from protocol import crypto
from protocol.messages import (
    MULTI_SSE,
    AttestationChallenge,
    AttestationResponse,
    DaemonMessage,
    TrustStatus,
)

log = logging.getLogger("dinfer.session")

Post = Callable[[DaemonMessage], None]
# Hears whether the first challenge passed, before its verdict is sent; False: the session
# is closing and sends its own last word.
Settle = Callable[[bool], bool]


@dataclass
class _Challenge:
    nonce: str
    timestamp: str
    answered: trio.Event = field(default_factory=trio.Event)
    passed: bool = False


class Attestation:
    """Challenges one session's provider; `answer` takes its replies from the reader."""

    def __init__(
        self, entry: ProviderEntry, registry: Registry, settings: Settings, post: Post
    ) -> None:
        self._entry = entry
        self._registry = registry
        self._settings = settings
        self._post = post
        self._challenge: _Challenge | None = None

    async def run(self, settle: Settle) -> None:
        """Challenge at once, then every interval, until the session ends.

        `settle` hears the first verdict before it goes out; when it answers False the
        session is closing with a last word of its own, and this task ends.
        """
        first: Settle | None = settle
        # aclosing: a cancelled loop must close the generator itself, not leave it to the GC.
        async with aclosing(periodic(self._settings.challenge_interval_s)) as ticks:
            try:
                async for _ in ticks:
                    passed = await self._challenge_once()
                    self._record(passed)
                    if first is not None and not first(passed):
                        return
                    first = None
                    self._post(self._trust_status())
            except SessionGone:
                pass  # the session is ending: whoever ended it said why

    def answer(self, response: AttestationResponse) -> None:
        challenge = self._challenge
        if challenge is None or challenge.nonce != response.nonce or challenge.answered.is_set():
            return  # unknown or replayed nonce: ignored (PROTOCOL.md §4)
        challenge.passed = crypto.verify_challenge(
            self._entry.identity_key, challenge.nonce, challenge.timestamp, response.signature
        )
        challenge.answered.set()

    async def _challenge_once(self) -> bool:
        """Send a challenge; True when the right signature came back within the window."""
        challenge = _Challenge(crypto.new_challenge_nonce(), crypto.challenge_timestamp())
        self._challenge = challenge
        self._post(AttestationChallenge(nonce=challenge.nonce, timestamp=challenge.timestamp))
        with trio.move_on_after(self._settings.challenge_answer_s):
            await challenge.answered.wait()
        self._challenge = None
        return challenge.passed

    def _record(self, passed: bool) -> None:
        entry = self._entry
        if passed:
            self._registry.challenge_passed(entry)
        elif self._registry.challenge_failed(entry):
            log.warning("provider %s untrusted after failed challenges", entry.provider_id)

    def _trust_status(self) -> TrustStatus:
        entry = self._entry
        extensions = [MULTI_SSE] if entry.multi_sse else None
        if entry.trusted:
            return TrustStatus(status="trusted", extensions=extensions)
        reason = entry.banned_reason or f"{entry.challenge_failures} failed challenge(s)"
        return TrustStatus(status="untrusted", reason=reason, extensions=extensions)
