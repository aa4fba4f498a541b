"""The chat-template self-check: render a model's template against canonical fixtures.

The provider node runs it at start and whenever its models change, and advertises the result in
`ModelInfo.template_render` (per request shape) and `template_render_ok` (all shapes), so the
daemon keeps requests away from a template that would crash on them (PROTOCOL.md §5, §7).

Rendering matches Hugging Face's `apply_chat_template(..., add_generation_prompt=True)`: a
`jinja2.sandbox.ImmutableSandboxedEnvironment` with `trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension, `{% generation %}` blocks, the `tojson` filter, the
`raise_exception` and `strftime_now` globals, and empty `bos_token`/`eos_token`. One deliberate
difference: the `upper` and `lower` filters refuse a non-string (jinja2's stringify it).
minijinja raises there and llama.cpp's minja raises on a list, and that is the incident's crash
class: a template that upper-cases a tool parameter's `type` breaks on a missing type or on the
list form `["string", "null"]`. The `tools` fixtures carry a tool as `protocol.toolschema` leaves it
after normalization, so such templates pass here exactly when they would pass in production.

Time bound: rendering is synchronous CPU work and a template can run away (the sandbox caps one
`range` at 100 000 items, but nested loops multiply). A thread cannot be stopped, so each shape
renders in its own short-lived child process (`python -I -c ...`). The bound times the render
alone: the child arms a wall-clock timer once its imports are done, so a slow start-up on a busy
machine (a backend loading its model beside the node) never turns a good template `false`. The
parent waits for the bound plus `_START_ALLOWANCE` and kills a child still running then (the
shape is `false` either way). The child also caps its own address space and CPU time, so a
memory bomb fails with a MemoryError and an orphaned child cannot outlive the bound for long.
Explicit `false` means the template demonstrably failed (it raised or ran past the bound); when
the check itself cannot run (no child process, no answer from it) the shape has no verdict
(None).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Final, Literal

import jinja2
import msgspec
import trio
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from protocol.messages import ModelInfo, TemplateRender
from provider.templates import TemplateLoadError, TemplateSet, load_template

__all__ = [
    "FIXTURES",
    "FIXTURE_TOOL",
    "RENDER_BOUND",
    "TemplateVerdict",
    "check_template",
    "fixture_error",
    "render_chat",
    "render_fixtures",
    "self_check",
    "self_check_loaded",
    "tool_fixtures",
    "with_verdict",
]

log = logging.getLogger(__name__)

Shape = Literal["base", "tools", "vision"]

# A shape's result: the verdict (None: the check could not run) and why it is not True.
_Outcome = tuple[bool | None, str | None]

RENDER_BOUND: Final = 5.0  # seconds of rendering per shape (the child's start-up not counted)
# How long a render child may take to start and answer beyond the bound before it is killed.
_START_ALLOWANCE: Final = 10.0
_MEMORY_CAP: Final = 1 << 30  # bytes of address space for a render child
_REASON_CHARS: Final = 300

# Fixtures ------------------------------------------------------------------------------------

# The tool of the `tools` fixtures, as `protocol.toolschema.normalize_tools` leaves it: every
# schema has a string `type`, and the nullable property says so with `nullable: true`.
FIXTURE_TOOL: Final[dict[str, Any]] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather forecast for a place.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "object",
                    "description": "Where to look.",
                    "properties": {
                        "city": {"type": "string", "description": "City name."},
                        "country": {
                            "type": "string",
                            "description": "ISO 3166 country code, when known.",
                            "nullable": True,
                        },
                    },
                    "required": ["city"],
                },
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {
                    "type": "array",
                    "description": "Forecast days, counted from today.",
                    "items": {"type": "integer"},
                },
            },
            "required": ["location", "unit"],
        },
    },
}

_SYSTEM: Final = {"role": "system", "content": "You are a helpful assistant."}
_QUESTION: Final = {"role": "user", "content": "What will the weather be in Paris?"}
_CALL: Final = {
    "id": "call_1",
    "type": "function",
    "function": {
        "name": "get_weather",
        "arguments": {"location": {"city": "Paris", "country": "FR"}, "unit": "celsius"},
    },
}
_RESULT: Final = {
    "role": "tool",
    "tool_call_id": "call_1",
    "name": "get_weather",
    "content": '{"temperature": 18, "sky": "clear"}',
}


def tool_fixtures(tool: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The `tools` fixtures declaring `tool`: declaration only, full flow, flow with nulls."""
    flow = [_SYSTEM, _QUESTION, {"role": "assistant", "content": "", "tool_calls": [_CALL]}]
    with_nulls = [_SYSTEM, _QUESTION, {"role": "assistant", "content": None, "tool_calls": [_CALL]}]
    return (
        {"messages": [_SYSTEM, _QUESTION], "tools": [tool]},
        {"messages": [*flow, _RESULT], "tools": [tool]},
        {"messages": [*with_nulls, _RESULT], "tools": [tool]},
    )


