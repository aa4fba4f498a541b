"""The limits a consumer API key may carry (`KeyLimits`) and the validation of changes to them.

Below both the store, which persists them, and the limiter (`daemon.accounts.limits`), which
enforces them; the admin API and the CLI validate what they are given with `parse_changes`,
so both refuse the same things with the same messages, naming the field.

Every limit is optional: None means unlimited. `expires_at` is Unix seconds (UTC); on the wire
it is RFC 3339 (`2027-01-01T00:00:00Z`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

MAX_MODEL_ID_CHARS: Final = 256
MAX_ALLOWED_MODELS: Final = 1000
# The largest count a limit may be: SQLite's INTEGER, where the store keeps it.
MAX_COUNT: Final = 2**63 - 1
COUNT_FIELDS: Final = ("rpm", "tpm", "daily_tokens", "max_concurrency")
LIMIT_FIELDS: Final = (*COUNT_FIELDS, "allowed_models", "expires_at")


class LimitError(ValueError):
    """A limit value the daemon cannot use; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """One key's limits; None is unlimited."""

    rpm: int | None = None  # requests per minute, a token bucket of `rpm` requests
    tpm: int | None = None  # prompt + completion tokens charged in the last 60 s
    daily_tokens: int | None = None  # tokens charged in the current UTC day
    max_concurrency: int | None = None  # requests of the key in flight at once
    allowed_models: frozenset[str] | None = None  # model ids the key may ask for
    expires_at: float | None = None  # Unix seconds; from then on the key is refused (401)

    @property
    def empty(self) -> bool:
        return self == NO_LIMITS

    def with_changes(self, changes: Mapping[str, Any]) -> KeyLimits:
        """These limits with `changes` (from `parse_changes`) applied."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The limits as the admin API and `--json` show them."""
        return {
            **{name: getattr(self, name) for name in COUNT_FIELDS},
            "allowed_models": None if self.allowed_models is None else sorted(self.allowed_models),
            "expires_at": format_time(self.expires_at),
        }


NO_LIMITS: Final = KeyLimits()


def parse_changes(body: Mapping[str, Any]) -> dict[str, Any]:
    """Validate limit changes given as JSON values (null clears a limit); raise LimitError.

    Returns the `KeyLimits` field values to set, for `KeyLimits.with_changes`.
    """
    unknown = sorted(set(body) - set(LIMIT_FIELDS))
    if unknown:
        raise LimitError(unknown[0], f"unknown field; the limits are {', '.join(LIMIT_FIELDS)}")
    return {name: _parse(name, value) for name, value in body.items()}


def _parse(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "allowed_models":
        return parse_models(value)
    if name == "expires_at":
        return parse_time(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LimitError(name, f"must be a positive integer or null, got {value!r}")
    if not 1 <= value <= MAX_COUNT:
        raise LimitError(name, f"must be a positive integer up to {MAX_COUNT} or null")
    return value


def parse_models(value: Any) -> frozenset[str]:
    field = "allowed_models"
    if not isinstance(value, list):
        raise LimitError(field, "must be a list of model ids or null")
    if len(value) > MAX_ALLOWED_MODELS:
        raise LimitError(field, f"at most {MAX_ALLOWED_MODELS} models")
    for model in value:
        if not isinstance(model, str) or not model.strip():
            raise LimitError(field, f"every model id must be a non-empty string, got {model!r}")
        if len(model) > MAX_MODEL_ID_CHARS:
            raise LimitError(field, f"a model id is at most {MAX_MODEL_ID_CHARS} characters")
    return frozenset(value)


def parse_time(value: Any) -> float:
    """RFC 3339 with a timezone (`2027-01-01T00:00:00Z`) to Unix seconds."""
    field = "expires_at"
    if not isinstance(value, str):
        raise LimitError(field, "must be an RFC 3339 time such as 2027-01-01T00:00:00Z or null")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise LimitError(field, f"not an RFC 3339 time: {value!r}") from None
    if moment.tzinfo is None:
        raise LimitError(field, f"needs a timezone (Z or +hh:mm): {value!r}")
    return moment.timestamp()


def format_time(seconds: float | None) -> str | None:
    """Unix seconds as RFC 3339 in UTC (`2027-01-01T00:00:00Z`); None stays None."""
    if seconds is None:
        return None
    text = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z")
