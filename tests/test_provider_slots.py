"""Request slots: capacity, cancel by request id, and the count a drain waits for."""

from __future__ import annotations

from provider.slots import Slots


def test_a_cancelled_request_frees_its_slot_at_once_but_runs_until_unwound() -> None:
    slots = Slots(capacity=1)
    scope = slots.claim("r1")
    assert slots.full and "r1" in slots
    assert slots.cancel("r1", "cancelled by the daemon")
    assert scope.cancel_called
    assert not slots.full and "r1" not in slots
    assert slots.running.value == 1  # its task still has to unwind
    slots.release("r1")  # the task's own cleanup: harmless after the cancel
    slots.task_done()
    assert slots.running.value == 0


def test_cancel_of_an_unknown_or_finished_request_is_ignored() -> None:
    slots = Slots(capacity=2)
    slots.claim("r1")
    slots.release("r1")
    assert not slots.cancel("r1", "late cancel")
    assert not slots.cancel("never-seen", "stray cancel")
    assert slots.in_use == 0
