"""The wire types: every message round-trips, and any bad frame becomes a ProtocolError."""

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import messages as m

PAYLOAD = m.EncryptedPayload(ephemeral_public_key="a2V5", ciphertext="Y2lwaGVy")

PROVIDER_MESSAGES = [
    m.Register(
        protocol=1,
        version="0.7.0",
        backend="llama.cpp",
        public_key="cHVi",
        identity_key="aWQ=",
        models=[m.ModelInfo(id="gemma", is_vision=True, context_length=8192)],
        auth_token="tok",
        max_concurrency=2,
        decode_tps=40.5,
        hardware=m.Hardware(name="box", memory_gb=24.0),
    ),
    m.AttestationResponse(nonce="n", signature="s"),
    m.Heartbeat(active_requests=0, status="draining"),
    m.ModelsUpdate(models=[]),
    m.InferenceAccepted(request_id="r"),
    m.InferenceResponseChunk(request_id="r", encrypted_data=PAYLOAD),
    m.InferenceComplete(request_id="r", usage=m.Usage(prompt_tokens=3, completion_tokens=5)),
    m.InferenceComplete("r", m.Usage(prompt_tokens=3, completion_tokens=5, estimated=True)),
    m.InferenceError(request_id="r", error="boom", status_code=500, error_reason="backend"),
]
DAEMON_MESSAGES = [
    m.AttestationChallenge(nonce="n", timestamp="2026-11-24T00:00:00Z"),
    m.TrustStatus(status="trusted"),
    m.InferenceRequest(request_id="r", encrypted_body=PAYLOAD),
    m.Cancel(request_id="r"),
]


@pytest.mark.parametrize("message", PROVIDER_MESSAGES, ids=lambda x: type(x).__name__)
def test_provider_messages_round_trip(message: m.ProviderMessage) -> None:
    assert m.decode_provider_frame(m.encode(message)) == message


@pytest.mark.parametrize("message", DAEMON_MESSAGES, ids=lambda x: type(x).__name__)
def test_daemon_messages_round_trip(message: m.DaemonMessage) -> None:
    assert m.decode_daemon_frame(m.encode(message)) == message


def test_tags_are_the_protocol_names() -> None:
    frame = m.encode(m.InferenceResponseChunk(request_id="r", encrypted_data=PAYLOAD))
    assert msgspec.json.decode(frame)["type"] == "inference_response_chunk"


@pytest.mark.parametrize("verdict", [True, False, None])
def test_template_render_ok_is_tri_state_on_the_wire(verdict: bool | None) -> None:
    update = m.ModelsUpdate(models=[m.ModelInfo(id="m", template_render_ok=verdict)])
    wire = m.encode(update)
    assert ('"template_render_ok"' in wire) is (verdict is not None)
    decoded = m.decode_provider_frame(wire)
    assert isinstance(decoded, m.ModelsUpdate)
    assert decoded.models[0].template_render_ok is verdict


