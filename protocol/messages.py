"""The provider wire protocol's messages (PROTOCOL.md §5) and their decoding.

Every frame is one JSON object whose `type` names the message. Each direction is one closed
tagged union of frozen msgspec Structs with explicit lowercase tags, so renaming a class can
never change the protocol. Decoding never raises: `decode_provider_frame` and
`decode_daemon_frame` return either a message or a `ProtocolError` saying what was wrong and
where.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

PROTOCOL_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 10 * 1024 * 1024

# Bounds on what a provider advertises in `register` and `models_update`. The daemon keeps
# these for the whole session, and routing and the admin view walk them, so a node's claims
# must cost a bounded amount: unbounded, one register listed 521,053 models (~87 MB held,
# 5.5 s to render the admin view). Each bound is far above what a real node sends. A frame
# past one fails to decode, naming the field: before registration that is a refusal (1008),
# after it a malformed frame (a models_update is dropped and the old list kept).
MAX_MODELS: Final = 256  # models one provider may serve
MAX_MODEL_ID_CHARS: Final = 256  # a model id
MAX_LABEL_CHARS: Final = 64  # version, backend, quantization: short labels
MAX_CONCURRENCY: Final = 1024  # slots; more would only game the load-aware choice
MAX_EXTENSIONS: Final = 32  # extension names one `register` may ask for

# Optional protocol extensions (docs/protocol-extensions.md). A node asks in `register`, the
# daemon acknowledges the ones it speaks in `trust_status`; either side that does not know the
# field ignores it (msgspec ignores unknown fields), so old nodes and old daemons keep working.
# MULTI_SSE: one `inference_response_chunk` may seal several SSE lines, joined by "\n".
MULTI_SSE: Final = "multi_sse"


class CloseCode(enum.IntEnum):
    """The WebSocket close codes the daemon uses (PROTOCOL.md §1)."""

    GOING_AWAY = 1001  # the daemon is shutting down
    POLICY = 1008  # bad frame before registration, failed authentication, revoked token
    SUPERSEDED = 4001  # the same identity key connected again; the newest wins
    STALE = 4002  # no frame for heartbeat_timeout


NonNegative = Annotated[int, Meta(ge=0)]
Positive = Annotated[int, Meta(ge=1)]
ModelId = Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_ID_CHARS)]
Label = Annotated[str, Meta(max_length=MAX_LABEL_CHARS)]
Concurrency = Annotated[int, Meta(ge=1, le=MAX_CONCURRENCY)]
# Advertised tokens per second; 0 is "no opinion". A negative speed made the expected time
# negative, and the provider the choice of every request until its first completion.
Speed = Annotated[float, Meta(ge=0)]
Extensions = Annotated[list[Label], Meta(max_length=MAX_EXTENSIONS)]


class _Message(msgspec.Struct, frozen=True, omit_defaults=True, tag_field="type"):
    """Base of every frame: tagged by `type`, absent optionals omitted on the wire."""


class _Part(msgspec.Struct, frozen=True, omit_defaults=True):
    """Base of the nested objects of a frame."""


# Nested parts -------------------------------------------------------------------------------


class EncryptedPayload(_Part, frozen=True):
    ephemeral_public_key: str
    ciphertext: str


class TemplateRender(_Part, frozen=True):
    """Per-shape render verdicts; None means no opinion for that shape."""

    base: bool | None = None
    tools: bool | None = None
    vision: bool | None = None


class ModelInfo(_Part, frozen=True):
    id: ModelId
    is_vision: bool | None = None
    # Tri-state: None is "no opinion"; an explicit False must survive the wire (omit_defaults
    # drops only the None default, never False).
    template_render_ok: bool | None = None
    template_render: TemplateRender | None = None
    context_length: Positive | None = None
    quantization: Label | None = None


Models = Annotated[list[ModelInfo], Meta(max_length=MAX_MODELS)]


class Hardware(_Part, frozen=True):
    name: str | None = None
    memory_gb: float | None = None
    accelerator: str | None = None


class Usage(_Part, frozen=True):
    prompt_tokens: NonNegative
    completion_tokens: NonNegative
    reasoning_tokens: NonNegative | None = None
    # An extension (docs/protocol-extensions.md): true when the prompt count is the node's
    # estimate, not the backend's. Absent otherwise; old daemons ignore it (unknown fields are
    # ignored by msgspec), and old nodes never send it.
    estimated: bool | None = None


# Provider -> daemon -------------------------------------------------------------------------


class Register(_Message, frozen=True, tag="register"):
    protocol: int
    version: Label
    backend: Label
    public_key: str
    identity_key: str
    models: Models
    auth_token: str | None = None
    max_concurrency: Concurrency | None = None
    decode_tps: Speed | None = None
    prefill_tps: Speed | None = None
    hardware: Hardware | None = None
    extensions: Extensions | None = None  # optional extensions this node speaks


class AttestationResponse(_Message, frozen=True, tag="attestation_response"):
    nonce: str
    signature: str


class Heartbeat(_Message, frozen=True, tag="heartbeat"):
    active_requests: NonNegative
    status: str | None = None


class ModelsUpdate(_Message, frozen=True, tag="models_update"):
    models: Models


class InferenceAccepted(_Message, frozen=True, tag="inference_accepted"):
    request_id: str


class InferenceResponseChunk(_Message, frozen=True, tag="inference_response_chunk"):
    request_id: str
    # Required by PROTOCOL.md §3, and plaintext `data` forbidden; both are decoded as
    # optional so that a chunk breaking the rule still reaches the attempt it belongs to,
    # which fails at once and stops trusting the provider (`ChunkOpener.open_chunk` judges
    # every way a chunk can break it). Decoded strictly, it would be a dropped bad frame,
    # or worse, `data` an unknown field silently ignored beside a valid box.
    encrypted_data: EncryptedPayload | None = None
    data: object = None


class InferenceComplete(_Message, frozen=True, tag="inference_complete"):
    request_id: str
    usage: Usage


class InferenceError(_Message, frozen=True, tag="inference_error"):
    request_id: str
    error: str
    status_code: int
    error_reason: str | None = None


ProviderMessage = (
    Register
    | AttestationResponse
    | Heartbeat
    | ModelsUpdate
    | InferenceAccepted
    | InferenceResponseChunk
    | InferenceComplete
    | InferenceError
)

# Daemon -> provider -------------------------------------------------------------------------


class AttestationChallenge(_Message, frozen=True, tag="attestation_challenge"):
    nonce: str
    timestamp: str


class TrustStatus(_Message, frozen=True, tag="trust_status"):
    status: str  # "trusted" | "untrusted" | "rejected"
    reason: str | None = None
    extensions: list[str] | None = None  # the node's `register` extensions this daemon speaks


class InferenceRequest(_Message, frozen=True, tag="inference_request"):
    request_id: str
    encrypted_body: EncryptedPayload


class Cancel(_Message, frozen=True, tag="cancel"):
    request_id: str


DaemonMessage = AttestationChallenge | TrustStatus | InferenceRequest | Cancel

# Decoding -----------------------------------------------------------------------------------


class ProtocolError(msgspec.Struct, frozen=True):
    """A frame that is not a valid message, as a value: `reason` says what and where."""

    reason: str

    def __str__(self) -> str:
        return self.reason


_provider_decoder: Final = msgspec.json.Decoder(ProviderMessage)
_daemon_decoder: Final = msgspec.json.Decoder(DaemonMessage)
_any_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()


def encode(message: ProviderMessage | DaemonMessage) -> str:
    """One text frame for `message`."""
    return _encoder.encode(message).decode()


def decode_provider_frame(frame: bytes | str) -> ProviderMessage | ProtocolError:
    """Decode a frame a provider sent to the daemon."""
    return _decode(_provider_decoder, frame)


def decode_daemon_frame(frame: bytes | str) -> DaemonMessage | ProtocolError:
    """Decode a frame the daemon sent to a provider."""
    return _decode(_daemon_decoder, frame)


def _decode(decoder: msgspec.json.Decoder[Any], frame: bytes | str) -> Any:
    if not isinstance(frame, bytes | str):
        return ProtocolError(f"expected a text frame, got {type(frame).__name__}")
    size = _utf8_size(frame)
    if size > MAX_FRAME_BYTES:
        return ProtocolError(f"frame of {size} bytes exceeds the 10 MiB limit")
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as exc:  # a DecodeError subclass: catch it first
        return _explain(frame, str(exc))
    except msgspec.DecodeError as exc:
        return _malformed(exc)
    except RecursionError:  # msgspec's answer to very deep nesting
        return ProtocolError("malformed JSON: nested too deeply")
    except UnicodeEncodeError:  # a `str` holding a lone surrogate, which UTF-8 cannot carry
        return ProtocolError("frame is not valid UTF-8")


def _utf8_size(frame: bytes | str) -> int:
    # A character is at most 4 UTF-8 bytes: only a long text frame pays for encoding.
    if isinstance(frame, bytes) or len(frame) <= MAX_FRAME_BYTES // 4:
        return len(frame)
    return len(frame.encode(errors="surrogatepass"))


def _explain(frame: bytes | str, detail: str) -> ProtocolError:
    """Turn msgspec's validation message into the protocol's own words.

    Only runs on the error path, so decoding the frame a second time is fine.
    """
    try:
        raw = _any_decoder.decode(frame)
    except msgspec.DecodeError as exc:  # typed decoding can fail on a value before the syntax
        return _malformed(exc)
    except RecursionError:
        return ProtocolError("malformed JSON: nested too deeply")
    if not isinstance(raw, dict):
        return ProtocolError(f"expected object, got {_json_kind(raw)}")
    kind = raw.get("type")
    if kind is None:
        return ProtocolError("missing field 'type'")
    if detail.endswith("- at `$.type`"):
        return ProtocolError(f"unknown type {_quote(kind)}")
    return ProtocolError(f"{kind}: {_reword(detail)}")


def _malformed(exc: msgspec.DecodeError) -> ProtocolError:
    detail = str(exc).removeprefix("JSON is malformed: ")
    return ProtocolError(f"malformed JSON: {detail}")


def _reword(detail: str) -> str:
    detail = detail.replace("Object missing required field", "missing field")
    detail = detail.replace("Expected", "expected")
    return detail.replace("`", "'")


def _quote(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else _encoder.encode(value).decode()


def _json_kind(value: Any) -> str:
    match value:
        case list():
            return "array"
        case str():
            return "string"
        case bool():
            return "boolean"
        case int() | float():
            return "number"
        case None:
            return "null"
    return type(value).__name__
