"""What the node advertises: ModelInfo from `/v1/models`, the backend kind, its concurrency."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.messages import ModelInfo
from provider.backend import ModelListing
from provider.models import (
    default_concurrency,
    guess_backend_kind,
    model_infos,
    props_context_length,
)


def listing(*entries: dict[str, Any], server: str | None = None) -> ModelListing:
    return ModelListing(tuple(entries), server)


@pytest.mark.parametrize(
    ("entry", "server", "url", "kind"),
    [
        ({"id": "m", "owned_by": "llamacpp"}, None, "http://h:8080", "llama.cpp"),
        ({"id": "m", "owned_by": "vllm"}, None, "http://h:8000", "vllm"),
        ({"id": "m", "owned_by": "library"}, None, "http://h:9999", "ollama"),
        ({"id": "m", "owned_by": "me"}, None, "http://h:8000", "llama-cpp-python"),
        ({"id": "m"}, "llama.cpp", "http://h:8080", "llama.cpp"),
        ({"id": "m"}, None, "http://h:11434", "ollama"),
        ({"id": "m", "owned_by": "org"}, None, "http://h:8080", "openai-compatible"),
    ],
)
def test_backend_kind_is_guessed(
    entry: dict[str, Any], server: str | None, url: str, kind: str
) -> None:
    assert guess_backend_kind(listing(entry, server=server), url) == kind


def test_one_at_a_time_servers_default_to_concurrency_one() -> None:
    assert default_concurrency("llama-cpp-python") == 1
    assert default_concurrency("ollama") == 1
    assert default_concurrency("llama.cpp") == 4
    assert default_concurrency("vllm") == 4


def test_model_infos_mark_vision_and_keep_backend_order() -> None:
    found = listing(
        {"id": "b", "max_model_len": 8192},
        {"id": "a"},
        {"id": "b"},  # duplicates happen with aliases: advertised once
        {"object": "model"},  # no id: skipped
    )
    infos = model_infos(found, vision=frozenset({"a"}))
    assert infos == (ModelInfo(id="b", context_length=8192), ModelInfo(id="a", is_vision=True))


def test_a_served_context_size_in_the_listing_is_advertised_and_the_training_one_is_not() -> None:
    found = listing(
        {"id": "fork", "meta": {"n_ctx": 8192, "n_ctx_train": 131072}},
        {"id": "upstream", "meta": {"n_ctx_train": 131072}},
    )
    infos = model_infos(found, vision=frozenset())
    assert infos == (ModelInfo(id="fork", context_length=8192), ModelInfo(id="upstream"))


def test_the_operators_context_length_wins() -> None:
    found = listing({"id": "a", "max_model_len": 8192}, {"id": "b"})
    infos = model_infos(found, vision=frozenset(), context_lengths={"a": 4096, "b": 2048})
    assert infos == (ModelInfo(id="a", context_length=4096), ModelInfo(id="b", context_length=2048))


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        ({"default_generation_settings": {"n_ctx": 4096, "params": {}}}, 4096),
        ({"default_generation_settings": {"n_ctx": 0}}, None),
        ({"default_generation_settings": {"n_ctx": True}}, None),
        ({"n_ctx": 4096}, None),  # not llama-server's shape: the per-slot size is what counts
        ([], None),
    ],
)
def test_llama_server_props_give_the_per_slot_context(props: Any, expected: int | None) -> None:
    assert props_context_length(props) == expected