class _OldUsage(msgspec.Struct, frozen=True):
    """`Usage` as daemons before the `estimated` extension declare it."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int | None = None


class _OldComplete(msgspec.Struct, frozen=True, tag_field="type", tag="inference_complete"):
    request_id: str
    usage: _OldUsage


@pytest.mark.parametrize("estimated", [True, False])
def test_an_old_daemon_decodes_a_usage_that_says_it_is_estimated(estimated: bool) -> None:
    frame = m.encode(m.InferenceComplete("r", m.Usage(2, 5, estimated=estimated)))
    assert f'"estimated":{str(estimated).lower()}' in frame
    assert msgspec.json.decode(frame, type=_OldComplete) == _OldComplete("r", _OldUsage(2, 5))


def test_usage_decodes_with_and_without_estimated() -> None:
    old = (
        '{"type":"inference_complete","request_id":"r",'
        '"usage":{"prompt_tokens":2,"completion_tokens":5}}'
    )
    new = old.replace("5}", '5,"estimated":true}')
    assert m.decode_provider_frame(old) == m.InferenceComplete("r", m.Usage(2, 5))
    assert m.decode_provider_frame(new) == m.InferenceComplete("r", m.Usage(2, 5, estimated=True))


def test_a_usage_not_estimated_is_sent_as_before() -> None:
    frame = m.encode(m.InferenceComplete("r", m.Usage(2, 5)))
    assert "estimated" not in frame


def test_a_usage_field_this_daemon_does_not_know_is_ignored() -> None:
    frame = (
        '{"type":"inference_complete","request_id":"r",'
        '"usage":{"prompt_tokens":2,"completion_tokens":5,"cached_tokens":1}}'
    )
    assert m.decode_provider_frame(frame) == m.InferenceComplete("r", m.Usage(2, 5))


def test_explicit_null_optional_means_absent() -> None:
    frame = '{"type":"heartbeat","active_requests":1,"status":null}'
    assert m.decode_provider_frame(frame) == m.Heartbeat(active_requests=1)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ('{"type":"inference_accepted"}', "missing field 'request_id'"),
        ('{"type":"foo"}', "unknown type 'foo'"),
        ('{"type":"cancel","request_id":"r"}', "unknown type 'cancel'"),
        ("[1, 2]", "expected object, got array"),
        ('"register"', "expected object, got string"),
        ("{}", "missing field 'type'"),
        ('{"type": 7}', "unknown type 7"),
        ('{"type":"inference_accepted","request_id":5}', "expected 'str', got 'int'"),
        ('{"type":"heartbeat","active_requests":-1}', "'$.active_requests'"),
        ("{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        ("", "malformed JSON"),
    ],
)
def test_bad_frames_are_explained(frame: str | bytes, reason: str) -> None:
    result = m.decode_provider_frame(frame)
    assert isinstance(result, m.ProtocolError)
    assert reason in result.reason


def test_oversized_frame_is_refused_before_parsing() -> None:
    frame = b" " * (m.MAX_FRAME_BYTES + 1)
    result = m.decode_provider_frame(frame)
    assert isinstance(result, m.ProtocolError)
    assert "10 MiB" in result.reason


def test_register_refuses_empty_model_id() -> None:
    frame = (
        '{"type":"register","protocol":1,"version":"1.0.0","backend":"x",'
        '"public_key":"a","identity_key":"b","models":[{"id":""}]}'
    )
    result = m.decode_provider_frame(frame)
    assert isinstance(result, m.ProtocolError)
    assert "$.models[0].id" in result.reason


@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_raise(frame: bytes) -> None:
    result = m.decode_provider_frame(frame)
    assert isinstance(result, m.ProtocolError | m.Register | m.Heartbeat | m.ModelsUpdate)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FIELD_VALUES = st.none() | st.integers() | st.text(max_size=4) | st.lists(st.integers(), max_size=2)
FIELD_NAMES = st.sampled_from(["request_id", "models", "status_code", "nonce", "protocol"])
KNOWN_TYPES = st.sampled_from(["register", "heartbeat", "inference_error", "attestation_response"])


@given(JSON_VALUES)
def test_arbitrary_json_never_raises(value: object) -> None:
    for decode in (m.decode_provider_frame, m.decode_daemon_frame):
        assert decode(msgspec.json.encode(value)) is not None


@given(KNOWN_TYPES, st.dictionaries(FIELD_NAMES, FIELD_VALUES))
def test_known_types_with_arbitrary_fields_never_raise(
    kind: str, fields: dict[str, object]
) -> None:
    result = m.decode_provider_frame(msgspec.json.encode({"type": kind, **fields}))
    assert isinstance(result, m.ProtocolError) or result.__struct_config__.tag == kind


def test_the_frame_limit_counts_utf8_bytes_not_characters() -> None:
    frame = (
        '{"type":"heartbeat","active_requests":0,"status":"' + "é" * (m.MAX_FRAME_BYTES // 2) + '"}'
    )
    assert len(frame) < m.MAX_FRAME_BYTES < len(frame.encode())
    result = m.decode_provider_frame(frame)
    assert isinstance(result, m.ProtocolError)
    assert "10 MiB" in result.reason


@pytest.mark.parametrize(
    "frame", ["[" * 5000 + "]" * 5000, '{"type":"heartbeat","x":' + "[" * 5000]
)
def test_a_frame_nested_too_deeply_is_a_protocol_error(frame: str) -> None:
    result = m.decode_provider_frame(frame)
    assert isinstance(result, m.ProtocolError)
    assert "malformed JSON" in result.reason
