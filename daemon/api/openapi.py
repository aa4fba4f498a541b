"""`GET /openapi.json`: the OpenAPI 3.1 document of the consumer and admin routes.

`PATHS` is the one table of documented operations, keyed by the OpenAPI path as the route
table spells it (`app.Router`'s paths and prefixes, the quart app's url_map with `<id>`
written `{id}`); tests/test_openapi.py fails when a route is missing from it or it documents
one that is absent. The request schemas say what the route translators
(`chat_request.py`, `completions_request.py`, `responses_request.py`, `messages_request.py`,
`body.py`) accept and refuse, no more: a field they pass through unchecked is allowed, not
described. Success shapes name the fields a client relies on and allow more.

Errors: OpenAI's `{"error": {"type", "message", "code", "param"}}` everywhere except on
`/v1/messages*`, which answer Anthropic's `{"type": "error", "error": {"type", "message"}}`,
and `/v1/models*`, which answer Anthropic's when the request carries `anthropic-version`.

The document describes the routes as the README does and holds no key, no address and no
setting of the running daemon; it is served to a consumer key, since every route but
`/health`, `/readyz` and `/ws/provider` takes its credential.
`/ws/provider` is not an HTTP operation; the document names it in `info.description` and
PROTOCOL.md is its contract.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Final

import msgspec

Schema = dict[str, Any]
Operation = dict[str, Any]


def _version() -> str:
    try:
        return metadata.version("dinfer")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


VERSION: Final = _version()
OPENAI_ERROR: Final = {"$ref": "#/components/schemas/OpenAIError"}
ANTHROPIC_ERROR: Final = {"$ref": "#/components/schemas/AnthropicError"}
EITHER_ERROR: Final = {"anyOf": [OPENAI_ERROR, ANTHROPIC_ERROR]}
CONSUMER: Final[list[Any]] = [{"consumerBearer": []}, {"consumerApiKey": []}]
ADMIN: Final[list[Any]] = [{"adminBearer": []}]
PUBLIC: Final[list[Any]] = []

# One server-sent event (the schema of a text/event-stream answer is its events'): the OpenAI
# routes send `data:` lines (a JSON chunk, the last `[DONE]`), Responses and Anthropic's add
# `event:` names.
SSE_EVENT: Final = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}

# What each status means where it can come; an operation lists the ones it can answer.
_STATUS_TEXT: Final = {
    400: "the request is invalid (`param` names the field)",
    401: "no valid, unexpired credential",
    403: "the key may not use this model, or the admin API is disabled",
    404: "no such model, key, token or provider",
    408: "the request body did not arrive in time",
    413: "the request body is too large",
    415: "a provider refused the request's media type",
    422: "a provider refused the request as unprocessable",
    429: "the key's rate limit or the model's queue is full (`Retry-After`)",
    500: "the daemon failed to answer; the cause is in its log",
    502: "the providers failed before or while answering",
    503: "no provider can serve it now, or the daemon is starting or shutting down",
    504: "no provider answered in time",
}
_INFERENCE_ERRORS: Final = (400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 502, 503, 504)
_READ_ERRORS: Final = (400, 401, 404, 500)
_ADMIN_ERRORS: Final = (400, 401, 403, 404, 408, 413, 500)


def _str(**extra: Any) -> Schema:
    return {"type": "string", **extra}


def _int(**extra: Any) -> Schema:
    return {"type": "integer", **extra}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(statuses: tuple[int, ...], schema: Schema = OPENAI_ERROR) -> dict[str, Any]:
    return {str(s): {"description": _STATUS_TEXT[s], "content": _json(schema)} for s in statuses}


def _ok(description: str, schema: Schema, status: int = 200) -> dict[str, Any]:
    return {str(status): {"description": description or "the answer", "content": _json(schema)}}


def _streamed(description: str, schema: Schema) -> dict[str, Any]:
    """200: one JSON object, or a server-sent event stream with `"stream": true`."""
    content = {**_json(schema), "text/event-stream": {"schema": SSE_EVENT}}
    return {"200": {"description": description, "content": content}}


def _body(schema: Schema) -> dict[str, Any]:
    return {"required": True, "content": _json(schema)}


def _op(
    summary: str,
    security: list[Any],
    responses: dict[str, Any],
    *,
    tag: str,
    body: Schema | None = None,
    parameters: list[Any] | None = None,
) -> Operation:
    op: Operation = {"summary": summary, "tags": [tag], "security": security}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = _body(body)
    op["responses"] = responses
    return op


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": _str(),
    }


def _query(name: str, description: str, schema: Schema | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema or _str()}


# Request bodies ------------------------------------------------------------------------------

_MAX_TOKENS: Final = _nullable(_int(minimum=1, maximum=10_000_000))
_SAMPLING: Final = {
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "repetition_penalty": _nullable({"type": "number", "minimum": 0, "maximum": 10}),
    "top_k": _nullable(_int(minimum=-1, maximum=1_000_000)),
    "top_logprobs": _nullable(_int(minimum=0, maximum=20)),
    "seed": _nullable(_int(minimum=-(2**63), maximum=2**63 - 1)),
}
_OPENAI_OPTIONS: Final = {
    "model": _str(minLength=1, description="a model some provider serves (GET /v1/models)"),
    "stream": _nullable({"type": "boolean"}),
    "stream_options": _nullable(_obj({"include_usage": {"type": "boolean"}})),
    "n": _nullable(_int(minimum=1, maximum=1, description="only 1 is supported")),
    "max_tokens": _MAX_TOKENS,
    "max_completion_tokens": _MAX_TOKENS,
    "tools": _nullable({"type": "array", "items": {"type": "object"}}),
    **_SAMPLING,
}
CHAT_REQUEST: Final = _obj(
    {
        **_OPENAI_OPTIONS,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": _obj({"role": _str(), "content": {}}),
        },
    },
    ("model", "messages"),
    description="OpenAI chat completions; other fields pass to the provider unchecked",
)
COMPLETION_REQUEST: Final = _obj(
    {
        **_OPENAI_OPTIONS,
        "prompt": {
            "anyOf": [_str(), {"type": "array", "items": _str(), "minItems": 1, "maxItems": 1}],
            "description": "a string, or an array of exactly one string (no batches, no ids)",
        },
        "best_of": _nullable(_int(minimum=1, maximum=1)),
        "echo": _nullable({"type": "boolean"}),
        "suffix": _nullable(_str()),
        "logprobs": _nullable(_int(minimum=0, maximum=5)),
    },
    ("model", "prompt"),
    description="OpenAI legacy text completions",
)
_RESPONSES_PART: Final = {
    "oneOf": [
        _obj({"type": {"enum": ["input_text", "output_text"]}, "text": _str()}, ("type", "text")),
        _obj({"type": {"const": "refusal"}, "refusal": _str(minLength=1)}, ("type", "refusal")),
        _obj(
            {"type": {"const": "input_image"}, "image_url": _str(minLength=1), "detail": _str()},
            ("type", "image_url"),
        ),
    ]
}
_RESPONSES_ITEM: Final = {
    "oneOf": [
        _obj(
            {
                "type": {"const": "message"},
                "role": {"enum": ["user", "assistant", "system", "developer"]},
                "content": {"anyOf": [_str(), {"type": "array", "items": _RESPONSES_PART}]},
            },
            ("role", "content"),
        ),
        _obj(
            {
                "type": {"const": "function_call"},
                "call_id": _str(minLength=1),
                "name": _str(minLength=1),
                "arguments": _str(),
            },
            ("type", "call_id", "name"),
        ),
        _obj(
            {"type": {"const": "function_call_output"}, "call_id": _str(minLength=1), "output": {}},
            ("type", "call_id", "output"),
        ),
        _obj({"type": {"const": "reasoning"}}, ("type",)),
    ]
}
RESPONSES_REQUEST: Final = _obj(
    {
        "model": _OPENAI_OPTIONS["model"],
        "input": {"anyOf": [_str(), {"type": "array", "minItems": 1, "items": _RESPONSES_ITEM}]},
        "instructions": _nullable(_str()),
        "stream": _nullable({"type": "boolean"}),
        "max_output_tokens": _MAX_TOKENS,
        "tools": _nullable(
            {
                "type": "array",
                "items": _obj(
                    {"type": {"const": "function"}, "name": _str(minLength=1)}, ("type", "name")
                ),
            }
        ),
        "tool_choice": {
            "anyOf": [
                {"enum": ["auto", "none", "required", None]},
                _obj({"type": {"const": "function"}, "name": _str(minLength=1)}, ("type", "name")),
            ]
        },
        "parallel_tool_calls": _nullable({"type": "boolean"}),
        "text": _nullable(
            _obj(
                {
                    "format": _nullable(
                        _obj(
                            {"type": {"enum": ["text", "json_object", "json_schema"]}},
                            ("type",),
                        )
                    )
                }
            )
        ),
        "previous_response_id": {"type": "null", "description": "refused: no server state"},
        "conversation": {"type": "null", "description": "refused: no server state"},
        "background": {"enum": [False, None], "description": "true is refused"},
        **_SAMPLING,
    },
    ("model", "input"),
    description="the OpenAI Responses API, stateless",
)
_TEXT_BLOCK: Final = _obj({"type": {"const": "text"}, "text": _str()}, ("type", "text"))
_ANTHROPIC_BLOCK: Final = _obj(
    {
        "type": {
            "enum": ["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"]
        }
    },
    ("type",),
    description="tool_use and thinking blocks in assistant turns; image and tool_result in user",
)
_ANTHROPIC_FIELDS: Final = {
    "model": _str(minLength=1),
    "messages": {
        "type": "array",
        "minItems": 1,
        "items": _obj(
            {
                "role": {"enum": ["user", "assistant"]},
                "content": {"anyOf": [_str(), {"type": "array", "items": _ANTHROPIC_BLOCK}]},
            },
            ("role", "content"),
        ),
    },
    "system": {"anyOf": [_str(), {"type": "array", "items": _TEXT_BLOCK}, {"type": "null"}]},
    "stream": _nullable({"type": "boolean"}),
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "top_k": _nullable(_int(minimum=0)),
    "stop_sequences": _nullable({"type": "array", "items": _str(minLength=1)}),
    "tools": _nullable(
        {
            "type": "array",
            "items": _obj(
                {
                    "type": {"enum": ["custom", None]},
                    "name": _str(minLength=1),
                    "description": _nullable(_str(minLength=1)),
                    "input_schema": {"type": "object"},
                },
                ("name", "input_schema"),
            ),
        }
    ),
    "tool_choice": _nullable(
        _obj(
            {
                "type": {"enum": ["auto", "any", "tool", "none"]},
                "name": _str(minLength=1),
                "disable_parallel_tool_use": {"type": "boolean"},
            },
            ("type",),
        )
    ),
    "metadata": {"description": "ignored"},
}
MESSAGES_REQUEST: Final = _obj(
    {**_ANTHROPIC_FIELDS, "max_tokens": _int(minimum=1, maximum=10_000_000)},
    ("model", "messages", "max_tokens"),
    description="Anthropic Messages",
)
COUNT_TOKENS_REQUEST: Final = _obj(
    {**_ANTHROPIC_FIELDS, "max_tokens": _MAX_TOKENS},
    ("model", "messages"),
    description="a Messages body; max_tokens is optional",
)
# An order on a provider (drain, cooldowns): applied here, or forwarded to the cluster's
# instance holding the provider (`owner`).
_APPLIED: Final = {
    "applied": {"enum": ["local", "forwarded"]},
    "owner": {"type": "string", "description": "the instance the order was forwarded to"},
}
_KEY_LIMITS: Final = {
    **{
        name: _nullable(_int(minimum=1, maximum=2**63 - 1))
        for name in ("rpm", "tpm", "daily_tokens", "max_concurrency")
    },
    "allowed_models": _nullable(
        {"type": "array", "maxItems": 1000, "items": _str(minLength=1, maxLength=256)}
    ),
    "expires_at": _nullable(_str(description="RFC 3339 with a timezone")),
}
NEW_KEY: Final = _obj(
    {"name": _str(minLength=1), **_KEY_LIMITS},
    ("name",),
    additionalProperties=False,
)
KEY_CHANGES: Final = _obj(
    {"name": _nullable(_str(minLength=1)), **_KEY_LIMITS}, additionalProperties=False
)
NEW_TOKEN: Final = _obj({"name": _str(minLength=1)}, ("name",))

# Response shapes -----------------------------------------------------------------------------

_TIME: Final = _nullable(_str())
SCHEMAS: Final[dict[str, Schema]] = {
    "OpenAIError": _obj(
        {
            "error": _obj(
                {
                    "type": _str(),
                    "message": _str(),
                    "code": _nullable(_str()),
                    "param": _nullable(_str()),
                },
                ("type", "message", "code", "param"),
            )
        },
        ("error",),
        additionalProperties=False,
    ),
    "AnthropicError": _obj(
        {
            "type": {"const": "error"},
            "error": _obj({"type": _str(), "message": _str()}, ("type", "message")),
        },
        ("type", "error"),
        additionalProperties=False,
    ),
    "ChatCompletion": _obj(
        {"id": _str(), "object": {"const": "chat.completion"}, "choices": {"type": "array"}},
        ("id", "object", "choices"),
    ),
    "TextCompletion": _obj(
        {"id": _str(), "object": {"const": "text_completion"}, "choices": {"type": "array"}},
        ("id", "object", "choices"),
    ),
    "Response": _obj(
        {"id": _str(), "object": {"const": "response"}, "status": _str(), "output": {}},
        ("id", "object", "status"),
    ),
    "Message": _obj(
        {
            "id": _str(),
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "content": {"type": "array"},
            "usage": {"type": "object"},
        },
        ("id", "type", "role", "content"),
    ),
    "InputTokens": _obj({"input_tokens": _int(minimum=0)}, ("input_tokens",)),
    "Model": _obj(
        {
            "id": _str(),
            "object": {"const": "model"},
            "created": _int(),
            "owned_by": _str(),
            "providers": _int(minimum=1),
            "context_length": _nullable(_int()),
            "capabilities": _obj(
                {"tools": {"type": "boolean"}, "vision": {"type": "boolean"}}, ("tools", "vision")
            ),
        },
        ("id", "object", "created", "owned_by"),
    ),
    "ModelList": _obj(
        {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
        ("object", "data"),
    ),
    "AnthropicModel": _obj(
        {
            "type": {"const": "model"},
            "id": _str(),
            "display_name": _str(),
            "created_at": _str(),
        },
        ("type", "id", "display_name", "created_at"),
    ),
    "AnthropicModelList": _obj(
        {
            "data": {"type": "array", "items": _ref("AnthropicModel")},
            "has_more": {"type": "boolean"},
            "first_id": _nullable(_str()),
            "last_id": _nullable(_str()),
        },
        ("data", "has_more", "first_id", "last_id"),
    ),
    "Usage": _obj(
        {
            "object": {"const": "usage"},
            "group_by": _nullable(_str()),
            "data": {
                "type": "array",
                "items": _obj(
                    {
                        "group": {},
                        "requests": _int(),
                        "outcomes": {"type": "object"},
                        "prompt_tokens": _int(),
                        "completion_tokens": _int(),
                        "reasoning_tokens": _int(),
                        "ttft_p50_ms": _nullable({"type": "number"}),
                        "ttft_p95_ms": _nullable({"type": "number"}),
                    },
                    ("group", "requests", "outcomes"),
                ),
            },
        },
        ("object", "group_by", "data"),
    ),
    "Key": _obj(
        {"id": _str(), "name": _str(), "created_at": _str(), "revoked_at": _TIME, **_KEY_LIMITS},
        ("id", "name", "created_at", "revoked_at"),
    ),
    "IssuedKey": {
        "allOf": [_ref("Key"), _obj({"key": _str()}, ("key",))],
        "description": "the secret `key` is shown here only",
    },
    "RotatedKey": _obj({"id": _str(), "key": _str()}, ("id", "key")),
    "KeyList": _obj({"keys": {"type": "array", "items": _ref("Key")}}, ("keys",)),
    "Revoked": _obj({"id": _str(), "revoked": {"const": True}}, ("id", "revoked")),
    "ProviderToken": _obj(
        {"id": _str(), "name": _str(), "created_at": _str(), "revoked_at": _TIME},
        ("id", "name", "created_at", "revoked_at"),
    ),
    "IssuedToken": _obj({"id": _str(), "token": _str(), "name": _str()}, ("id", "token", "name")),
    "TokenList": _obj({"tokens": {"type": "array", "items": _ref("ProviderToken")}}, ("tokens",)),
    "RevokedToken": _obj(
        {"id": _str(), "revoked": {"const": True}, "disconnected": _int(minimum=0)},
        ("id", "revoked", "disconnected"),
    ),
    "Providers": _obj(
        {
            "providers": {
                "type": "array",
                "items": _obj(
                    {"provider_id": _str(), "models": {"type": "array"}},
                    ("provider_id", "models", "in_flight", "trusted", "drained"),
                ),
            }
        },
        ("providers",),
    ),
    "Cleared": _obj(
        {"provider_id": _str(), "cleared": _int(minimum=0), **_APPLIED},
        ("provider_id", "cleared", "applied"),
    ),
    "Drain": _obj(
        {
            "provider_id": _str(),
            "drained": {"type": "boolean"},
            "in_flight": _int(minimum=0),
            **_APPLIED,
        },
        ("provider_id", "drained", "in_flight", "applied"),
    ),
    "Hedging": _obj(
        {"mode": _str(), "budget": {"type": "object"}, "models": {"type": "array"}},
        ("mode", "percentile", "floor_ms", "budget", "counters", "models"),
    ),
    "Status": _obj({"status": _str()}, ("status",)),
}

# The operations ------------------------------------------------------------------------------

_ANTHROPIC_VERSION: Final = {
    "name": "anthropic-version",
    "in": "header",
    "description": "present: Anthropic's shapes (list with cursors, errors) instead of OpenAI's",
    "schema": _str(),
}
_ANTHROPIC_PAGING: Final = [
    _query("limit", "Anthropic's shape only: page size, 1 to 1000", _int(minimum=1, maximum=1000)),
    _query("after_id", "Anthropic's shape only: the page after this id"),
    _query("before_id", "Anthropic's shape only: the page before this id"),
]
_USAGE_QUERY: Final = [
    _query("since", "RFC 3339 with a timezone: requests started at or after it"),
    _query("until", "RFC 3339 with a timezone: requests started before it"),
    _query("model", "only this model"),
    _query("group_by", "one summary per group", {"enum": ["day", "model", "key", "provider"]}),
]
_KEY_ID: Final = _path_param("key_id", "a consumer key's id (`key_...`)")
_PROVIDER_ID: Final = _path_param("provider_id", "a connected provider's id")


def _inference(summary: str, body: Schema, success: Schema) -> Operation:
    return _op(
        summary,
        CONSUMER,
        {**_streamed("the answer, or its event stream", success), **_errors(_INFERENCE_ERRORS)},
        tag="consumer",
        body=body,
    )


def _admin(
    summary: str,
    success: dict[str, Any],
    *,
    body: Schema | None = None,
    parameters: list[Any] | None = None,
) -> Operation:
    responses = {**success, **_errors(_ADMIN_ERRORS)}
    return _op(summary, ADMIN, responses, tag="admin", body=body, parameters=parameters)


_MODELS_ERRORS: Final = _errors(_READ_ERRORS, EITHER_ERROR)
_MODEL_LISTS: Final = {"anyOf": [_ref("ModelList"), _ref("AnthropicModelList")]}
_A_MODEL: Final = {"anyOf": [_ref("Model"), _ref("AnthropicModel")]}

PATHS: Final[dict[str, dict[str, Operation]]] = {
    "/v1/chat/completions": {
        "post": _inference("OpenAI chat completions", CHAT_REQUEST, _ref("ChatCompletion"))
    },
    "/v1/completions": {
        "post": _inference("OpenAI text completions", COMPLETION_REQUEST, _ref("TextCompletion"))
    },
    "/v1/responses": {
        "post": _inference("OpenAI Responses (stateless)", RESPONSES_REQUEST, _ref("Response"))
    },
    "/v1/messages": {
        "post": _op(
            "Anthropic Messages; errors in Anthropic's shape, and SSE without [DONE]",
            CONSUMER,
            {
                **_streamed("the message, or its event stream", _ref("Message")),
                **_errors(_INFERENCE_ERRORS, ANTHROPIC_ERROR),
            },
            tag="consumer",
            body=MESSAGES_REQUEST,
        )
    },
    "/v1/messages/count_tokens": {
        "post": _op(
            "the daemon's own estimate of the prompt's tokens (not a tokenizer's count)",
            CONSUMER,
            {
                **_ok("the estimate", _ref("InputTokens")),
                **_errors((400, 401, 408, 413, 500), ANTHROPIC_ERROR),
            },
            tag="consumer",
            body=COUNT_TOKENS_REQUEST,
        )
    },
    "/v1/models": {
        "get": _op(
            "the models routable now",
            CONSUMER,
            {**_ok("the models", _MODEL_LISTS), **_MODELS_ERRORS},
            tag="consumer",
            parameters=[_ANTHROPIC_VERSION, *_ANTHROPIC_PAGING],
        )
    },
    "/v1/models/{model}": {
        "get": _op(
            "one routable model (its id may hold `/`)",
            CONSUMER,
            {**_ok("the model", _A_MODEL), **_MODELS_ERRORS},
            tag="consumer",
            parameters=[_path_param("model", "a model id"), _ANTHROPIC_VERSION],
        )
    },
    "/v1/usage": {
        "get": _op(
            "the calling key's own usage, from the ledger",
            CONSUMER,
            {**_ok("summaries per group", _ref("Usage")), **_errors((400, 401, 500))},
            tag="consumer",
            parameters=_USAGE_QUERY,
        )
    },
    "/health": {
        "get": _op("liveness", PUBLIC, _ok("the daemon runs", _ref("Status")), tag="public")
    },
    "/readyz": {
        "get": _op(
            "readiness: 503 while starting and once draining",
            PUBLIC,
            {**_ok("ready", _ref("Status")), **_errors((503,))},
            tag="public",
        )
    },
    "/openapi.json": {
        "get": _op(
            "this document",
            CONSUMER,
            {**_ok("the OpenAPI document", {"type": "object"}), **_errors((401,))},
            tag="consumer",
        )
    },
    "/v1/admin/keys": {
        "get": _admin(
            "consumer keys with their limits, never the secret", _ok("", _ref("KeyList"))
        ),
        "post": _admin(
            "issue a consumer key, with optional limits",
            _ok("the key and its secret, shown once", _ref("IssuedKey"), 201),
            body=NEW_KEY,
        ),
    },
    "/v1/admin/keys/{key_id}": {
        "get": _admin("one key", _ok("the key", _ref("Key")), parameters=[_KEY_ID]),
        "patch": _admin(
            "set the limits given (null clears one) and the name",
            _ok("the key as it is now", _ref("Key")),
            body=KEY_CHANGES,
            parameters=[_KEY_ID],
        ),
        "delete": _admin("revoke a key", _ok("revoked", _ref("Revoked")), parameters=[_KEY_ID]),
    },
    "/v1/admin/keys/{key_id}/rotate": {
        "post": _admin(
            "a new secret; the old one is refused from the next request",
            _ok("the new secret, shown once", _ref("RotatedKey")),
            parameters=[_KEY_ID],
        )
    },
    "/v1/admin/provider-tokens": {
        "get": _admin("provider tokens, never the secret", _ok("", _ref("TokenList"))),
        "post": _admin(
            "issue a provider token",
            _ok("the token, shown once", _ref("IssuedToken"), 201),
            body=NEW_TOKEN,
        ),
    },
    "/v1/admin/provider-tokens/{token_id}": {
        "delete": _admin(
            "revoke a provider token and disconnect the providers that used it",
            _ok("revoked", _ref("RevokedToken")),
            parameters=[_path_param("token_id", "a provider token's id (`pt_...`)")],
        )
    },
    "/v1/admin/providers": {
        "get": _admin(
            "connected providers: models, load, trust, breaker, speed", _ok("", _ref("Providers"))
        )
    },
    "/v1/admin/providers/{provider_id}/cooldowns": {
        "delete": _admin(
            "clear the provider's breaker strikes and cooldowns",
            _ok("how many cooldowns were cleared", _ref("Cleared")),
            parameters=[_PROVIDER_ID],
        )
    },
    "/v1/admin/providers/{provider_id}/drain": {
        "post": _admin(
            "no new requests for the provider", _ok("", _ref("Drain")), parameters=[_PROVIDER_ID]
        ),
        "delete": _admin("undrain it", _ok("", _ref("Drain")), parameters=[_PROVIDER_ID]),
    },
    "/v1/admin/hedging": {
        "get": _admin("hedge points, budget and counters", _ok("", _ref("Hedging")))
    },
    "/v1/admin/usage": {
        "get": _admin(
            "the usage ledger summarised",
            _ok("summaries per group", _ref("Usage")),
            parameters=[*_USAGE_QUERY, _query("key_id", "only this key")],
        )
    },
}

SECURITY_SCHEMES: Final = {
    "consumerBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "a consumer API key (`dk_...`), issued by POST /v1/admin/keys",
    },
    "consumerApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": "the same consumer key, as Anthropic's SDK sends it",
    },
    "adminBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "DINFER_ADMIN_KEY; without one set the admin API answers 403",
    },
}

_DESCRIPTION: Final = (
    "The coordinator of a decentralized LLM inference network: OpenAI- and Anthropic-shaped "
    "inference routes answered by provider machines, and the admin API. Providers connect "
    "over the WebSocket `/ws/provider` (not an HTTP operation; its contract is PROTOCOL.md). "
    "Every answer carries `X-Request-ID` (and `request-id` on Anthropic's routes)."
)


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "dinfer", "version": VERSION, "description": _DESCRIPTION},
        "paths": PATHS,
        "components": {"schemas": SCHEMAS, "securitySchemes": SECURITY_SCHEMES},
    }


DOCUMENT_BYTES: Final = msgspec.json.encode(document())