def _media_question(kind: str, url: str) -> dict[str, Any]:
    parts = [{"type": kind, kind: url}, {"type": "text", "text": f"Describe this {kind}."}]
    return {"role": "user", "content": parts}


FIXTURES: Final[Mapping[Shape, tuple[dict[str, Any], ...]]] = {
    "base": (
        {"messages": [_SYSTEM, _QUESTION]},
        {"messages": [_SYSTEM, _QUESTION, {"role": "assistant", "content": ""}]},
    ),
    "tools": tool_fixtures(FIXTURE_TOOL),
    "vision": (
        {"messages": [_SYSTEM, _media_question("image", "https://example.com/cat.png")]},
        {"messages": [_SYSTEM, _media_question("video", "https://example.com/cat.mp4")]},
    ),
}

# The Hugging Face-like environment -----------------------------------------------------------


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) as is."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _upper(value: Any) -> str:
    return _text(value, "upper").upper()


def _lower(value: Any) -> str:
    return _text(value, "lower").lower()


def _text(value: Any, filter_name: str) -> str:
    if isinstance(value, str):
        return value
    kind = "an undefined value" if isinstance(value, jinja2.Undefined) else type(value).__name__
    raise TypeError(f"the {filter_name} filter needs a string, got {kind}")


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters.update(tojson=_tojson, upper=_upper, lower=_lower)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


# Synchronous core ----------------------------------------------------------------------------


def render_chat(
    template: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None
) -> str:
    """Render like `apply_chat_template(messages, tools, add_generation_prompt=True)`; may raise."""
    return _render(_compiled(template), messages, tools)


@lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    # The node renders each uncounted prompt with its model's template (`provider.rendered`):
    # compiling takes milliseconds, rendering microseconds.
    return _environment().from_string(template)


def _render(
    compiled: jinja2.Template,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Any] | None = None,
) -> str:
    return compiled.render(
        messages=messages,
        tools=tools,
        documents=None,
        add_generation_prompt=True,
        bos_token="",
        eos_token="",
    )


def fixture_error(template: str, fixtures: Iterable[Mapping[str, Any]]) -> str | None:
    """Why `template` fails one of `fixtures` (`render_chat` arguments), or None if none."""
    try:
        compiled = _environment().from_string(template)
        for fixture in fixtures:
            _render(compiled, **fixture)
    # A template can raise anything (TemplateError, TypeError, RecursionError, MemoryError...):
    # whatever it is, it is the verdict.
    except Exception as exc:
        return _describe(exc)
    return None


def _describe(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:_REASON_CHARS]


@dataclass(frozen=True)
class TemplateVerdict:
    """Per-shape results (`render`) and why each failed or went unchecked (`reasons`)."""

    render: TemplateRender
    reasons: Mapping[Shape, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool | None:
        """`template_render_ok`: True when every checked shape rendered, None if none was."""
        checked = [ok for ok in msgspec.structs.astuple(self.render) if ok is not None]
        return all(checked) if checked else None


def render_fixtures(templates: TemplateSet | str, *, vision: bool) -> TemplateVerdict:
    """The verdict, rendered in this thread without a time bound (for tests and tools)."""
    chosen = _as_set(templates)
    outcomes: dict[Shape, _Outcome] = {}
    for shape in _shapes(vision):
        error = fixture_error(_template_for(chosen, shape), FIXTURES[shape])
        outcomes[shape] = (error is None, error)
    return _verdict(outcomes)


def _shapes(vision: bool) -> tuple[Shape, ...]:
    return ("base", "tools", "vision") if vision else ("base", "tools")


def _as_set(templates: TemplateSet | str) -> TemplateSet:
    return TemplateSet(default=templates) if isinstance(templates, str) else templates


def _template_for(templates: TemplateSet, shape: Shape) -> str:
    return templates.for_tools() if shape == "tools" else templates.default


def _verdict(outcomes: Mapping[Shape, _Outcome]) -> TemplateVerdict:
    render = TemplateRender(**{shape: ok for shape, (ok, _) in outcomes.items()})
    reasons = {shape: why for shape, (_, why) in outcomes.items() if why is not None}
    return TemplateVerdict(render, reasons)


# Bounded check in a child process ------------------------------------------------------------

_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parent.parent)
_WORKER_COMMAND: Final = (
    sys.executable,
    "-I",
    "-c",
    f"import sys; sys.path.append({_PACKAGE_ROOT!r}); "
    "from provider.selfcheck import _render_worker; _render_worker()",
)


