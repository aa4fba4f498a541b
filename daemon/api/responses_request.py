"""A consumer's `/v1/responses` body, translated to the chat-completions body providers get.

`parse_responses_request` checks what only the Responses API has (`input` items, flat function
tools, `tool_choice`, `text.format`, `max_output_tokens`, and the server-side state the daemon
cannot offer), builds the equivalent chat-completions body and hands it to
`chat_request.parse_chat_request`: the tool-schema repair, the routing traits (tools, media
parts, token estimates, context) and the bounds of the shared fields are the chat route's own.
A 400 names the Responses field a consumer sent (`input[2].type`), never a chat one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

import msgspec

from daemon.api.body import MAX_TOKENS_LIMIT, bad_request, decode_object, echo
from daemon.api.chat_request import parse_chat_request
from daemon.api.errors import ApiError
from daemon.api.handler import Parsed

ROLES: Final = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TOOL_CHOICES: Final = frozenset({"auto", "none", "required"})
# Sampling fields copied as they are. Only `temperature` and `top_p` are the Responses API's;
# the rest are the chat extensions OpenAI-compatible backends accept, checked by the chat
# route's own ranges.
PASSTHROUGH: Final = (
    "temperature",
    "top_p",
    "stop",
    "seed",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
)
# Fields that refer to state a stateful server keeps between requests; this daemon keeps none.
STATEFUL: Final = ("previous_response_id", "conversation")

_encoder: Final = msgspec.json.Encoder(decimal_format="number")


@dataclass(frozen=True, slots=True)
class ResponsesOptions:
    """What the Responses codec needs to answer: how, under which model name, and the
    request's settings that every `response` object repeats."""

    model: str
    stream: bool
    echo: dict[str, Any]


