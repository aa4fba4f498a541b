"""What the node advertises: the backend's models as `ModelInfo`, and what kind of server it is.

The kind is guessed from `GET /v1/models` (each server fills `owned_by` its own way) unless the
user names it. It matters for one default: llama-cpp-python's server and Ollama (unless
`OLLAMA_NUM_PARALLEL` says otherwise) generate for one request at a time, so the node only
takes one at a time from them by default; other servers batch and get four.

A model's `context_length` is the context it is served with, the one a prompt must fit (the
daemon checks prompts against it; the node uses it to recognise an over-long prompt, see
`provider.fit`): the operator's `--context-length` first, else what the server reports.
vLLM puts it in `/v1/models` (`max_model_len`); llama-server in `GET /props`
(`default_generation_settings.n_ctx`, per slot), some of its forks also in `/v1/models`
(`meta.n_ctx`). llama-cpp-python reports none. Training lengths (`meta.n_ctx_train`, Ollama's
`/api/show`) are not what a server was started with, and are never advertised.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

from protocol.messages import ModelInfo
from provider.backend import ModelListing

GENERIC_KIND: Final = "openai-compatible"
SERIAL_KINDS: Final = frozenset({"llama-cpp-python", "ollama"})
DEFAULT_CONCURRENCY: Final = 4
_OLLAMA_PORT: Final = 11434
_OWNERS: Final = {
    "llamacpp": "llama.cpp",
    "vllm": "vllm",
    "sglang": "sglang",
    "library": "ollama",
    "ollama": "ollama",
    # llama-cpp-python's server hard-codes this owner.
    "me": "llama-cpp-python",
}
_NONE: Final[Mapping[str, int]] = MappingProxyType({})


def guess_backend_kind(listing: ModelListing | None, base_url: str) -> str:
    """A name for the backend software, for the daemon's operators and our defaults."""
    if listing is not None:
        for entry in listing.entries:
            kind = _OWNERS.get(str(entry.get("owned_by", "")).lower())
            if kind:
                return kind
        if listing.server and "llama.cpp" in listing.server.lower():
            return "llama.cpp"
    if urlsplit(base_url).port == _OLLAMA_PORT:
        return "ollama"
    return GENERIC_KIND


def default_concurrency(kind: str) -> int:
    return 1 if kind in SERIAL_KINDS else DEFAULT_CONCURRENCY


def model_infos(
    listing: ModelListing, *, vision: frozenset[str], context_lengths: Mapping[str, int] = _NONE
) -> tuple[ModelInfo, ...]:
    """The advertised list before any template verdict: the backend's order, ids once each."""
    seen: dict[str, ModelInfo] = {}
    for entry in listing.entries:
        model_id = entry.get("id")
        if isinstance(model_id, str) and model_id and model_id not in seen:
            seen[model_id] = ModelInfo(
                id=model_id,
                is_vision=True if model_id in vision else None,
                context_length=context_lengths.get(model_id) or _listed_context(entry),
            )
    return tuple(seen.values())


def props_context_length(props: Any) -> int | None:
    """The per-slot context from llama-server's `GET /props`, if that is what `props` is."""
    settings = props.get("default_generation_settings") if isinstance(props, dict) else None
    return _positive(settings.get("n_ctx")) if isinstance(settings, dict) else None


def _listed_context(entry: dict[str, Any]) -> int | None:
    meta = entry.get("meta")
    served = meta.get("n_ctx") if isinstance(meta, dict) else None
    return _positive(entry.get("max_model_len")) or _positive(served)


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
