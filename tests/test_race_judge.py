"""`judge()`, the per-event rule of a racer that has not committed yet (PROTOCOL.md §6)."""

from __future__ import annotations

import pytest

from daemon.nursery.attempt import Accepted, Chunk, Completed, Event, Failure
from daemon.nursery.race import MAX_HELD, Accept, Commit, Fail, Hold, Verdict, judge
from protocol.messages import Usage
from protocol.sse import ChunkKind

ROLE = Chunk(ChunkKind.BOILERPLATE, 'data: {"choices":[{"delta":{"role":"assistant"}}]}', {})
CONTENT = Chunk(ChunkKind.CONTENT, 'data: {"choices":[{"delta":{"content":"hi"}}]}', {})
DONE = Chunk(ChunkKind.DONE, "data: [DONE]", None)
ERROR = Chunk(ChunkKind.ERROR, 'data: {"error":{"message":"oom"}}', {"error": {"message": "oom"}})
COMPLETED = Completed(Usage(prompt_tokens=1, completion_tokens=0))
FAILURE = Failure(500, "backend crashed")


@pytest.mark.parametrize(
    ("event", "held", "verdict"),
    [
        (ROLE, 0, Hold(ROLE)),
        (ROLE, MAX_HELD - 1, Hold(ROLE)),
        (ROLE, MAX_HELD, Hold(None)),  # past the cap: read and dropped, never a commit
        (DONE, 0, Hold(None)),
        (CONTENT, 3, Commit(CONTENT, None)),
        (COMPLETED, 2, Commit(None, COMPLETED)),  # a clean end before content commits empty
        (Accepted(), 0, Accept()),
        (FAILURE, 0, Fail(FAILURE)),
        (ERROR, 0, Fail(Failure(502, "oom"))),  # an error event is never content
    ],
    ids=[
        "role",
        "role-last-held",
        "role-past-the-cap",
        "done",
        "content",
        "completed",
        "accepted",
        "failure",
        "error-event",
    ],
)
def test_each_event_has_one_verdict(event: Event, held: int, verdict: Verdict) -> None:
    assert judge(event, held) == verdict
