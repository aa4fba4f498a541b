"""Keys, NaCl boxes and challenge signatures of the provider protocol (PROTOCOL.md §2-3).

Owns every use of PyNaCl: key encoding (standard base64 with padding, 32 raw bytes),
`provider_id`, the request/response boxes of both sides, and the Ed25519 attestation
challenge. PyNaCl's exceptions are translated here, once, into `CryptoError` subclasses, so
callers catch one family and never see a library type.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import UTC, datetime
from typing import Final

import nacl.exceptions
import nacl.utils
from nacl.bindings import crypto_box_easy_afternm, crypto_box_open_easy_afternm
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from protocol.messages import EncryptedPayload, InferenceRequest, InferenceResponseChunk, encode

KEY_BYTES: Final = 32
NONCE_BYTES: Final = Box.NONCE_SIZE
MAC_BYTES: Final = 16
SIGNATURE_BYTES: Final = 64
CHALLENGE_NONCE_BYTES: Final = 32
PROVIDER_ID_CHARS: Final = 16


class CryptoError(Exception):
    """Base of every error this module raises."""


class KeyEncodingError(CryptoError):
    """A field (key or ciphertext) that is not a string of strict standard base64."""


class KeyLengthError(CryptoError):
    """A key that does not decode to exactly 32 bytes."""


class WeakKeyError(CryptoError):
    """An X25519 public key that yields no shared secret (a low-order point)."""


class NonceError(CryptoError):
    """A ciphertext too short to hold the 24-byte nonce and the 16-byte MAC."""


class DecryptionError(CryptoError):
    """A ciphertext that fails authentication: tampered, or boxed for another key."""


class SenderKeyMismatch(CryptoError):
    """A response chunk not sealed under the provider's registered public key."""


class UnsealedChunk(CryptoError):
    """A response chunk carrying plaintext `data`, or no `encrypted_data` at all."""


# --- encoding -------------------------------------------------------------------------------


