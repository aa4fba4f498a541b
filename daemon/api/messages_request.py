"""A consumer's `/v1/messages` body (Anthropic Messages), translated to a chat-completions body.

`parse_messages_request` validates the Anthropic fields, builds the chat body providers speak
(PROTOCOL.md §6) and hands it to `chat_request.parse_chat_request`, so routing traits, tool
schema repair, bounds and the sealed envelope are exactly the chat route's. A 400 names the
field by its dotted path, as Anthropic's own errors do (`messages.0.content.1.source`).

The mapping: `system` becomes a system message; text blocks join into a string (a parts list
only beside images, which become `image_url` parts with a data URL or the URL); `tool_use`
blocks become the assistant's `tool_calls`; each `tool_result` becomes a `tool` message (its
`is_error` stays visible in the text); `thinking` blocks in the history are dropped, as
Anthropic does. `tools`, `tool_choice` and `stop_sequences` map to their chat equivalents;
`temperature`, `top_p` and `top_k` pass through; `metadata` is ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import msgspec

from daemon.api.body import MAX_TOKENS_LIMIT, bad_request, decode_object, echo
from daemon.api.chat_request import parse_chat_request
from daemon.api.errors import ApiError
from daemon.api.handler import Parsed

_encoder: Final = msgspec.json.Encoder(decimal_format="number")

# Anthropic's documented ranges, narrower than chat's (temperature there goes up to 2).
_UNIT_RANGE: Final = ("temperature", "top_p")
_TEXT_JOIN: Final = "\n"
_BLOCKS_BY_ROLE: Final = {
    "user": frozenset({"text", "image", "tool_result", "thinking", "redacted_thinking"}),
    "assistant": frozenset({"text", "tool_use", "thinking", "redacted_thinking"}),
}
_DROPPED: Final = frozenset({"thinking", "redacted_thinking"})
_TOOL_CHOICES: Final = {"auto": "auto", "any": "required", "none": "none"}


@dataclass(frozen=True, slots=True)
class MessagesOptions:
    """What the Messages codec needs to answer."""

    model: str
    stream: bool
    stop_sequences: tuple[str, ...]
    # The daemon's estimate, for `message_start` (the provider's count comes at the end).
    input_tokens: int


def parse_messages_request(raw: bytes) -> Parsed:
    body = decode_object(raw)
    parsed = parse_chat_request(_encoder.encode(chat_body(body, max_tokens_required=True)))
    options = MessagesOptions(
        model=body["model"],
        stream=body.get("stream") is True,
        stop_sequences=tuple(body.get("stop_sequences") or ()),
        input_tokens=parsed.traits.prompt_tokens,
    )
    return dataclasses.replace(parsed, options=options)


def count_input_tokens(raw: bytes) -> int:
    """`/v1/messages/count_tokens`: the prompt estimate routing uses, not a tokenizer's count."""
    body = decode_object(raw)
    parsed = parse_chat_request(_encoder.encode(chat_body(body, max_tokens_required=False)))
    return parsed.traits.prompt_tokens


def chat_body(body: dict[str, Any], *, max_tokens_required: bool) -> dict[str, Any]:
    """The chat-completions body that asks what `body` asks."""
    model = _string(body, "model", "model")
    chat: dict[str, Any] = {"model": model, "messages": [*_system(body), *_messages(body)]}
    max_tokens = _max_tokens(body, max_tokens_required)
    if max_tokens is not None:
        chat["max_tokens"] = max_tokens
    if _flag(body, "stream", "stream"):
        chat["stream"] = True
    chat.update(_sampling(body))
    chat.update(_stop(body))
    chat.update(_tools(body))
    return chat


# The top level ------------------------------------------------------------------------------