async def check_template(
    templates: TemplateSet | str, *, vision: bool, render_bound: float = RENDER_BOUND
) -> TemplateVerdict:
    """The verdict, each shape rendered in a child process killed after `render_bound` s.

    Never raises, except `trio.Cancelled` when the caller cancels (the child is killed too).
    """
    chosen = _as_set(templates)
    outcomes: dict[Shape, _Outcome] = {}
    for shape in _shapes(vision):
        outcomes[shape] = await _check_shape(_template_for(chosen, shape), shape, render_bound)
    return _verdict(outcomes)


async def _check_shape(template: str, shape: Shape, bound: float) -> _Outcome:
    request = json.dumps({"template": template, "shape": shape, "bound": bound}).encode()
    with trio.move_on_after(bound + _START_ALLOWANCE):
        try:
            done = await trio.run_process(
                _WORKER_COMMAND,
                stdin=request,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                deliver_cancel=_kill,
            )
        except OSError as exc:
            return None, f"could not start a render process: {exc}"
        return _answer(done, bound)
    return False, _too_long(bound)


def _too_long(bound: float) -> str:
    return f"did not render within {bound:g} s"


async def _kill(process: trio.Process) -> None:
    process.kill()  # the child holds nothing worth a graceful exit


def _answer(done: subprocess.CompletedProcess[bytes], bound: float) -> _Outcome:
    try:
        answer = json.loads(done.stdout)
        if answer.get("timed_out"):
            return False, _too_long(bound)
        error = answer["error"]
    except (ValueError, KeyError, TypeError):
        stderr = done.stderr.decode(errors="replace").strip()[-_REASON_CHARS:]
        return None, f"render process exited with {done.returncode} and no answer: {stderr}"
    return (True, None) if error is None else (False, str(error))


def _render_worker() -> None:
    """The child's entry: render one shape's fixtures, print `{"error": null | reason}`."""
    request = json.load(sys.stdin)
    bound = float(request["bound"])
    # CPU time counts the start-up too (about 0.2 s of it): the wall-clock timer is the bound.
    _lower_limit(resource.RLIMIT_CPU, int(bound) + 2)
    _lower_limit(resource.RLIMIT_AS, _MEMORY_CAP)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.setitimer(signal.ITIMER_REAL, bound)
    try:
        error = fixture_error(request["template"], FIXTURES[request["shape"]])
    except _RenderTimedOut:
        json.dump({"timed_out": True}, sys.stdout)
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    json.dump({"error": error}, sys.stdout)


class _RenderTimedOut(BaseException):
    """Raised in the render child at its bound; a BaseException, so no `except Exception`
    on the way (fixture_error's verdict) mistakes it for the template's own error."""


def _out_of_time(signum: int, frame: object) -> None:
    raise _RenderTimedOut


def _lower_limit(kind: int, value: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


# For the node --------------------------------------------------------------------------------


def with_verdict(model: ModelInfo, verdict: TemplateVerdict | None) -> ModelInfo:
    """`model` advertising `verdict`; None (no template) clears both fields."""
    if verdict is None:
        return msgspec.structs.replace(model, template_render_ok=None, template_render=None)
    return msgspec.structs.replace(
        model, template_render_ok=verdict.ok, template_render=verdict.render
    )


async def self_check(model: ModelInfo, source: str | os.PathLike[str] | None) -> ModelInfo:
    """`model` with the verdict of the template at `source`; never raises but for Cancelled.

    No source, or no template found there (logged), gives no verdict.
    """
    checked, _ = await self_check_loaded(model, source)
    return checked


async def self_check_loaded(
    model: ModelInfo, source: str | os.PathLike[str] | None
) -> tuple[ModelInfo, TemplateSet | None]:
    """`self_check`, and the templates it loaded (the node keeps them for counting prompts)."""
    if source is None:
        return with_verdict(model, None), None
    try:
        templates = await trio.to_thread.run_sync(load_template, source)
    except TemplateLoadError as exc:
        log.warning("model %s: no chat-template verdict: %s", model.id, exc)
        return with_verdict(model, None), None
    verdict = await check_template(templates, vision=bool(model.is_vision))
    for shape, reason in verdict.reasons.items():
        log.warning("model %s: chat template fails the %s shape: %s", model.id, shape, reason)
    return with_verdict(model, verdict), templates
