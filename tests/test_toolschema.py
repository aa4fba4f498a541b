"""Tool schema repair: every rule of the spec, the real incident, the bounds, and properties."""

from __future__ import annotations

import decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.toolschema import MAX_BODY_BYTES, MAX_DEPTH, normalize_tools

_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(float_hook=decimal.Decimal)
_encoder = msgspec.json.Encoder(decimal_format="number")


def encode(document: Any) -> bytes:
    return _encoder.encode(document)


def decode(body: bytes) -> Any:
    return _decoder.decode(body)


def normalized(document: Any) -> Any:
    return decode(normalize_tools(encode(document)))


def chat_body(*schemas: Any) -> dict[str, Any]:
    """A chat completions body with one `function.parameters` tool per schema."""
    tools = [
        {"type": "function", "function": {"name": f"t{i}", "parameters": schema}}
        for i, schema in enumerate(schemas)
    ]
    return {"model": "gemma", "messages": [{"role": "user", "content": "hi"}], "tools": tools}


def repaired_parameters(schema: Any) -> Any:
    return normalized(chat_body(schema))["tools"][0]["function"]["parameters"]


def assert_untouched(document: Any) -> None:
    body = encode(document)
    assert normalize_tools(body) is body


# --- the three homes -----------------------------------------------------------------------


def test_function_parameters_are_repaired() -> None:
    assert repaired_parameters({"properties": {}}) == {"properties": {}, "type": "object"}


def test_flat_parameters_are_repaired_without_a_function_wrapper() -> None:
    entry = {"type": "function", "name": "f", "parameters": {"items": {"enum": ["a"]}}}
    (out,) = normalized({"tools": [entry]})["tools"]
    assert out["parameters"] == {"items": {"enum": ["a"], "type": "string"}, "type": "array"}
    assert out.keys() == entry.keys()


def test_object_function_claims_the_entry_and_stray_parameters_stay() -> None:
    entry = {
        "function": {"name": "f", "parameters": {"enum": ["a"]}},
        "parameters": {"enum": ["stray"]},
    }
    (out,) = normalized({"tools": [entry]})["tools"]
    assert out["function"]["parameters"] == {"enum": ["a"], "type": "string"}
    assert out["parameters"] == {"enum": ["stray"]}


@pytest.mark.parametrize("function", ["get_weather", 7, None, ["f"], True])
def test_non_object_function_passes_through_and_the_entry_is_flat(function: Any) -> None:
    entry = {"function": function, "parameters": {"description": "d"}}
    (out,) = normalized({"tools": [entry]})["tools"]
    assert out["function"] == function
    assert out["parameters"] == {"description": "d", "type": "string"}


@pytest.mark.parametrize(
    "entry",
    [
        {"function": {"parameters": {"enum": [1]}}, "input_schema": {"properties": {}}},
        {"parameters": {"enum": [1]}, "input_schema": {"properties": {}}},
    ],
)
def test_input_schema_is_repaired_independently(entry: dict[str, Any]) -> None:
    (out,) = normalized({"tools": [entry]})["tools"]
    assert out["input_schema"] == {"properties": {}, "type": "object"}
    parameters = out["function"]["parameters"] if "function" in out else out["parameters"]
    assert parameters == {"enum": [1], "type": "string"}


def test_anthropic_input_schema_alone_is_repaired() -> None:
    entry = {"name": "f", "input_schema": {"properties": {"q": {"type": ["string", "null"]}}}}
    (out,) = normalized({"tools": [entry]})["tools"]
    assert out == {
        "name": "f",
        "input_schema": {
            "properties": {"q": {"type": "string", "nullable": True}},
            "type": "object",
        },
    }


# --- which nodes get a type ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("properties", {}),
        ("items", {}),
        ("additionalProperties", False),
        ("enum", ["a"]),
        ("description", "d"),
        ("anyOf", []),
        ("oneOf", []),
        ("allOf", []),
    ],
)
def test_each_schema_like_key_earns_a_type(key: str, value: Any) -> None:
    assert "type" in repaired_parameters({key: value})


@pytest.mark.parametrize("schema", [{}, {"title": "x"}, {"$ref": "#/$defs/A"}, {"default": 1}])
def test_a_map_without_schema_keys_gets_no_type(schema: dict[str, Any]) -> None:
    assert_untouched(chat_body(schema))
    assert_untouched(chat_body({"type": "object", "properties": {"p": schema}}))