def _max_tokens(body: dict[str, Any], required: bool) -> int | None:
    value = body.get("max_tokens")
    if value is None:
        if required:
            raise _bad("max_tokens", "is required")
        return None
    if not _is_int(value) or value < 1:
        raise _bad("max_tokens", "must be a positive integer")
    if value > MAX_TOKENS_LIMIT:
        raise _bad("max_tokens", f"must be at most {MAX_TOKENS_LIMIT}")
    return int(value)


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    chosen = {}
    for name in _UNIT_RANGE:
        value = body.get(name)
        if value is not None and (not _is_number(value) or not 0 <= value <= 1):
            raise _bad(name, "must be a number between 0 and 1")
        if value is not None:
            chosen[name] = value
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise _bad("top_k", "must be a non-negative integer")
    return chosen if top_k is None else {**chosen, "top_k": top_k}


def _stop(body: dict[str, Any]) -> dict[str, Any]:
    stops = body.get("stop_sequences")
    if stops is None:
        return {}
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop_sequences", "must be an array of non-empty strings")
    return {"stop": stops} if stops else {}


def _system(body: dict[str, Any]) -> list[dict[str, Any]]:
    system = body.get("system")
    if system is None:
        return []
    if isinstance(system, str):
        text = system
    elif isinstance(system, list):
        text = _TEXT_JOIN.join(_text_of(block, f"system.{i}") for i, block in enumerate(system))
    else:
        raise _bad("system", "must be a string or an array of text blocks")
    return [{"role": "system", "content": text}] if text else []


# Tools --------------------------------------------------------------------------------------


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    tools = body.get("tools")
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise _bad("tools", "must be an array")
    mapped: dict[str, Any] = {"tools": [_tool(t, f"tools.{i}") for i, t in enumerate(tools)]}
    return {**mapped, **_tool_choice(body.get("tool_choice"))} if tools else {}


