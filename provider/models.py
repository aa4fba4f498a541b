"""What the node advertises: the backend's models as `ModelInfo`, and what kind of server it is.

The kind is guessed from `GET /v1/models` (each server fills `owned_by` its own way) unless the
user names it. It matters for one default: llama-cpp-python's server and Ollama (unless
`OLLAMA_NUM_PARALLEL` says otherwise) generate for one request at a time, so the node only
takes one at a time from them by default; other servers batch and get four.
"""

from __future__ import annotations

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


def model_infos(listing: ModelListing, *, vision: frozenset[str]) -> tuple[ModelInfo, ...]:
    """The advertised list before any template verdict: the backend's order, ids once each."""
    seen: dict[str, ModelInfo] = {}
    for entry in listing.entries:
        model_id = entry.get("id")
        if isinstance(model_id, str) and model_id and model_id not in seen:
            seen[model_id] = ModelInfo(
                id=model_id,
                is_vision=True if model_id in vision else None,
                context_length=_context_length(entry),
            )
    return tuple(seen.values())


def _context_length(entry: dict[str, Any]) -> int | None:
    # vLLM reports the length it serves; llama.cpp's `n_ctx_train` is the training length,
    # not what the server was started with, so it is not advertised.
    value = entry.get("max_model_len")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