# --- inferring a missing type --------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"properties": {"a": {"type": "string"}}}, "object"),
        ({"additionalProperties": {"type": "integer"}}, "object"),
        ({"items": {"type": "string"}}, "array"),
        ({"properties": {}, "items": {}}, "object"),
        ({"anyOf": [{"type": "null"}, {"type": "integer"}, {"type": "string"}]}, "integer"),
        ({"oneOf": [{"type": "boolean"}, {"type": "null"}]}, "boolean"),
        ({"allOf": [{"$ref": "#/x"}, {"type": "number"}]}, "number"),
        ({"anyOf": [{"title": "no type"}], "oneOf": [{"type": "integer"}]}, "integer"),
        ({"anyOf": [{"type": "null"}]}, "string"),
        ({"anyOf": [True, 3, "x"]}, "string"),
        ({"enum": [1, 2]}, "string"),
        ({"description": "free text"}, "string"),
    ],
)
def test_a_missing_type_is_inferred(schema: dict[str, Any], expected: str) -> None:
    assert repaired_parameters(schema)["type"] == expected


def test_children_are_repaired_before_their_parent() -> None:
    schema = {"anyOf": [{"type": ["string", "null"]}, {"type": "integer"}]}
    assert repaired_parameters(schema) == {
        "anyOf": [{"type": "string", "nullable": True}, {"type": "integer"}],
        "type": "string",
    }


def test_every_child_home_is_repaired_at_any_depth() -> None:
    leaf = {"enum": ["x"]}
    fixed = {"enum": ["x"], "type": "string"}
    schema = {
        "properties": {
            "p": {"items": {"additionalProperties": {"oneOf": [{"allOf": [{"anyOf": [leaf]}]}]}}}
        }
    }
    out = repaired_parameters(schema)
    union = out["properties"]["p"]["items"]["additionalProperties"]
    assert union["oneOf"][0]["allOf"][0] == {"anyOf": [fixed], "type": "string"}
    assert union["oneOf"][0]["type"] == "string"
    assert union["type"] == "string"
    assert out["properties"]["p"]["items"]["type"] == "object"
    assert out["properties"]["p"]["type"] == "array"
    assert out["type"] == "object"


def test_tuple_form_items_members_are_repaired() -> None:
    out = repaired_parameters({"items": [{"enum": [1]}, {"type": ["null", "integer"]}, 5]})
    assert out["items"] == [
        {"enum": [1], "type": "string"},
        {"type": "integer", "nullable": True},
        5,
    ]
    assert out["type"] == "array"


@pytest.mark.parametrize("flag", [True, False])
def test_bare_additional_properties_is_kept_and_makes_the_parent_an_object(flag: bool) -> None:
    assert repaired_parameters({"additionalProperties": flag}) == {
        "additionalProperties": flag,
        "type": "object",
    }


def test_property_names_that_look_like_schema_keys_are_not_schemas() -> None:
    properties = {"description": {"type": "string"}, "items": {"type": "integer"}}
    assert_untouched(chat_body({"type": "object", "properties": properties}))
    out = repaired_parameters({"properties": properties})
    assert out["properties"] == properties


# --- a present type that is not a string ---------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": ["string", "null"]}, {"type": "string", "nullable": True}),
        ({"type": ["null", "integer", "string"]}, {"type": "integer", "nullable": True}),
        ({"type": ["string", "integer"]}, {"type": "string"}),
        ({"type": ["string", "null"], "nullable": False}, {"type": "string", "nullable": False}),
        ({"nullable": None, "type": ["string", "null"]}, {"nullable": None, "type": "string"}),
        ({"type": ["null"]}, {"type": "null"}),
        ({"type": ["null", "null"]}, {"type": "null"}),
        ({"type": [7, None, "null", "boolean"]}, {"type": "boolean", "nullable": True}),
    ],
)
def test_the_array_form_collapses(schema: dict[str, Any], expected: dict[str, Any]) -> None:
    assert repaired_parameters(schema) == expected


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": 3, "properties": {}}, "object"),
        ({"type": {"x": 1}, "items": {"type": "string"}}, "array"),
        ({"type": None, "enum": ["a"]}, "string"),
        ({"type": [], "additionalProperties": True}, "object"),
        ({"type": [1, 2], "anyOf": [{"type": "number"}]}, "number"),
        ({"type": True}, "string"),
    ],
)
def test_any_other_type_shape_falls_back_to_inference(
    schema: dict[str, Any], expected: str
) -> None:
    out = repaired_parameters(schema)
    assert out["type"] == expected
    assert "nullable" not in out
    assert list(out) == list(schema), "the type key keeps its place and is never deleted"


