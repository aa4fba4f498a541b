"""The prompt as the model's chat template renders it, for counting its tokens.

A chat request's tokens include its template's: the turn markers and the generation prompt.
"Say hi." is 4 tokens for Gemma 3 as text and 12 as the server renders it. Neither
llama-cpp-python nor llama-server counts messages through their template in one call, so when
the operator gave the model's template (`--chat-template`, the one `provider.selfcheck`
checks) the node renders the request with it, as the self-check renders its fixtures, and the
backend's tokenizer counts that. Without a template, or when it raises, the text is counted.

Rendering is CPU work, done in a worker thread. A thread cannot be stopped (the self-check
renders in child processes for that reason), so only a request small enough to render in
microseconds is rendered (MAX_RENDERED_BYTES, MAX_RENDERED_MESSAGES); a larger one is counted
as its text, and a render past the caller's deadline is abandoned, its work bounded by those
sizes.
"""

from __future__ import annotations

from typing import Any, Final

import trio

from provider.repair import PreparedRequest
from provider.selfcheck import render_chat
from provider.templates import TemplateSet

# A request body past this (tools, images, long history) is counted as its text.
MAX_RENDERED_BYTES: Final = 256 * 1024
MAX_RENDERED_MESSAGES: Final = 256


async def prompt_to_count(prepared: PreparedRequest, templates: TemplateSet | None) -> str:
    """The text whose tokens are the prompt's: rendered by `templates` when it can be."""
    chat = _small_chat(prepared) if templates is not None else None
    if templates is None or chat is None:
        return prepared.prompt_text()
    messages, tools = chat
    template = templates.default if tools is None else templates.for_tools()
    try:
        return await trio.to_thread.run_sync(
            render_chat, template, messages, tools, abandon_on_cancel=True
        )
    # A template can raise anything on a request it was not written for: then the text.
    except Exception:
        return prepared.prompt_text()


def _small_chat(prepared: PreparedRequest) -> tuple[list[Any], list[Any] | None] | None:
    if len(prepared.body) > MAX_RENDERED_BYTES:
        return None
    chat = prepared.chat()
    if chat is None or len(chat[0]) > MAX_RENDERED_MESSAGES:
        return None
    return chat
