"""The rebalancer's arithmetic on the virtual clock: the share, the slack, the pace, whom it
moves (idle, old enough, oldest first, never busy or held), the remembered total, draining
instances, and convergence without flapping when the balancer sends providers straight back."""

from __future__ import annotations

import itertools

import trio

from daemon.cluster.rebalance import (
    Balanced,
    Instances,
    Moved,
    Paused,
    Rebalancer,
    fair_share,
    moves,
    slack,
)
from daemon.config import load_settings
from daemon.nursery.supervisor import build_registry
from daemon.routing.registry import Registry
from tests.conftest import FAST_ENV
from tests.fakes.entries import DummySession, make_entry

EVERY = 1.0
THREE = Instances(frozenset({"me", "b", "c"}), frozenset())


def registry() -> Registry:
    return build_registry(load_settings({**FAST_ENV, "DINFER_DATA_DIR": "/nonexistent"}))


def fill(reg: Registry, count: int, prefix: str = "p", owner: str | None = None) -> list[str]:
    ids = [f"{prefix}{i}" for i in range(count)]
    for pid in ids:
        entry = make_entry(pid, owner=owner)
        (reg.add if owner is None else reg.add_remote)(entry)
    return ids


def kicked(reg: Registry) -> list[str]:
    """The entries told to go (a DummySession only records it): they leave, as a real one."""
    gone = []
    for entry in reg.providers():
        session = entry.session
        if isinstance(session, DummySession) and session.kicks:
            assert session.kicks == [(1001, session.kicks[0][1])]
            reg.remove(entry)
            gone.append(entry.provider_id)
    return gone


def test_share_slack_and_pace() -> None:
    assert fair_share(9, 3) == 3 and fair_share(10, 3) == 4
    assert slack(3) == 1 and slack(40) == 4
    assert moves(4, 3) == 0  # within the slack: nothing
    assert moves(5, 3) == 1
    assert moves(9, 3) == 3  # half of 5 over share + slack, rounded up
    assert moves(1000, 10) == 8  # MAX_MOVES_PER_ROUND


async def test_newcomers_wait_min_age_then_the_oldest_idle_ones_go(autojump_clock) -> None:
    reg = registry()
    ids = fill(reg, 9)
    busy = reg.get(ids[0])
    assert busy is not None
    busy.in_flight = 1  # the oldest, but a stream is never cut
    held = reg.get(ids[1])
    assert held is not None
    held.held = True  # an operator's drain stays where the operator put it
    rebalancer = Rebalancer(reg, "me", EVERY)
    start = trio.current_time()
    for _ in range(3):
        assert rebalancer.round(THREE) == Balanced(9, 3)
        await trio.sleep(EVERY)
    assert trio.current_time() - start == 3 * EVERY
    outcome = rebalancer.round(THREE)
    assert outcome == Moved(tuple(ids[2:5]), 9, 3)
    assert kicked(reg) == ids[2:5]
    assert busy.session.kicks == [] and held.session.kicks == []  # type: ignore[attr-defined]


async def test_the_total_is_remembered_while_moved_providers_reconnect(autojump_clock) -> None:
    reg = registry()
    fill(reg, 9)
    rebalancer = Rebalancer(reg, "me", EVERY)
    await trio.sleep(3 * EVERY)
    rebalancer.round(THREE)  # seen at 3 s
    await trio.sleep(3 * EVERY)
    assert isinstance(rebalancer.round(THREE), Moved)
    kicked(reg)  # 3 gone, in nobody's record yet: 6 of a total still taken as 9
    await trio.sleep(EVERY)
    outcome = rebalancer.round(THREE)
    assert isinstance(outcome, Moved) and outcome.share == 3 and len(outcome.providers) == 1


async def test_a_draining_instance_is_no_destination_and_does_not_rebalance(autojump_clock) -> None:
    reg = registry()
    fill(reg, 9)
    fill(reg, 3, prefix="r", owner="b")  # a draining owner's providers still count
    fill(reg, 3, prefix="x", owner="gone")  # an owner whose key expired does not
    me = Rebalancer(reg, "me", EVERY)
    me.round(THREE)
    await trio.sleep(3 * EVERY)
    drains = Instances(frozenset({"me", "b", "c"}), frozenset({"b"}))
    outcome = me.round(drains)  # 12 on 2 destinations: a share of 6, over by 2: one goes
    assert isinstance(outcome, Moved) and outcome.share == 6 and len(outcome.providers) == 1
    assert me.round(Instances(THREE.live, frozenset({"me"}))) == Paused("this instance is draining")


async def test_three_instances_converge_and_stop_when_the_balancer_sends_some_back(
    autojump_clock,
) -> None:
    """Each instance's replica is the others' providers; a moved provider reconnects, one
    round later, wherever a round-robin balancer sends it: a third of them straight back."""
    names = ["a", "b", "c"]
    regs = {n: registry() for n in names}
    rebalancers = {n: Rebalancer(regs[n], n, EVERY) for n in names}
    fill(regs["a"], 30)
    balancer = itertools.cycle(names)
    in_transit: list[str] = []
    history: list[dict[str, int]] = []
    for _ in range(60):
        for pid in in_transit:  # those moved last round land now
            fill_one(regs[next(balancer)], pid)
        in_transit = []
        for n in names:  # the directory: everyone's replica of everyone else
            sync(regs, n)
        for n in names:
            rebalancers[n].round(Instances(frozenset(names), frozenset()))
            in_transit += kicked(regs[n])
        history.append({n: local_count(regs[n]) for n in names})
        await trio.sleep(EVERY)
    final = history[-1]
    assert sum(final.values()) == 30 and max(final.values()) <= 10 + slack(10)
    assert all(h == final for h in history[-20:])  # nobody moves any more: no flapping
    moved = sum(r.moved for r in rebalancers.values())
    assert moved < 40  # 19 at least must leave a; those sent back cost one move more each


def fill_one(reg: Registry, pid: str) -> None:
    stale = reg.get(pid)  # its old owner's record, which the next sync drops anyway
    if stale is not None:
        reg.remove(stale)
    assert reg.add(make_entry(pid))


def local_count(reg: Registry) -> int:
    return sum(1 for e in reg.providers() if e.owner is None)


def sync(regs: dict[str, Registry], name: str) -> None:
    reg = regs[name]
    for entry in reg.providers():
        if entry.owner is not None:
            reg.remove(entry)
    for other, theirs in regs.items():
        if other != name:
            for entry in theirs.providers():
                if entry.owner is None and reg.get(entry.provider_id) is None:
                    reg.add_remote(make_entry(entry.provider_id, owner=other))