@pytest.mark.parametrize("kind", ["STRING", "string", "Object", "", "null"])
def test_string_types_are_never_changed(kind: str) -> None:
    assert_untouched(chat_body({"type": kind, "properties": {"a": {"type": kind}}}))


# --- pass-through --------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [None, 5, "object", True, [{"enum": ["a"]}], 1.5])
def test_null_and_scalar_schemas_pass_through_verbatim(schema: Any) -> None:
    assert_untouched(chat_body(schema))
    assert_untouched({"tools": [{"parameters": schema, "input_schema": schema}]})


@pytest.mark.parametrize(
    "entry",
    [None, 3, "tool", True, [], {}, {"type": "function"}, {"name": "f", "description": "d"}],
)
def test_malformed_entries_pass_through(entry: Any) -> None:
    assert_untouched({"tools": [entry]})


def test_the_tool_entry_itself_never_gains_keys() -> None:
    entries = [
        {"type": "function", "function": {"name": "f"}},
        {"type": "function", "name": "g", "description": "d"},
        {"name": "h", "enum": ["a"]},
    ]
    assert_untouched({"tools": entries})
    out = normalized({"tools": [*entries, {"parameters": {"enum": ["a"]}}]})["tools"]
    assert out[:3] == entries


# --- bounds --------------------------------------------------------------------------------


def padded(document: dict[str, Any], size: int) -> bytes:
    """`document` encoded to exactly `size` bytes by a filler field."""
    body = encode({**document, "pad": ""})
    return encode({**document, "pad": "x" * (size - len(body))})


def test_bodies_over_the_size_bound_are_returned_unchanged() -> None:
    document = chat_body({"type": ["string", "null"]})
    at_bound = padded(document, MAX_BODY_BYTES)
    assert len(at_bound) == MAX_BODY_BYTES
    assert normalize_tools(at_bound) != at_bound
    over = padded(document, MAX_BODY_BYTES + 1)
    assert normalize_tools(over) is over


@pytest.mark.parametrize(
    "body",
    [
        b'{"tool":[{"parameters":{"enum":["a"]}}]}',
        b'{"messages":[{"role":"user","content":"tools"}]}',
        b"",
        b"not json at all",
    ],
)
def test_bodies_without_the_tools_bytes_are_returned_unchanged(body: bytes) -> None:
    assert normalize_tools(body) is body


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'[{"tools":[{"parameters":{"enum":["a"]}}]}]', id="array-root"),
        pytest.param(b'"tools"', id="string-root"),
        pytest.param(b'{"tools":[{"parameters":{"enum":["a"]}}]', id="truncated"),
        pytest.param(b'{"tools":[{"parameters":{"enum":["a"]}}]} {}', id="trailing-document"),
        pytest.param(b'{"tools":[{"parameters":{"enum":["a"]}}]}x', id="trailing-garbage"),
        pytest.param(b'{"tools":[{"parameters":{"enum":["\xff"]}}]}', id="not-utf8"),
        pytest.param(b'\xef\xbb\xbf{"tools":[{"parameters":{"enum":["a"]}}]}', id="bom"),
        pytest.param(b'{"tools":[{"parameters":{"enum":[NaN]}}]}', id="nan"),
        pytest.param(b'{"tools":[{"parameters":{"enum":["\\ud800"]}}]}', id="lone-surrogate"),
        pytest.param(
            b'{"n":' + b"9" * 5000 + b',"tools":[{"parameters":{"enum":["a"]}}]}', id="huge-int"
        ),
        pytest.param(b'{"tools":{"parameters":{"enum":["a"]}}}', id="tools-object"),
        pytest.param(b'{"tools":"[]"}', id="tools-string"),
        pytest.param(b'{"tools":null}', id="tools-null"),
        pytest.param(b'{"tools":[]}', id="tools-empty"),
    ],
)
def test_unreadable_or_foreign_bodies_are_returned_unchanged(body: bytes) -> None:
    assert normalize_tools(body) is body


def nested_items(levels: int) -> dict[str, Any]:
    """`levels` typeless schemas, each the `items` of the one before, around an enum leaf."""
    schema: dict[str, Any] = {"enum": ["leaf"]}
    for _ in range(levels - 1):
        schema = {"items": schema}
    return schema


