"""The one eligibility predicate: may this provider's model serve this request?

Selection, the preflight and the admission queue all ask `refusal()`, so they can never
disagree about which providers are capable. A refusal is a short reason in words a user
understands; None means eligible.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from daemon.routing.breaker import CircuitBreaker, Shape
from daemon.routing.types import ProviderEntry, RequestTraits
from protocol.messages import ModelInfo

# The refusal of a provider that registered moments ago and has not answered its first
# challenge yet (PROTOCOL.md §4: it has `challenge_answer_s` to do so).
AWAITING_ATTESTATION: Final = "waiting for its first attestation"


@dataclass(frozen=True, slots=True)
class Gates:
    """The daemon-wide state and thresholds the predicate applies."""

    tools_min_version: tuple[int, ...]
    challenge_max_age: float
    breaker: CircuitBreaker


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """`MAJOR.MINOR.PATCH` as a tuple of ints; None when missing or unparseable."""
    if not text:
        return None
    try:
        parts = tuple(int(part) for part in text.split("."))
    except ValueError:
        return None
    return parts if all(part >= 0 for part in parts) else None


def format_version(parts: Collection[int]) -> str:
    return ".".join(str(part) for part in parts)


def refusal(entry: ProviderEntry, traits: RequestTraits, gates: Gates, now: float) -> str | None:
    """Why `entry` cannot serve `traits` now, or None when it can.

    A reason reads after "the provider is": the preflight joins them into one message.
    """
    # Trust comes last: a refusal equal to AWAITING_ATTESTATION then means "capable as soon
    # as its first challenge passes", which the preflight answers with a wait, not a 503.
    return (
        _model_refusal(entry, traits)
        or _capability_refusal(entry, traits, gates)
        or _breaker_refusal(entry, traits, gates, now)
        or _held_refusal(entry)
        or entry.unreachable
        or _trust_refusal(entry, gates, now)
    )


def _trust_refusal(entry: ProviderEntry, gates: Gates, now: float) -> str | None:
    if (
        entry.last_challenge_pass is None
        and entry.challenge_failures == 0
        and entry.banned_reason is None
    ):
        return AWAITING_ATTESTATION
    if not entry.trusted:
        return "untrusted"
    if (
        entry.last_challenge_pass is None
        or now - entry.last_challenge_pass >= gates.challenge_max_age
    ):
        return "waiting for a fresh attestation"
    if entry.draining:
        return "draining"
    return None


def _held_refusal(entry: ProviderEntry) -> str | None:
    return "drained by the operator" if entry.held else None


def _model_refusal(entry: ProviderEntry, traits: RequestTraits) -> str | None:
    if traits.model not in entry.models:
        return f'not serving "{traits.model}"'
    if traits.allowlist is not None and entry.provider_id not in traits.allowlist:
        return "outside the request's provider allowlist"
    return None


def _capability_refusal(entry: ProviderEntry, traits: RequestTraits, gates: Gates) -> str | None:
    info = entry.models[traits.model]
    if not render_ok(info, traits.shape):
        return f"unable to render {traits.shape} requests with its chat template"
    if traits.has_tools:
        version = parse_version(entry.version)
        if version is None or version < gates.tools_min_version:
            floor = format_version(gates.tools_min_version)
            return f"too old for tools (needs version >= {floor})"
    if traits.has_media and not info.is_vision:
        return "without image or video support"
    if too_short(info, traits):
        return f"limited to a context of {info.context_length} tokens"
    return None


def too_short(info: ModelInfo, traits: RequestTraits) -> bool:
    """Does the request (estimated prompt plus the max_tokens asked for) overflow the context?"""
    return info.context_length is not None and traits.context_tokens > info.context_length


def _breaker_refusal(
    entry: ProviderEntry, traits: RequestTraits, gates: Gates, now: float
) -> str | None:
    if gates.breaker.in_cooldown((entry.provider_id, traits.model, traits.shape), now):
        return "cooling down after errors"
    return None


def render_ok(info: ModelInfo, shape: Shape) -> bool:
    """PROTOCOL.md §7's render gate: per shape when given, else the overall verdict."""
    if info.template_render is not None:
        return getattr(info.template_render, shape) is not False
    return info.template_render_ok is not False
