"""The cluster's queue limit on a virtual clock: two instances' depths, summed, coalesced, aged.

Two real admission queues, each with its `QueueShare` (daemon/cluster/queues.py); their
`post` hands each message straight to the other's `heard`, standing in for the transport.
"""

from __future__ import annotations

import msgspec
import trio
import trio.testing

from daemon.cluster import wire
from daemon.cluster.queues import TTL_S, ClusterDepths, QueueShare
from daemon.routing.admission import QueueFull, QueueTimeout
from tests.test_admission import BASE, Requests, add_busy, queueing

QUEUED = {"DINFER_QUEUE_MAX": "2", "DINFER_QUEUE_TIMEOUT_S": "40"}


def test_depths_sum_per_model_and_age_out_at_exactly_the_ttl() -> None:
    depths = ClusterDepths()
    depths.heard("a", {"m": 2, "n": 1}, 0.0)
    depths.heard("b", {"m": 3, "n": 0}, 1.0)
    assert depths.totals() == {"m": 5, "n": 1}
    depths.expire(TTL_S - 0.001)
    assert depths.totals() == {"m": 5, "n": 1}
    depths.expire(TTL_S)  # a last spoke at 0: exactly TTL_S later it no longer counts
    assert depths.totals() == {"m": 3}
    depths.keep({"a"}, TTL_S)  # b's instance key expired
    assert depths.totals() == {}


async def test_two_instances_share_one_limit(autojump_clock: trio.testing.MockClock) -> None:
    sent: list[tuple[float, str, dict[str, int]]] = []
    shares: dict[str, QueueShare] = {}

    def post_from(sender: str):  # type: ignore[no-untyped-def]
        def post(target: str, kind: wire.Kind, request_id: str, data: bytes) -> None:
            assert kind is wire.Kind.QUEUE
            at = round(trio.current_time(), 6)
            sent.append((at, sender, msgspec.msgpack.decode(data)))
            shares[target].heard(sender, data)

        return post

    async with queueing(**QUEUED) as a, queueing(**QUEUED) as b:
        shares["a"] = QueueShare(a.queue, post_from("a"))
        shares["b"] = QueueShare(b.queue, post_from("b"))

        async def live_a() -> set[str] | None:
            return {"b"}

        async def live_b() -> set[str] | None:
            return {"a"}

        a_scope = trio.CancelScope()
        a.nursery.start_soon(_run_in, a_scope, shares["a"], live_a)
        await b.nursery.start(shares["b"].run, live_b)
        add_busy(a.registry)
        add_busy(b.registry)
        await trio.sleep_until(1.5)
        requests = Requests(a)
        await requests.arrive("first")
        await requests.arrive("second")
        await trio.sleep_until(1.6)
        # One message for the burst, COALESCE_S (20 ms) after it; the refreshes each second.
        assert [(t, s, d) for t, s, d in sent if s == "a"] == [
            (0.0, "a", {}),
            (1.0, "a", {}),
            (1.52, "a", {"m": 2}),
        ]
        refused = await b.queue.admit(BASE)  # b's own queue is empty, the cluster's full
        assert isinstance(refused, QueueFull)
        assert refused.message == 'the queue for model "m" is full (2 waiting in the cluster)'
        assert refused.status == 429 and refused.retry_after == 10
        assert trio.current_time() == 1.6
        await trio.sleep_until(41.6)  # the waiters timed out at 41.5: told at 41.52
        assert ("first", 41.5) in requests.ended()
        assert (41.52, "a", {}) in sent
        assert shares["b"].depths.totals() == {}
        await requests.arrive("third")
        await requests.arrive("fourth")
        await trio.sleep_until(42.5)
        assert (41.62, "a", {"m": 2}) in sent and (42.0, "a", {"m": 2}) in sent
        assert shares["b"].depths.totals() == {"m": 2}
        a_scope.cancel(reason="instance a stops talking")
        # a last spoke at 42.0 (a refresh): b's refresh at 45.0 is TTL_S later and forgets it.
        await trio.sleep_until(44.99)
        assert shares["b"].depths.totals() == {"m": 2}
        await trio.sleep_until(45.01)
        assert shares["b"].depths.totals() == {}
        assert isinstance(await b.queue.admit(BASE), QueueTimeout)  # it waited: the queue is b's
        assert round(trio.current_time(), 6) == 85.01
        b.nursery.cancel_scope.cancel(reason="the test is over")
        a.nursery.cancel_scope.cancel(reason="the test is over")


async def _run_in(scope: trio.CancelScope, share: QueueShare, live: object) -> None:
    with scope:
        await share.run(live)  # type: ignore[arg-type]
