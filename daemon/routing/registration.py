"""Registration: the first frame of a connection and every check it must pass.

A connection has `register_timeout_s` to send `register` (PROTOCOL.md §4). The frame is then
validated into a `ProviderEntry`: the protocol version, both keys, unique model ids, and in
token mode a live admin-issued token. `admit` adds it to the registry, unless another live
identity registered the same box key. Anything wrong raises `Refused`, whose text is the
reason the provider is sent with `trust_status: rejected` before the 1008 close.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from daemon.config import Settings
from daemon.routing.registry import Registry
from daemon.routing.transport import Transport, decode_frame
from daemon.routing.types import ProviderEntry, ProviderLink
from protocol import crypto
from protocol.messages import MULTI_SSE, PROTOCOL_VERSION, ModelInfo, ProtocolError, Register

TokenLookup = Callable[[str], str | None]


class Refused(Exception):
    """A registration the daemon will not accept; the text is sent to the provider."""


async def receive_register(transport: Transport, settings: Settings) -> Register:
    """The connection's first frame, which must be a `register` sent in time."""
    with trio.move_on_after(settings.register_timeout_s):
        message = decode_frame(await transport.receive())
        if isinstance(message, ProtocolError):
            raise Refused(message.reason)
        if not isinstance(message, Register):
            kind = message.__struct_config__.tag
            raise Refused(f"expected a register frame first, got '{kind}'")
        return message
    raise Refused(f"no register frame within {settings.register_timeout_s:g} s")


def validate(
    register: Register, session: ProviderLink, settings: Settings, lookup_token: TokenLookup
) -> ProviderEntry:
    """The registry entry `register` asks for, served by `session`; Refused if it may not."""
    if register.protocol != PROTOCOL_VERSION:
        raise Refused(
            f"unsupported protocol version {register.protocol} "
            f"(this daemon speaks {PROTOCOL_VERSION})"
        )
    try:
        public_key = crypto.decode_peer_public_key(register.public_key)
        identity = crypto.decode_identity_key(register.identity_key)
    except crypto.CryptoError as exc:
        raise Refused(str(exc)) from None
    return ProviderEntry(
        provider_id=crypto.provider_id(identity),
        session=session,
        version=register.version,
        backend=register.backend,
        public_key=public_key,
        identity_key=identity,
        models=_unique_models(register),
        max_concurrency=register.max_concurrency or 4,
        advertised_prefill_tps=register.prefill_tps,
        advertised_decode_tps=register.decode_tps,
        token_id=_check_token(register.auth_token, settings, lookup_token),
        multi_sse=MULTI_SSE in (register.extensions or ()),
    )


def admit(registry: Registry, entry: ProviderEntry) -> bool:
    """Add `entry` to the registry: True when live at once, False when it is a candidate
    for an identity that already has a live session (see `Registry.add`)."""
    holder = registry.holder_of(entry.public_key)
    if holder is not None and holder.provider_id != entry.provider_id:
        # Requests are sealed to this key: one identity's key must never route to another.
        raise Refused("public_key is already registered by another provider")
    return registry.add(entry)


def _check_token(token: str | None, settings: Settings, lookup_token: TokenLookup) -> str | None:
    if settings.provider_auth == "open":
        return None
    if not token:
        raise Refused("auth_token is required: ask the daemon's admin for a provider token")
    token_id = lookup_token(token)
    if token_id is None:
        raise Refused("auth_token is unknown or revoked")
    return token_id


def _unique_models(register: Register) -> dict[str, ModelInfo]:
    models = {info.id: info for info in register.models}
    if len(models) != len(register.models):
        raise Refused("register repeats a model id")
    return models
