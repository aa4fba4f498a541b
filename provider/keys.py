"""The node's two long-term key pairs and the files that keep them (PROTOCOL.md §2).

`box.key` holds the X25519 private key that opens requests, `identity.key` the Ed25519 signing
key that answers challenges; each is the standard base64 of 32 raw bytes. They are created on
first start with mode 0600 and reused afterwards, so the provider id the daemon shows stays the
same across restarts. A key file that group or others may read or write is refused: anyone who
can read it can impersonate the node.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from protocol import crypto

BOX_KEY_FILE: Final = "box.key"
IDENTITY_KEY_FILE: Final = "identity.key"
_PRIVATE_BITS: Final = stat.S_IRWXG | stat.S_IRWXO


class KeyFileError(Exception):
    """A key file that cannot be used; the message says which file and what to do."""


@dataclass(frozen=True)
class NodeKeys:
    box: PrivateKey
    identity: SigningKey

    @property
    def provider_id(self) -> str:
        return crypto.provider_id(self.identity.verify_key)

    @property
    def public_key(self) -> str:
        return crypto.encode_key(self.box.public_key)

    @property
    def identity_key(self) -> str:
        return crypto.encode_key(self.identity.verify_key)

    def __repr__(self) -> str:
        return f"NodeKeys(provider_id={self.provider_id!r})"


def load_or_create_keys(state_dir: Path) -> NodeKeys:
    """The node's keys from `state_dir`, creating the directory and any missing key file."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    box = PrivateKey(_load_or_create(state_dir / BOX_KEY_FILE, crypto.generate_box_key))
    identity = SigningKey(
        _load_or_create(state_dir / IDENTITY_KEY_FILE, crypto.generate_identity_key)
    )
    return NodeKeys(box=box, identity=identity)


def _load_or_create(path: Path, generate: Callable[[], PrivateKey | SigningKey]) -> bytes:
    if not path.exists():
        _create(path, bytes(generate()))
    return _load(path)


def _create(path: Path, raw: bytes) -> None:
    """Write the key under a temporary name, then link it into place.

    The link fails if another process created the file first; its key then wins, which keeps
    two nodes started at once on the same state dir from ending up with different identities.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(crypto.b64encode(raw) + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)


def _load(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & _PRIVATE_BITS:
        raise KeyFileError(
            f"{path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"a leaked key lets anyone impersonate this node: run `chmod 600 {path}` "
            "(and rotate the key if others may have read it)"
        )
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        raw = crypto.b64decode(text, path.name)
    except crypto.KeyEncodingError as exc:
        raise KeyFileError(f"{path} is damaged: {exc}") from None
    if len(raw) != crypto.KEY_BYTES:
        raise KeyFileError(f"{path} is damaged: expected {crypto.KEY_BYTES} bytes, got {len(raw)}")
    return raw