def test_schemas_deeper_than_the_bound_are_left_as_they_are() -> None:
    node = repaired_parameters(nested_items(MAX_DEPTH + 3))
    for _ in range(MAX_DEPTH):
        assert node["type"] == "array"
        node = node["items"]
    assert node == nested_items(3)


def test_a_schema_exactly_at_the_bound_is_repaired() -> None:
    node = repaired_parameters(nested_items(MAX_DEPTH))
    for _ in range(MAX_DEPTH - 1):
        node = node["items"]
    assert node == {"enum": ["leaf"], "type": "string"}


def test_extreme_nesting_never_crashes() -> None:
    deep = b'{"tools":[{"parameters":' + b'{"items":' * 100_000 + b"{}" + b"}" * 100_001 + b"]}"
    assert normalize_tools(deep) is deep
    moderate = encode(chat_body(nested_items(400)))
    assert normalize_tools(moderate) != moderate


# --- identity, fidelity, idempotence ------------------------------------------------------


def test_a_body_needing_no_repair_is_the_very_same_object() -> None:
    body = (
        b'{ "model" : "gemma",\n  "temperature": 0.10,\n  "tools": [ {"type": "function",'
        b' "function": {"name": "f", "parameters": {"type": "object", "properties":'
        b' {"q": {"type": "string", "description": "query"}}}}} ] }'
    )
    assert normalize_tools(body) is body


def test_a_repaired_body_keeps_every_other_value_exactly() -> None:
    body = (
        b'{"model":"gemma","seed":9007199254740993,"big":-123456789012345678901234567890,'
        b'"top_p":0.1000000000000000055511151231257827,"tiny":1e-400,"huge":1E+400,'
        b'"neg_zero":-0.0,"text":"caf\\u00e9 \\ud83d\\ude00 \\"q\\"","nested":{"a":[1,2.50,null]},'
        b'"tools":[{"function":{"name":"f","parameters":{"type":["string","null"],'
        b'"default":18446744073709551617,"enum":[0.30000000000000004]}}}]}'
    )
    out = normalize_tools(body)
    before, after = decode(body), decode(out)
    assert after["tools"][0]["function"]["parameters"]["type"] == "string"
    del before["tools"], after["tools"]
    assert after == before
    for literal in (
        b"9007199254740993",
        b"-123456789012345678901234567890",
        b"0.1000000000000000055511151231257827",
        b"18446744073709551617",
        b"0.30000000000000004",
        b"2.50",
    ):
        assert literal in out
    assert after["seed"] == 2**53 + 1
    assert after["text"] == 'café \U0001f600 "q"'


def test_normalizing_twice_equals_normalizing_once() -> None:
    body = encode(chat_body({"anyOf": [{"type": ["null", "integer"]}], "items": {"enum": [1]}}))
    once = normalize_tools(body)
    assert once != body
    assert normalize_tools(once) is once


# --- the incident and a mixed body ---------------------------------------------------------


