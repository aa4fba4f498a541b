"""What a consumer request's ledger row ends as, from how the request ended.

The handler (`handler.py`) knows the end; these pure functions turn each kind of end into a
`Settlement`: a refusal before dispatch, a dispatch that failed, a stream that ended (with the
provider's usage or in band), and a consumer who hung up. `late_terminal` waits, within the
caller's deadline, for the end of a stream nobody reads any more, so a consumer who hung up
after the commit is charged what the provider reports.

Tokens are the provider's report when the stream finished; otherwise the content chunks
relayed so far count as completion tokens and the prompt as the daemon's own estimate, both
marked estimated.
"""

from __future__ import annotations

from typing import Final, assert_never

from daemon.accounts.ledger import Outcome, Settlement, Tokens
from daemon.api.errors import ApiError
from daemon.nursery.attempt import Chunk
from daemon.nursery.dispatch import Committed, DispatchFailed, Finished, InBandError, RelayEnd
from daemon.routing.types import RequestTraits
from protocol.messages import Usage

# The status recorded for a consumer who hung up before any status line went out (nginx's).
CLIENT_CLOSED: Final = 499


def refused(status: int, traits: RequestTraits | None = None) -> Settlement:
    """A refusal with `status` before any provider streamed: 4xx is the request's, else ours."""
    return Settlement(status, _refusal(status), *_model(traits))


def gone(traits: RequestTraits | None = None) -> Settlement:
    """The consumer hung up before anything was served: nothing to charge."""
    return Settlement(CLIENT_CLOSED, "client_gone", *_model(traits))


def refused_with(error: ApiError, traits: RequestTraits | None = None) -> Settlement:
    return refused(error.status, traits)


def dispatch_failed(failed: DispatchFailed, traits: RequestTraits) -> Settlement:
    return Settlement(
        failed.status,
        _refusal(failed.status),
        *_model(traits),
        attempts=failed.attempts,
        providers=failed.providers_tried,
    )


def served(committed: Committed, end: RelayEnd, status: int) -> Settlement:
    """A committed stream that ended while the consumer was there to read it."""
    match end:
        case Finished(usage=usage):
            return _row(committed, status, "completed", reported(usage.prompt_tokens, usage))
        case InBandError():
            return _row(committed, status, "in_band_error", counted(committed))
        case _:
            assert_never(end)


def hung_up(committed: Committed, end: RelayEnd | None, status: int) -> Settlement:
    """The consumer left after the commit: charged the late usage if it came in time
    (`end` a `Finished`), else what was counted."""
    match end:
        case Finished(usage=usage):
            tokens = reported(usage.prompt_tokens, usage)
        case InBandError() | None:
            tokens = counted(committed)
        case _:
            assert_never(end)
    return _row(committed, status, "client_gone", tokens)


def reported(prompt: int, usage: Usage) -> Tokens:
    # The provider's own count, estimated when its node said so (no tokenizer to ask).
    return Tokens(
        prompt,
        usage.completion_tokens,
        usage.reasoning_tokens or 0,
        estimated=bool(usage.estimated),
    )


def _row(committed: Committed, status: int, outcome: Outcome, tokens: Tokens) -> Settlement:
    return Settlement(
        status,
        outcome,
        *_model(committed.traits),
        provider_id=committed.provider_id,
        attempts=committed.attempts,
        providers=committed.providers_tried,
        tokens=tokens,
        ttft_ms=round(committed.phases.ttft * 1000, 3),
    )


def counted(committed: Committed) -> Tokens:
    return Tokens(committed.traits.prompt_tokens, committed.content_chunks, 0, estimated=True)


async def late_terminal(committed: Committed) -> RelayEnd:
    """Read the stream to its end without relaying it (the caller bounds the wait)."""
    while True:
        match await committed.next_event():
            case Chunk():
                continue
            case Finished() | InBandError() as end:
                return end
            case other:
                assert_never(other)


def _refusal(status: int) -> Outcome:
    return "rejected" if status < 500 else "failed"


def _model(traits: RequestTraits | None) -> tuple[str | None, str | None]:
    return (None, None) if traits is None else (traits.model, str(traits.shape))
