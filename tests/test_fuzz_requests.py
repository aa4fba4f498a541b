"""Fuzzing every route's request translator: any body is a `Parsed` the provider node accepts,
or an `ApiError` with a 4xx status, never another exception (which would be a 500)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given

from daemon.api.chat import ChatCodec
from tests.fuzz_settings import ci_fuzz
from tests.fuzz_targets import TARGETS

ROUTES = ("chat_request", "completions_request", "messages_request", "responses_request")


@pytest.mark.parametrize("name", [*ROUTES, "count_tokens"])
def test_any_body_is_parsed_or_refused_with_a_4xx(name: str) -> None:
    target = TARGETS[name]

    @ci_fuzz
    @given(target.strategy)
    def check(raw: Any) -> None:
        target.check(raw)

    check()


def test_a_content_part_whose_type_is_not_a_string_is_no_media_part() -> None:
    # An unhashable `type` ([] or {}) raised TypeError while counting media parts: a 500.
    raw = b'{"model": "m", "messages": [{"role": "user", "content": [{"type": []}]}]}'
    parsed = ChatCodec.parse(raw)
    assert not parsed.traits.has_media