def test_the_incident_shape_is_repaired() -> None:
    parameters = {
        "type": "object",
        "properties": {
            "location": {"type": ["string", "null"], "description": "City, or none for here"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["unit"],
    }
    document = chat_body(parameters)
    out = normalized(document)
    assert out["tools"][0]["function"]["parameters"] == {
        "type": "object",
        "properties": {
            "location": {
                "type": "string",
                "description": "City, or none for here",
                "nullable": True,
            },
            "unit": {"enum": ["celsius", "fahrenheit"], "type": "string"},
        },
        "required": ["unit"],
    }
    assert {k: v for k, v in out.items() if k != "tools"} == {
        k: v for k, v in document.items() if k != "tools"
    }


def test_a_body_mixing_every_shape_and_a_malformed_entry() -> None:
    tools = [
        {"type": "function", "function": {"name": "chat", "parameters": {"enum": ["a"]}}},
        {"type": "function", "name": "responses", "parameters": {"type": ["integer", "null"]}},
        {"name": "anthropic", "input_schema": {"properties": {"x": {"description": "x"}}}},
        42,
    ]
    out = normalized({"model": "m", "tools": tools})["tools"]
    assert out == [
        {
            "type": "function",
            "function": {"name": "chat", "parameters": {"enum": ["a"], "type": "string"}},
        },
        {
            "type": "function",
            "name": "responses",
            "parameters": {"type": "integer", "nullable": True},
        },
        {
            "name": "anthropic",
            "input_schema": {
                "properties": {"x": {"description": "x", "type": "string"}},
                "type": "object",
            },
        },
        42,
    ]


# --- properties ----------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_type_names = st.sampled_from(["string", "null", "integer", "object", "array", "STRING"])
_types = _type_names | st.lists(_type_names | _scalars, max_size=3) | _scalars


def _schema_maps(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "type": _types,
            "properties": st.dictionaries(st.text(max_size=6), inner, max_size=3) | _json,
            "items": inner | st.lists(inner, max_size=2),
            "additionalProperties": inner | st.booleans(),
            "enum": st.lists(_scalars, max_size=3),
            "description": st.text(max_size=6),
            "anyOf": st.lists(inner, max_size=3),
            "oneOf": st.lists(inner, max_size=3),
            "allOf": st.lists(inner, max_size=3),
            "nullable": _scalars,
            "title": _json,
        },
    )


_schemas: st.SearchStrategy[Any] = st.recursive(_scalars | st.just({}), _schema_maps, max_leaves=10)
_entries = (
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": st.text(max_size=4)}, optional={"parameters": _schemas}
            )
            | _scalars,
            "parameters": _schemas,
            "input_schema": _schemas,
        },
    )
    | _json
)
_bodies = st.fixed_dictionaries(
    {"tools": st.lists(_entries, max_size=4)},
    optional={"model": st.text(max_size=6), "messages": _json, "temperature": _scalars},
).flatmap(
    lambda base: st.dictionaries(st.text(max_size=6), _json, max_size=3).map(
        lambda extra: {**extra, **base}
    )
)


@settings(max_examples=300)
@given(st.binary(max_size=64) | _bodies.map(encode))
def test_never_raises_and_always_returns_valid_json_or_the_input(body: bytes) -> None:
    out = normalize_tools(body)
    assert out is body or isinstance(decode(out), dict)


@settings(max_examples=300)
@given(_bodies)
def test_repair_is_idempotent_valid_and_leaves_other_fields_alone(document: dict[str, Any]) -> None:
    body = encode(document)
    once = normalize_tools(body)
    assert normalize_tools(once) is once
    before, after = decode(body), decode(once)
    assert len(after["tools"]) == len(before["tools"])
    del before["tools"], after["tools"]
    assert after == before


@settings(max_examples=200)
@given(_bodies)
def test_tool_entries_only_change_inside_their_schema_homes(document: dict[str, Any]) -> None:
    before = decode(encode(document))["tools"]
    after = normalized(document)["tools"]
    for old, new in zip(before, after, strict=True):
        if not isinstance(old, dict):
            assert new == old
            continue
        assert list(new) == list(old)
        homes = {"parameters", "input_schema"} - (
            {"parameters"} if isinstance(old.get("function"), dict) else set()
        )
        for key in old.keys() - homes - {"function"}:
            assert new[key] == old[key]
        if isinstance(old.get("function"), dict):
            assert {k: v for k, v in new["function"].items() if k != "parameters"} == {
                k: v for k, v in old["function"].items() if k != "parameters"
            }
        else:
            assert new.get("function") == old.get("function")


def reachable_schemas(node: Any, depth: int = 1) -> Any:
    """Every map the repair walk visits, children included, down to the depth bound."""
    if not isinstance(node, dict) or depth > MAX_DEPTH:
        return
    yield node
    properties = node.get("properties")
    children = list(properties.values()) if isinstance(properties, dict) else []
    items = node.get("items")
    children += items if isinstance(items, list) else [items]
    children.append(node.get("additionalProperties"))
    for key in ("anyOf", "oneOf", "allOf"):
        members = node.get(key)
        children += members if isinstance(members, list) else []
    for child in children:
        yield from reachable_schemas(child, depth + 1)


@settings(max_examples=200)
@given(_bodies)
def test_every_reachable_schema_ends_with_a_string_type_or_none(document: dict[str, Any]) -> None:
    for entry in normalized(document)["tools"]:
        if not isinstance(entry, dict):
            continue
        function = entry.get("function")
        owner = function if isinstance(function, dict) else entry
        for home in (owner.get("parameters"), entry.get("input_schema")):
            for schema in reachable_schemas(home):
                schema_like = not {
                    "properties",
                    "items",
                    "additionalProperties",
                    "enum",
                    "description",
                    "anyOf",
                    "oneOf",
                    "allOf",
                }.isdisjoint(schema)
                if "type" in schema or schema_like:
                    assert isinstance(schema.get("type"), str)
