"""Repair of tool parameter schemas that chat templates choke on.

Some chat templates (Gemma's) upper-case every tool parameter's `type`. A missing type, or the
nullable array form `"type": ["string", "null"]` that Pydantic emits for `Optional[...]`,
crashes the template and the request fails on every provider. The daemon runs
`normalize_tools` on each consumer body before sealing it, and the provider node runs it again
on the decrypted body, so no backend ever sees such a schema.

Each entry of the top-level `tools` array has up to three schema homes: `function.parameters`
(chat completions), a flat `parameters` (Responses API; only when `function` is not an object)
and `input_schema` (Anthropic Messages). Inside a home, schemas are repaired children first
through `properties`, `items`, object-valued `additionalProperties` and `anyOf`/`oneOf`/`allOf`
members; string types are never changed.

Depth bound: a home schema is depth 1 and each step into a child schema adds one. Schemas
deeper than `MAX_DEPTH` (64) are left exactly as they are, while their ancestors are still
repaired; the bound keeps the walk's recursion far below Python's limit whatever the input.

Anything this module does not understand is passed through: oversized, non-UTF-8 or malformed
bodies, trailing data, non-object roots and a non-array `tools` come back as the very same
bytes object, as does any body that needed no repair. A repaired body is re-encoded with every
other value intact: floats are decoded as `Decimal` and integers as Python ints, so
`0.1000000000000000055511151231257827` and integers beyond 2**53 keep their exact digits.
"""

from __future__ import annotations

import decimal
from typing import Any

import msgspec

__all__ = ["MAX_BODY_BYTES", "MAX_DEPTH", "normalize_tools"]

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64

_TOOLS_MARKER = b'"tools"'
_UNION_KEYS = ("anyOf", "oneOf", "allOf")
_SCHEMA_KEYS = frozenset(
    {"properties", "items", "additionalProperties", "enum", "description", *_UNION_KEYS}
)
# ValueError covers msgspec's DecodeError and ValidationError (an integer too long for int())
# and UnicodeDecodeError; RecursionError is msgspec's answer to very deep nesting.
_UNREADABLE = (ValueError, RecursionError)

_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(float_hook=decimal.Decimal)
_encoder = msgspec.json.Encoder(decimal_format="number")


def normalize_tools(body: bytes) -> bytes:
    """Return `body` with its tool schemas repaired, or `body` itself when none needed it."""
    if len(body) > MAX_BODY_BYTES or _TOOLS_MARKER not in body:
        return body
    try:
        document = _decoder.decode(body)
    except _UNREADABLE:
        return body
    if not isinstance(document, dict) or not _repair_tools(document.get("tools")):
        return body
    try:
        return _encoder.encode(document)
    except _UNREADABLE:
        return body


def _repair_tools(tools: Any) -> bool:
    if not isinstance(tools, list):
        return False
    changed = False
    for entry in tools:
        changed = _repair_entry(entry) or changed
    return changed


def _repair_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    function = entry.get("function")
    # An object `function` claims the entry, so a stray flat `parameters` beside it is left be.
    owner = function if isinstance(function, dict) else entry
    changed = _repair_home(owner.get("parameters"))
    return _repair_home(entry.get("input_schema")) or changed


def _repair_home(schema: Any) -> bool:
    return isinstance(schema, dict) and _repair_schema(schema, 1)


def _repair_schema(node: dict[str, Any], depth: int) -> bool:
    changed = False
    if depth < MAX_DEPTH:
        for child in _child_schemas(node):
            changed = _repair_schema(child, depth + 1) or changed
    return _repair_type(node) or changed


def _child_schemas(node: dict[str, Any]) -> list[dict[str, Any]]:
    properties = node.get("properties")
    children: list[Any] = list(properties.values()) if isinstance(properties, dict) else []
    items = node.get("items")
    children.extend(items if isinstance(items, list) else [items])
    children.append(node.get("additionalProperties"))
    for key in _UNION_KEYS:
        members = node.get(key)
        if isinstance(members, list):
            children.extend(members)
    return _only_objects(children)


def _only_objects(values: list[Any]) -> list[dict[str, Any]]:
    return [value for value in values if isinstance(value, dict)]


def _repair_type(node: dict[str, Any]) -> bool:
    if "type" not in node:
        if _SCHEMA_KEYS.isdisjoint(node):
            return False
        node["type"] = _inferred_type(node)
        return True
    kind = node["type"]
    if isinstance(kind, str):
        return False
    node["type"] = _collapsed_type(node, kind) if isinstance(kind, list) else _inferred_type(node)
    return True


def _collapsed_type(node: dict[str, Any], kinds: list[Any]) -> str:
    named = [kind for kind in kinds if isinstance(kind, str) and kind != "null"]
    has_null = "null" in kinds
    if named:
        if has_null:
            node.setdefault("nullable", True)
        return named[0]
    return "null" if has_null else _inferred_type(node)


def _inferred_type(node: dict[str, Any]) -> str:
    if "properties" in node or "additionalProperties" in node:
        return "object"
    if "items" in node:
        return "array"
    return _union_type(node) or "string"


def _union_type(node: dict[str, Any]) -> str | None:
    for key in _UNION_KEYS:
        members = node.get(key)
        if not isinstance(members, list):
            continue
        for member in _only_objects(members):
            kind = member.get("type")
            if isinstance(kind, str) and kind != "null":
                return kind
    return None
