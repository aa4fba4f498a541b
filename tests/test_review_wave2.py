"""Defects found by the second outside review, each pinned by what a user would see."""

from __future__ import annotations

import trio
from trio.testing import MockClock

from tests.dispatch_harness import World, drain
from tests.fakes.provider import Fail, answer


async def test_two_busy_providers_of_different_versions_do_not_blame_the_request(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    """503 is capacity (PROTOCOL.md §6: try elsewhere): two busy providers prove nothing
    about the request, so the third, free one still answers."""
    world = World(nursery)
    world.provider([Fail(503, "busy")], version="0.6.3")
    world.provider([Fail(503, "busy")], version="0.7.0")
    c = world.provider(answer("third"), version="0.8.0")

    committed = await world.dispatch()
    await drain(committed)

    assert committed.provider_id == c.id and committed.attempts == 3
    await world.assert_nothing_leaked()