def _tool(tool: Any, path: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise _bad(path, "must be an object")
    if tool.get("type") not in (None, "custom"):
        raise _bad(f"{path}.type", f"{echo(tool['type'])} is not supported: only custom tools are")
    function: dict[str, Any] = {"name": _string(tool, "name", f"{path}.name")}
    if tool.get("description") is not None:
        function["description"] = _string(tool, "description", f"{path}.description")
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        raise _bad(f"{path}.input_schema", "must be a JSON Schema object")
    return {"type": "function", "function": {**function, "parameters": schema}}


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice is None:
        return {}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        name = _string(choice, "name", "tool_choice.name")
        mapped: Any = {"type": "function", "function": {"name": name}}
    elif isinstance(kind, str) and kind in _TOOL_CHOICES:
        mapped = _TOOL_CHOICES[kind]
    else:
        raise _bad("tool_choice", "must be an object whose type is auto, any, tool or none")
    serial = choice.get("disable_parallel_tool_use") is True
    return {"tool_choice": mapped, **({"parallel_tool_calls": False} if serial else {})}


# Messages -----------------------------------------------------------------------------------


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" not in body:
        raise _bad("messages", "is required")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty array")
    names: dict[str, str] = {}  # tool_use id -> tool name, for the tool messages that answer
    chat: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        chat.extend(_message(message, f"messages.{i}", names))
    return chat


def _message(message: Any, path: str, names: dict[str, str]) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise _bad(path, "must be an object")
    role = message.get("role")
    if not isinstance(role, str) or role not in _BLOCKS_BY_ROLE:
        raise _bad(f"{path}.role", "must be 'user' or 'assistant'")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{path}.content", "must be a string or an array of content blocks")
    blocks = [_block(block, f"{path}.content.{i}", role) for i, block in enumerate(content)]
    if role == "assistant":
        return [_assistant(blocks, names)]
    return _user(blocks, names)


Blocks = list[tuple[str, dict[str, Any]]]  # (path, block), the path for error messages


def _block(block: Any, path: str, role: str) -> tuple[str, dict[str, Any]]:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise _bad(path, "must be a content block object with a 'type'")
    if kind not in _BLOCKS_BY_ROLE[role]:
        raise _bad(f"{path}.type", f"{echo(kind)} blocks are not supported in {role} messages")
    return path, block


def _of(blocks: Blocks, *kinds: str) -> Blocks:
    return [(path, block) for path, block in blocks if block["type"] in kinds]


def _assistant(blocks: Blocks, names: dict[str, str]) -> dict[str, Any]:
    texts = [_text_of(block, path) for path, block in _of(blocks, "text")]
    calls = [_tool_call(block, path, names) for path, block in _of(blocks, "tool_use")]
    # "" rather than null beside tool calls: some chat templates concatenate the content.
    message: dict[str, Any] = {"role": "assistant", "content": _TEXT_JOIN.join(texts)}
    return {**message, "tool_calls": calls} if calls else message


def _tool_call(block: dict[str, Any], path: str, names: dict[str, str]) -> dict[str, Any]:
    call_id = _string(block, "id", f"{path}.id")
    name = _string(block, "name", f"{path}.name")
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise _bad(f"{path}.input", "must be an object")
    names[call_id] = name
    encoded = _encoder.encode(arguments).decode()
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": encoded}}


def _user(blocks: Blocks, names: dict[str, str]) -> list[dict[str, Any]]:
    # Tool results answer the previous assistant turn, so they come first (Anthropic requires
    # the same of the blocks); what the user added goes in a user message after them.
    results = [_tool_message(block, path, names) for path, block in _of(blocks, "tool_result")]
    parts = [_part(block, path) for path, block in _of(blocks, "text", "image")]
    if not parts and len(results) + len(_of(blocks, *_DROPPED)) > 0:
        return results
    if all(part["type"] == "text" for part in parts):
        text = _TEXT_JOIN.join(part["text"] for part in parts)
        return [*results, {"role": "user", "content": text}]
    return [*results, {"role": "user", "content": parts}]


def _tool_message(block: dict[str, Any], path: str, names: dict[str, str]) -> dict[str, Any]:
    call_id = _string(block, "tool_use_id", f"{path}.tool_use_id")
    text = _tool_result_text(block.get("content"), f"{path}.content")
    if _flag(block, "is_error", f"{path}.is_error"):
        text = f"Error: {text}" if text else "Error"
    message = {"role": "tool", "tool_call_id": call_id, "content": text}
    return {**message, "name": names[call_id]} if call_id in names else message


def _tool_result_text(content: Any, path: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(path, "must be a string or an array of text blocks")
    return _TEXT_JOIN.join(_text_of(block, f"{path}.{i}") for i, block in enumerate(content))


def _part(block: dict[str, Any], path: str) -> dict[str, Any]:
    if block["type"] == "text":
        return {"type": "text", "text": _text_of(block, path)}
    return {"type": "image_url", "image_url": {"url": _image_url(block.get("source"), path)}}


def _image_url(source: Any, path: str) -> str:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type = _string(source, "media_type", f"{path}.source.media_type")
        data = _string(source, "data", f"{path}.source.data")
        return f"data:{media_type};base64,{data}"
    if kind == "url":
        return _string(source, "url", f"{path}.source.url")
    raise _bad(f"{path}.source", "must be an object whose type is 'base64' or 'url'")


def _text_of(block: Any, path: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text":
        raise _bad(path, "must be a text block")
    text = block.get("text")
    if not isinstance(text, str):
        raise _bad(f"{path}.text", "must be a string")
    return text


# Values -------------------------------------------------------------------------------------


def _string(container: dict[str, Any], name: str, path: str) -> str:
    value = container.get(name)
    if value is None:
        raise _bad(path, "is required")
    if not isinstance(value, str) or not value:
        raise _bad(path, "must be a non-empty string")
    return value


def _flag(container: dict[str, Any], name: str, path: str) -> bool:
    value = container.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(path, "must be a boolean")
    return value is True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


def _bad(path: str, problem: str) -> ApiError:
    return bad_request(f"'{path}' {problem}", path)