def parse_responses_request(raw: bytes) -> Parsed:
    body = decode_object(raw)
    _refuse_state(body)
    stream = _stream(body)
    chat = chat_body(body)
    parsed = parse_chat_request(_encoder.encode(chat))
    return replace(parsed, options=ResponsesOptions(chat["model"], stream, _echo(body)))


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body that asks a provider for the same answer."""
    chat = {name: body[name] for name in ("model", *PASSTHROUGH) if body.get(name) is not None}
    chat["messages"] = [*_instructions(body.get("instructions")), *_input(body)]
    tools, tool_options = _tools(body.get("tools")), _tool_options(body)
    # OpenAI's chat API refuses `tool_choice` and `parallel_tool_calls` without tools.
    if tools:
        chat.update(tools=tools, **tool_options)
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    max_tokens = _max_output_tokens(body.get("max_output_tokens"))
    if max_tokens is not None:
        chat["max_tokens"] = max_tokens
    return chat


def _refuse_state(body: dict[str, Any]) -> None:
    for name in STATEFUL:
        if body.get(name) is not None:
            raise bad_request(
                f"'{name}' is not supported: this server keeps no conversation state; "
                "send the whole conversation in 'input'",
                name,
            )
    if body.get("background") is True:
        raise bad_request(
            "'background' is not supported: this server keeps no responses to retrieve later",
            "background",
        )


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    return stream is True


# Input ---------------------------------------------------------------------------------------


def _instructions(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, str):
        raise bad_request("'instructions' must be a string", "instructions")
    return [{"role": "system", "content": value}] if value else []


def _input(body: dict[str, Any]) -> list[dict[str, Any]]:
    if "input" not in body:
        raise bad_request("missing required field 'input'", "input")
    value = body["input"]
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty array of items", "input")
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        _add_item(messages, item, f"input[{index}]")
    if not messages:
        raise bad_request("'input' holds nothing to answer, only reasoning items", "input")
    return messages


def _add_item(messages: list[dict[str, Any]], item: Any, where: str) -> None:
    match _item_type(item, where):
        case "message":
            messages.append(_message(item, where))
        case "function_call":
            _add_tool_call(messages, _tool_call(item, where))
        case "function_call_output":
            messages.append(_tool_result(item, where))
        case "reasoning":
            pass  # a model's earlier thinking is not replayed: chat templates drop it too
        case other:
            raise bad_request(
                f"'{where}' is a {echo(other)} item; only message, function_call, "
                "function_call_output and reasoning items are supported",
                f"{where}.type",
            )


def _item_type(item: Any, where: str) -> str:
    if not isinstance(item, dict):
        raise bad_request(f"'{where}' must be an object", where)
    kind = item.get("type", "message" if "role" in item else None)
    if not isinstance(kind, str):
        raise bad_request(f"'{where}.type' must be a string", f"{where}.type")
    return kind


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise bad_request(
            f"'{where}.role' must be one of user, assistant, system, developer", f"{where}.role"
        )
    return {"role": ROLES[role], "content": _content(item.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A string stays one; parts become chat parts, joined into one string when all are text
    (the form every chat template understands)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or an array of parts", where)
    parts = [_part(part, f"{where}[{index}]") for index, part in enumerate(content)]
    if all(part["type"] == "text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    return parts


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    match kind:
        case "input_text" | "output_text":
            return {"type": "text", "text": _string(part, "text", where, empty_ok=True)}
        case "refusal":
            return {"type": "text", "text": _string(part, "refusal", where)}
        case "input_image":
            return _image(part, where)
        case _:
            raise bad_request(
                f"'{where}.type' must be input_text, output_text, refusal or input_image",
                f"{where}.type",
            )


def _image(part: dict[str, Any], where: str) -> dict[str, Any]:
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        raise bad_request(
            f"'{where}.image_url' must be an image URL or a data URL (file ids are not supported)",
            f"{where}.image_url",
        )
    image = {"url": url}
    if isinstance(part.get("detail"), str):
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _tool_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    arguments = item.get("arguments", "")
    if not isinstance(arguments, str):
        raise bad_request(f"'{where}.arguments' must be a string", f"{where}.arguments")
    return {
        "id": _string(item, "call_id", where),
        "type": "function",
        "function": {"name": _string(item, "name", where), "arguments": arguments},
    }


def _add_tool_call(messages: list[dict[str, Any]], call: dict[str, Any]) -> None:
    """Calls right after an assistant message (or after each other) are that one turn."""
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        # An empty string, not null: some chat templates print a null content as "None".
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})


def _tool_result(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = _string(item, "call_id", where)
    output = item.get("output")
    if isinstance(output, list):
        content = _content(output, f"{where}.output")
        if not isinstance(content, str):
            raise bad_request(f"'{where}.output' may hold only text parts", f"{where}.output")
        output = content
    if not isinstance(output, str):
        raise bad_request(f"'{where}.output' must be a string", f"{where}.output")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _string(item: dict[str, Any], name: str, where: str, *, empty_ok: bool = False) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not (value or empty_ok):
        raise bad_request(f"'{where}.{name}' must be a non-empty string", f"{where}.{name}")
    return value


# Tools and output settings ------------------------------------------------------------------


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request("'tools' must be an array", "tools")
    return [_tool(entry, f"tools[{index}]") for index, entry in enumerate(value)]


def _tool(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise bad_request(f"'{where}' must be an object", where)
    kind = entry.get("type")
    if kind != "function":
        raise ApiError(
            400,
            "unsupported_tool",
            f"'{where}' is the hosted tool {echo(kind)}: this server runs no tools itself, "
            "only function tools (declared here, run by the caller) are supported",
            param=f"{where}.type",
        )
    function = {"name": _string(entry, "name", where)}
    for name in ("description", "parameters", "strict"):
        if entry.get(name) is not None:
            function[name] = entry[name]
    return {"type": "function", "function": function}


def _tool_options(body: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    choice = body.get("tool_choice")
    if choice is not None:
        options["tool_choice"] = _tool_choice(choice)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise bad_request("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
        options["parallel_tool_calls"] = parallel
    return options


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str) and choice in TOOL_CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "function": {"name": name}}
    raise bad_request(
        "'tool_choice' must be 'auto', 'none', 'required' or "
        '{"type": "function", "name": NAME}',
        "tool_choice",
    )


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_request("'text' must be an object", "text")
    format_ = text.get("format")
    if format_ is None:
        return None
    if not isinstance(format_, dict):
        raise bad_request("'text.format' must be an object", "text.format")
    match format_.get("type"):
        case "text":
            return None
        case "json_object":
            return {"type": "json_object"}
        case "json_schema":
            return {"type": "json_schema", "json_schema": _json_schema(format_)}
        case _:
            raise bad_request(
                "'text.format.type' must be text, json_object or json_schema", "text.format.type"
            )


def _json_schema(format_: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(format_.get("schema"), dict):
        raise bad_request("'text.format.schema' must be a JSON schema object", "text.format.schema")
    schema = {"name": _string(format_, "name", "text.format"), "schema": format_["schema"]}
    for name in ("description", "strict"):
        if format_.get(name) is not None:
            schema[name] = format_[name]
    return schema


def _max_output_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad_request("'max_output_tokens' must be a positive integer", "max_output_tokens")
    if value > MAX_TOKENS_LIMIT:
        raise bad_request(
            f"'max_output_tokens' must be at most {MAX_TOKENS_LIMIT}", "max_output_tokens"
        )
    return value


def _echo(body: dict[str, Any]) -> dict[str, Any]:
    """The request's settings as a `response` object states them."""
    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "temperature": body.get("temperature"),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p"),
    }