def b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    """Strict standard base64 with padding; `what` names the field in the error."""
    if not isinstance(text, str):
        raise KeyEncodingError(f"{what} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyEncodingError(f"{what} is not valid standard base64: {exc}") from None


def _decode_key_bytes(text: str, what: str) -> bytes:
    raw = b64decode(text, what)
    if len(raw) != KEY_BYTES:
        raise KeyLengthError(f"{what} must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def encode_key(key: PublicKey | PrivateKey | VerifyKey | SigningKey) -> str:
    """Base64 of a key's 32 raw bytes (a SigningKey's seed, a PrivateKey's scalar)."""
    return b64encode(bytes(key))


def decode_public_key(text: str, what: str = "public_key") -> PublicKey:
    return PublicKey(_decode_key_bytes(text, what))


def decode_peer_public_key(text: str, what: str = "public_key") -> PublicKey:
    """decode_public_key, also refusing a low-order point no Box can ever use."""
    key = decode_public_key(text, what)
    _box(generate_box_key(), key, what)
    return key


def decode_identity_key(text: str, what: str = "identity_key") -> VerifyKey:
    return VerifyKey(_decode_key_bytes(text, what))


def generate_box_key() -> PrivateKey:
    return PrivateKey.generate()


def generate_identity_key() -> SigningKey:
    return SigningKey.generate()


def provider_id(identity_key: bytes | VerifyKey) -> str:
    """First 16 hex characters of SHA-256 of the raw identity key bytes."""
    raw = bytes(identity_key)
    if len(raw) != KEY_BYTES:
        raise KeyLengthError(f"identity_key must be {KEY_BYTES} bytes, got {len(raw)}")
    return hashlib.sha256(raw).hexdigest()[:PROVIDER_ID_CHARS]


# --- boxes ----------------------------------------------------------------------------------


def _box(private: PrivateKey, public: PublicKey, what: str) -> Box:
    # Box() precomputes the shared key; libsodium refuses low-order points with a bare
    # "Unexpected library error", which we name.
    try:
        return Box(private, public)
    except nacl.exceptions.CryptoError:
        raise WeakKeyError(f"{what} is a low-order X25519 point") from None


def _seal(box: Box, plaintext: bytes) -> str:
    # Box.encrypt draws a fresh random 24-byte nonce and returns nonce || box output.
    return b64encode(box.encrypt(plaintext))


def _open(box: Box, ciphertext: str) -> bytes:
    raw = b64decode(ciphertext, "ciphertext")
    if len(raw) < NONCE_BYTES + MAC_BYTES:
        raise NonceError(
            f"ciphertext is {len(raw)} bytes, shorter than the {NONCE_BYTES}-byte nonce "
            f"and {MAC_BYTES}-byte MAC"
        )
    try:
        return box.decrypt(raw)
    except nacl.exceptions.CryptoError:
        raise DecryptionError("ciphertext failed authentication (tampered or wrong key)") from None


class ChunkOpener:
    """Daemon side of one dispatch attempt: opens the provider's response chunks.

    The hot path of every relayed chunk: the box's shared key is computed once (`Box`), and
    each chunk costs one strict base64 decode and one `crypto_box_open_easy_afternm`, without
    `Box.decrypt`'s wrapping (a third of the cost of opening a short chunk).
    """

    __slots__ = ("_box", "_provider_key", "_provider_key_b64", "_shared_key")

    def __init__(self, box: Box, provider_key: PublicKey) -> None:
        self._box = box
        self._shared_key = box.shared_key()
        self._provider_key = bytes(provider_key)
        self._provider_key_b64 = b64encode(self._provider_key)

    def open_chunk(self, chunk: InferenceResponseChunk) -> bytes:
        """The plaintext of a response chunk; CryptoError for each way it breaks PROTOCOL.md
        §3: plaintext `data` (even beside a box), no box, a foreign sender key, a box that
        does not open."""
        if chunk.data is not None or chunk.encrypted_data is None:
            raise UnsealedChunk("response chunk carries plaintext data or no encrypted_data")
        return self.open(chunk.encrypted_data)

    def open(self, payload: EncryptedPayload) -> bytes:
        self._check_sender(payload.ephemeral_public_key)
        text = payload.ciphertext
        try:
            # Strict: the alphabet and the padding are checked, as b64decode's validate=True.
            raw = binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError, TypeError):
            raw = b64decode(text, "ciphertext")  # raises KeyEncodingError, naming the fault
        if len(raw) < NONCE_BYTES + MAC_BYTES:
            return _open(self._box, text)  # raises NonceError
        try:
            return crypto_box_open_easy_afternm(
                raw[NONCE_BYTES:], raw[:NONCE_BYTES], self._shared_key
            )
        except nacl.exceptions.CryptoError:
            raise DecryptionError(
                "ciphertext failed authentication (tampered or wrong key)"
            ) from None

    def _check_sender(self, sender: str) -> None:
        # The canonical encoding matches as a string (the hot path); anything else must
        # still decode to the same 32 bytes.
        if sender == self._provider_key_b64:
            return
        if b64decode(sender, "ephemeral_public_key") != self._provider_key:
            raise SenderKeyMismatch(
                "response chunk's ephemeral_public_key is not the provider's registered public_key"
            )


class ChunkSealer:
    """Provider side of one request: seals response chunks for the daemon's ephemeral key.

    The nonces of one request are a random 24-byte number, then that number plus one per
    chunk (libsodium's `sodium_increment` scheme): as unique under the request's key as a
    fresh random nonce each, without a system call for randomness per chunk. The wire is the
    same (nonce || box output) and openers need no change.
    """

    __slots__ = ("_key", "_nonce", "_own_key_b64")

    def __init__(self, box: Box, own_public_key: PublicKey) -> None:
        self._key = box.shared_key()
        self._nonce = int.from_bytes(nacl.utils.random(NONCE_BYTES), "little")
        self._own_key_b64 = encode_key(own_public_key)

    def seal(self, plaintext: bytes) -> EncryptedPayload:
        nonce = self._nonce.to_bytes(NONCE_BYTES, "little")
        self._nonce = (self._nonce + 1) & _NONCE_MASK
        boxed = crypto_box_easy_afternm(plaintext, nonce, self._key)
        return EncryptedPayload(
            ephemeral_public_key=self._own_key_b64, ciphertext=b64encode(nonce + boxed)
        )


_NONCE_MASK: Final = (1 << (8 * NONCE_BYTES)) - 1


def seal_request(plaintext: bytes, provider_key: PublicKey) -> tuple[EncryptedPayload, ChunkOpener]:
    """Box a request under a fresh ephemeral key; the opener reads the replies to it."""
    ephemeral = PrivateKey.generate()
    box = _box(ephemeral, provider_key, "public_key")
    payload = EncryptedPayload(
        ephemeral_public_key=encode_key(ephemeral.public_key), ciphertext=_seal(box, plaintext)
    )
    return payload, ChunkOpener(box, provider_key)


def sealed_request_frame_bytes(plaintext_bytes: int) -> int:
    """The size of the `inference_request` frame that seals `plaintext_bytes` (PROTOCOL.md §1).

    Exact: the JSON around the ciphertext is fixed (a UUID request id, a 32-byte key), and the
    ciphertext is base64 of nonce, MAC and plaintext. The daemon refuses (413) a request
    whose frame would exceed the 10 MiB limit instead of sending it.
    """
    sealed = NONCE_BYTES + MAC_BYTES + plaintext_bytes
    return _REQUEST_FRAME_OVERHEAD + 4 * ((sealed + 2) // 3)


_REQUEST_FRAME_OVERHEAD: Final = len(
    encode(
        InferenceRequest(
            request_id="00000000-0000-0000-0000-000000000000",
            encrypted_body=EncryptedPayload(ephemeral_public_key="A" * 44, ciphertext=""),
        )
    )
)


def open_request(
    payload: EncryptedPayload, provider_private: PrivateKey
) -> tuple[bytes, ChunkSealer]:
    """Open a request; the sealer boxes the response chunks back to its sender."""
    ephemeral_public = decode_public_key(payload.ephemeral_public_key, "ephemeral_public_key")
    box = _box(provider_private, ephemeral_public, "ephemeral_public_key")
    plaintext = _open(box, payload.ciphertext)
    return plaintext, ChunkSealer(box, provider_private.public_key)


# --- attestation challenges -----------------------------------------------------------------


def new_challenge_nonce() -> str:
    return b64encode(nacl.utils.random(CHALLENGE_NONCE_BYTES))


def challenge_timestamp(now: datetime | None = None) -> str:
    """RFC 3339 UTC to the second, e.g. `2026-11-24T23:28:38Z`."""
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("challenge_timestamp needs an aware datetime, got a naive one")
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _challenge_message(nonce: str, timestamp: str) -> bytes:
    return (nonce + timestamp).encode("utf-8")


def sign_challenge(key: SigningKey, nonce: str, timestamp: str) -> str:
    """Base64 Ed25519 signature over the UTF-8 bytes of `nonce + timestamp`."""
    return b64encode(key.sign(_challenge_message(nonce, timestamp)).signature)


def verify_challenge(key: VerifyKey, nonce: str, timestamp: str, signature: str) -> bool:
    """Whether `signature` signs `nonce + timestamp` under `key`. Never raises."""
    try:
        raw = b64decode(signature, "signature")
        if len(raw) != SIGNATURE_BYTES:
            return False
        key.verify(_challenge_message(nonce, timestamp), raw)
    except (CryptoError, nacl.exceptions.CryptoError, UnicodeError, TypeError):
        return False
    return True
