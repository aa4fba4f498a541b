"""Keys, boxes and challenges of PROTOCOL.md §2-3: round trips, and one clear error per fault."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from nacl.public import PrivateKey, PublicKey

from protocol import crypto
from protocol.crypto import (
    ChunkOpener,
    CryptoError,
    DecryptionError,
    KeyEncodingError,
    KeyLengthError,
    NonceError,
    SenderKeyMismatch,
    UnsealedChunk,
    WeakKeyError,
)
from protocol.messages import EncryptedPayload, InferenceResponseChunk, decode_provider_frame

REQUEST = b'{"endpoint":"/v1/chat/completions","body":{"model":"m","stream":true}}'
CHUNK = b'data: {"object":"chat.completion.chunk","choices":[]}'


@pytest.fixture
def provider_key() -> PrivateKey:
    return crypto.generate_box_key()


def dispatch(provider_key: PrivateKey) -> tuple[EncryptedPayload, ChunkOpener]:
    return crypto.seal_request(REQUEST, provider_key.public_key)


def with_ciphertext(payload: EncryptedPayload, raw: bytes) -> EncryptedPayload:
    return EncryptedPayload(
        ephemeral_public_key=payload.ephemeral_public_key, ciphertext=crypto.b64encode(raw)
    )


def tampered(payload: EncryptedPayload) -> EncryptedPayload:
    raw = bytearray(crypto.b64decode(payload.ciphertext, "ciphertext"))
    raw[crypto.NONCE_BYTES + 3] ^= 0x01  # inside the box output, past the nonce
    return with_ciphertext(payload, bytes(raw))


# --- round trips ----------------------------------------------------------------------------


def test_request_and_chunks_round_trip(provider_key: PrivateKey) -> None:
    body, opener = dispatch(provider_key)
    plaintext, sealer = crypto.open_request(body, provider_key)
    assert plaintext == REQUEST
    chunks = [CHUNK, b"data: [DONE]", b""]
    assert [opener.open(sealer.seal(chunk)) for chunk in chunks] == chunks


def test_request_uses_a_fresh_ephemeral_key(provider_key: PrivateKey) -> None:
    first, _ = dispatch(provider_key)
    second, _ = dispatch(provider_key)
    assert first.ephemeral_public_key != second.ephemeral_public_key
    assert first.ephemeral_public_key != crypto.encode_key(provider_key.public_key)


def test_ciphertext_is_nonce_then_box_output(provider_key: PrivateKey) -> None:
    body, _ = dispatch(provider_key)
    raw = base64.b64decode(body.ciphertext, validate=True)
    assert len(raw) == crypto.NONCE_BYTES + len(REQUEST) + crypto.MAC_BYTES
    assert len(base64.b64decode(body.ephemeral_public_key, validate=True)) == 32


def test_chunk_carries_the_providers_registered_key(provider_key: PrivateKey) -> None:
    body, _ = dispatch(provider_key)
    _, sealer = crypto.open_request(body, provider_key)
    chunk = sealer.seal(CHUNK)
    assert chunk.ephemeral_public_key == crypto.encode_key(provider_key.public_key)
    assert sealer.seal(CHUNK).ciphertext != chunk.ciphertext  # a fresh nonce every chunk


def test_sender_key_may_use_a_non_canonical_encoding(provider_key: PrivateKey) -> None:
    body, opener = dispatch(provider_key)
    _, sealer = crypto.open_request(body, provider_key)
    chunk = sealer.seal(CHUNK)
    canonical = chunk.ephemeral_public_key
    # The last data character of 32 bytes in base64 has two unused low bits.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet[alphabet.index(canonical[-2]) | 0b01]
    loose = canonical[:-2] + last + "="
    assert loose != canonical
    assert opener.open(EncryptedPayload(loose, chunk.ciphertext)) == CHUNK


# --- keys -----------------------------------------------------------------------------------


def test_provider_id_is_sha256_prefix_of_identity_key() -> None:
    verify_key = crypto.generate_identity_key().verify_key
    expected = hashlib.sha256(bytes(verify_key)).hexdigest()[:16]
    assert crypto.provider_id(verify_key) == expected
    assert crypto.provider_id(bytes(verify_key)) == expected
    assert crypto.provider_id(bytes(32)) == "66687aadf862bd77"


def test_provider_id_rejects_a_short_key() -> None:
    with pytest.raises(KeyLengthError, match="identity_key must be 32 bytes, got 31"):
        crypto.provider_id(bytes(31))


def test_keys_round_trip_through_base64() -> None:
    box_key = crypto.generate_box_key()
    signing_key = crypto.generate_identity_key()
    public = crypto.decode_public_key(crypto.encode_key(box_key.public_key))
    identity = crypto.decode_identity_key(crypto.encode_key(signing_key.verify_key))
    assert public == box_key.public_key
    assert identity == signing_key.verify_key
    assert len(base64.b64decode(crypto.encode_key(box_key))) == 32
    assert len(base64.b64decode(crypto.encode_key(signing_key))) == 32


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("not base64!", id="bad-characters"),
        pytest.param(base64.urlsafe_b64encode(b"\xfb" * 32).decode(), id="urlsafe-alphabet"),
        pytest.param(base64.b64encode(bytes(32)).decode().rstrip("="), id="missing-padding"),
        pytest.param(" " + base64.b64encode(bytes(32)).decode(), id="whitespace"),
        pytest.param("ÄÖÜ=", id="non-ascii"),
        pytest.param(base64.b64encode(bytes(32)), id="bytes-not-str"),
        pytest.param(None, id="none"),
    ],
)
def test_bad_base64_is_a_key_encoding_error(text: str) -> None:
    with pytest.raises(KeyEncodingError, match="public_key"):
        crypto.decode_public_key(text)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_wrong_key_length_names_the_key_and_length(length: int) -> None:
    text = crypto.b64encode(bytes(length))
    with pytest.raises(KeyLengthError, match=f"identity_key must be 32 bytes, got {length}$"):
        crypto.decode_identity_key(text)
    with pytest.raises(KeyLengthError, match=f"public_key must be 32 bytes, got {length}$"):
        crypto.decode_public_key(text)


def test_low_order_provider_key_is_a_weak_key_error() -> None:
    with pytest.raises(WeakKeyError, match="public_key is a low-order X25519 point"):
        crypto.seal_request(REQUEST, PublicKey(bytes(32)))


def test_error_classes_are_distinct_crypto_errors() -> None:
    classes = {
        KeyEncodingError,
        KeyLengthError,
        WeakKeyError,
        NonceError,
        DecryptionError,
        SenderKeyMismatch,
        UnsealedChunk,
    }
    assert all(issubclass(cls, CryptoError) for cls in classes)
    assert not any(issubclass(a, b) for a in classes for b in classes if a is not b)


# --- faults on the wire ---------------------------------------------------------------------


def test_tampered_request_fails_to_open(provider_key: PrivateKey) -> None:
    body, _ = dispatch(provider_key)
    with pytest.raises(DecryptionError, match="failed authentication"):
        crypto.open_request(tampered(body), provider_key)


def test_tampered_chunk_fails_to_open(provider_key: PrivateKey) -> None:
    body, opener = dispatch(provider_key)
    _, sealer = crypto.open_request(body, provider_key)
    with pytest.raises(DecryptionError, match="failed authentication"):
        opener.open(tampered(sealer.seal(CHUNK)))


def test_request_for_another_provider_fails_to_open(provider_key: PrivateKey) -> None:
    body, _ = dispatch(provider_key)
    with pytest.raises(DecryptionError):
        crypto.open_request(body, crypto.generate_box_key())


def test_chunk_from_a_different_sender_key_is_rejected(provider_key: PrivateKey) -> None:
    body, opener = dispatch(provider_key)
    _, sealer = crypto.open_request(body, provider_key)
    chunk = sealer.seal(CHUNK)
    impostor = crypto.encode_key(crypto.generate_box_key().public_key)
    with pytest.raises(SenderKeyMismatch, match="registered public_key"):
        opener.open(EncryptedPayload(impostor, chunk.ciphertext))


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "inference_response_chunk", "request_id": "r", "data": "data: {}"}',
        '{"type": "inference_response_chunk", "request_id": "r", "data": {"choices": []}}',
        '{"type": "inference_response_chunk", "request_id": "r"}',
    ],
    ids=["plaintext data", "plaintext data of another JSON type", "no payload"],
)
def test_an_unsealed_chunk_decodes_as_a_chunk_and_never_opens(
    provider_key: PrivateKey, frame: str
) -> None:
    _, opener = dispatch(provider_key)
    chunk = decode_provider_frame(frame)
    assert isinstance(chunk, InferenceResponseChunk)  # it reaches its attempt, to be judged
    with pytest.raises(UnsealedChunk):
        opener.open_chunk(chunk)


def test_plaintext_data_beside_a_valid_box_never_opens(provider_key: PrivateKey) -> None:
    body, opener = dispatch(provider_key)
    _, sealer = crypto.open_request(body, provider_key)
    sealed = InferenceResponseChunk(request_id="r", encrypted_data=sealer.seal(CHUNK))
    assert opener.open_chunk(sealed) == CHUNK
    with pytest.raises(UnsealedChunk):
        opener.open_chunk(InferenceResponseChunk("r", sealed.encrypted_data, data="data: {}"))


def test_chunk_sealed_for_another_request_fails_to_open(provider_key: PrivateKey) -> None:
    _, first_opener = dispatch(provider_key)
    second_body, second_opener = dispatch(provider_key)
    _, second_sealer = crypto.open_request(second_body, provider_key)
    chunk = second_sealer.seal(CHUNK)
    assert second_opener.open(chunk) == CHUNK
    with pytest.raises(DecryptionError):
        first_opener.open(chunk)


@pytest.mark.parametrize("length", [0, 10, 24, 24 + 15])
def test_ciphertext_shorter_than_nonce_and_mac_is_a_nonce_error(
    provider_key: PrivateKey, length: int
) -> None:
    body, opener = dispatch(provider_key)
    sender = crypto.encode_key(provider_key.public_key)
    short_chunk = EncryptedPayload(sender, crypto.b64encode(bytes(length)))
    with pytest.raises(NonceError, match=f"ciphertext is {length} bytes"):
        crypto.open_request(with_ciphertext(body, bytes(length)), provider_key)
    with pytest.raises(NonceError, match=f"ciphertext is {length} bytes"):
        opener.open(short_chunk)


def test_bad_base64_ciphertext_names_the_field(provider_key: PrivateKey) -> None:
    body, _ = dispatch(provider_key)
    broken = EncryptedPayload(body.ephemeral_public_key, body.ciphertext + "!")
    with pytest.raises(KeyEncodingError, match="ciphertext"):
        crypto.open_request(broken, provider_key)


def test_bad_ephemeral_key_names_the_field(provider_key: PrivateKey) -> None:
    body, opener = dispatch(provider_key)
    with pytest.raises(KeyLengthError, match="ephemeral_public_key must be 32 bytes, got 3"):
        crypto.open_request(EncryptedPayload("AAAA", body.ciphertext), provider_key)
    with pytest.raises(KeyEncodingError, match="ephemeral_public_key"):
        opener.open(EncryptedPayload("%%%", body.ciphertext))


# --- challenges -----------------------------------------------------------------------------

TIMESTAMP = "2026-11-24T23:28:38Z"


def test_signed_challenge_verifies() -> None:
    key = crypto.generate_identity_key()
    nonce = crypto.new_challenge_nonce()
    signature = crypto.sign_challenge(key, nonce, TIMESTAMP)
    assert crypto.verify_challenge(key.verify_key, nonce, TIMESTAMP, signature)


def test_signature_covers_nonce_then_timestamp() -> None:
    key = crypto.generate_identity_key()
    signature = crypto.sign_challenge(key, "bm9uY2U=", TIMESTAMP)
    raw = base64.b64decode(signature, validate=True)
    key.verify_key.verify(b"bm9uY2U=" + TIMESTAMP.encode(), raw)  # raises if not


@pytest.mark.parametrize(
    ("nonce", "timestamp", "use_other_key"),
    [
        pytest.param("other-nonce", TIMESTAMP, False, id="different-nonce"),
        pytest.param("nonce", "2026-11-24T23:28:39Z", False, id="different-timestamp"),
        pytest.param("nonce", TIMESTAMP, True, id="different-key"),
    ],
)
def test_signature_over_something_else_fails(
    nonce: str, timestamp: str, use_other_key: bool
) -> None:
    key = crypto.generate_identity_key()
    signature = crypto.sign_challenge(key, "nonce", TIMESTAMP)
    verifier = crypto.generate_identity_key().verify_key if use_other_key else key.verify_key
    assert not crypto.verify_challenge(verifier, nonce, timestamp, signature)


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param("not base64!", id="bad-base64"),
        pytest.param(crypto.b64encode(bytes(63)), id="short"),
        pytest.param(crypto.b64encode(bytes(65)), id="long"),
        pytest.param(crypto.b64encode(bytes(64)), id="zeros"),
        pytest.param(b"bytes", id="not-a-string"),
        pytest.param("", id="empty"),
    ],
)
def test_malformed_signature_fails_without_raising(signature: str) -> None:
    key = crypto.generate_identity_key().verify_key
    assert crypto.verify_challenge(key, "nonce", TIMESTAMP, signature) is False


def test_challenge_nonce_is_32_random_bytes() -> None:
    first, second = crypto.new_challenge_nonce(), crypto.new_challenge_nonce()
    assert len(base64.b64decode(first, validate=True)) == 32
    assert first != second


@pytest.mark.parametrize(
    "now",
    [
        pytest.param(datetime(2026, 11, 24, 23, 28, 38, 999_999, tzinfo=UTC), id="utc"),
        pytest.param(
            datetime(2026, 11, 25, 1, 28, 38, tzinfo=timezone(timedelta(hours=2))), id="offset"
        ),
    ],
)
def test_challenge_timestamp_is_rfc3339_utc(now: datetime) -> None:
    assert crypto.challenge_timestamp(now) == TIMESTAMP


def test_challenge_timestamp_defaults_to_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = crypto.challenge_timestamp()
    after = datetime.now(UTC)
    assert stamp.endswith("Z")
    assert before <= datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z") <= after


def test_challenge_timestamp_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="aware"):
        crypto.challenge_timestamp(datetime(2026, 11, 24))
