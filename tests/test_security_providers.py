"""Security suite: provider impersonation over the real WebSocket (tests/attacks.py,
`attack_providers`): refused, trust lost where PROTOCOL.md §3-§4 say, and a concurrent
honest request completes whole."""

from __future__ import annotations

from tests.attacks import Target, attack_providers
from tests.security_fixtures import assert_no_leak, assert_refused, task_count


async def test_impersonating_providers_are_refused_and_nobody_else_notices(target: Target) -> None:
    baseline = task_count()
    assert_refused(await attack_providers(target))
    await assert_no_leak(target, baseline)
