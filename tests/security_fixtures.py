"""The fixture of the security tests: a daemon started with the attack catalogue's settings,
its credentials issued and its honest provider connected (tests/attacks.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest
import trio

from tests.attacks import Target, Verdict, open_target, settle, task_count
from tests.conftest import ADMIN_KEY, StartDaemon


@pytest.fixture
async def target(start_daemon: StartDaemon, nursery: trio.Nursery) -> AsyncIterator[Target]:
    async with open_target(start_daemon, nursery, ADMIN_KEY) as opened:
        yield opened


def assert_refused(verdicts: list[Verdict]) -> None:
    through = [v for v in verdicts if not v.refused]
    assert verdicts and not through, "\n".join(f"{v.attack}: {v.detail}" for v in through)


async def assert_no_leak(target: Target, baseline: Counter[str]) -> None:
    found = await settle(target, baseline)
    assert not found, found


__all__ = ["assert_no_leak", "assert_refused", "target", "task_count"]
