"""Negotiated protocol extensions (docs/protocol-extensions.md), daemon side, end to end.

A real daemon on loopback and scripted fake providers. `multi_sse`: a node that asks for it in
`register` is acknowledged in `trust_status`, and each SSE line of a chunk frame that seals
several reaches the consumer as its own event, in order; a node that does not ask (every node
before the extension) is not acknowledged and is relayed as before. The old sides' decoders
are stood in for by structs of the old shapes: msgspec ignores the field they do not know.
The node's side of it end to end is in test_provider_node.py; its `ChunkBatch` is here.
"""

from __future__ import annotations

import msgspec
import pytest

from protocol import crypto
from protocol.messages import MULTI_SSE, Register, TrustStatus, encode
from provider.request import ChunkBatch
from tests.consumer_harness import (
    Api,
    chat_body,
    role_deltas,
    sse_data,
    sse_events,
    streamed_text,
)
from tests.fakes.provider import Chunk, Complete, always, content_chunk, finish_chunk, role_chunk

BATCHED = [
    Chunk("\n".join([role_chunk().line, content_chunk("Hel").line, content_chunk("lo").line])),
    Chunk("\n".join([content_chunk(" world").line, finish_chunk().line])),
    Complete(),
]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_node_asking_for_multi_sse_has_each_line_of_a_frame_relayed(
    api: Api, stream: bool
) -> None:
    (fake,) = await api.connect(api.fake(always(BATCHED), extensions=[MULTI_SSE, "unknown_ext"]))
    assert fake.verdicts[0].status == "trusted"
    assert fake.verdicts[0].extensions == [MULTI_SSE]  # only what the daemon speaks

    response = await api.chat(stream=stream)
    assert response.status_code == 200, response.text
    if stream:
        data = sse_data(response.text)
        assert data.count("[DONE]") == 1 and data[-1] == "[DONE]"
        events = sse_events(response.text)
        assert streamed_text(events) == "Hello world"
        assert role_deltas(events) == 1
        assert len(events) == 5  # role, three content chunks, finish: one event per line
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
    else:
        assert response.json()["choices"][0]["message"]["content"] == "Hello world"


async def test_a_node_not_asking_is_not_acknowledged_and_relayed_line_by_frame(api: Api) -> None:
    (fake,) = await api.connect(api.fake())
    assert fake.verdicts[0] == TrustStatus(status="trusted")
    assert b"extensions" not in encode(fake.verdicts[0]).encode()  # absent on the wire
    response = await api.chat(body=chat_body(stream=True))
    assert streamed_text(sse_events(response.text)) == "Hello world"


class _OldRegister(msgspec.Struct, tag_field="type", tag="register"):
    """`register` as a daemon from before the extensions decodes it."""

    protocol: int
    version: str
    backend: str
    public_key: str
    identity_key: str
    models: list[dict[str, object]]


class _OldTrustStatus(msgspec.Struct, tag_field="type", tag="trust_status"):
    """`trust_status` as a node from before the extensions decodes it."""

    status: str
    reason: str | None = None


def test_old_decoders_ignore_the_extensions_fields() -> None:
    register = Register(
        protocol=1,
        version="1",
        backend="b",
        public_key="k",
        identity_key="i",
        models=[],
        extensions=[MULTI_SSE],
    )
    old = msgspec.json.decode(encode(register), type=_OldRegister)
    assert (old.protocol, old.version, old.public_key) == (1, "1", "k")
    trust = TrustStatus(status="trusted", extensions=[MULTI_SSE])
    assert msgspec.json.decode(encode(trust), type=_OldTrustStatus) == _OldTrustStatus("trusted")


async def test_a_node_batch_is_queued_once_and_seals_every_line_added_until_taken() -> None:
    provider = crypto.generate_box_key()
    payload, opener = crypto.seal_request(b"{}", provider.public_key)
    _, sealer = crypto.open_request(payload, provider)
    batch, queued = ChunkBatch("r1", sealer), []

    async def send(item: object) -> None:
        queued.append(item)

    await batch.add("data: a", send)
    await batch.add("data: b", send)
    assert queued == [batch]  # queued once: the writer takes every line added meanwhile
    assert opener.open_chunk(batch.frame()) == b"data: a\ndata: b"
    await batch.add("data: c", send)
    assert queued == [batch, batch]
    assert opener.open_chunk(batch.frame()) == b"data: c"
