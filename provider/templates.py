"""Where a model's chat template comes from: the sources of `--chat-template MODEL=PATH`.

PATH is one of:
- a `.gguf` file: the `tokenizer.chat_template` metadata (and `tokenizer.chat_template.tool_use`
  when present), read with the `gguf` package;
- a `.json` file: a `chat_template.json` or `tokenizer_config.json`;
- any other file: the template text itself (a `.jinja` file);
- a Hugging Face snapshot directory: the first of `chat_template.jinja`, `chat_template.json`
  and `tokenizer_config.json` that holds a template, the same precedence transformers uses.
  A `tool_use` template comes from the named-template list or from
  `additional_chat_templates/tool_use.jinja`.

A JSON `chat_template` is a string or a list of named templates
(`[{"name": "default", "template": ...}, {"name": "tool_use", ...}]`); `default` serves every
request shape and `tool_use`, when present, serves requests with tools, as in
`apply_chat_template`. Every failure to find a template is a `TemplateLoadError` whose message
names the path and what was wrong, so the node can log it and advertise no verdict.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from gguf import GGUFReader

__all__ = ["TemplateLoadError", "TemplateSet", "load_template"]

_SNAPSHOT_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
_EXTRA_TOOL_USE = Path("additional_chat_templates", "tool_use.jinja")
_GGUF_KEY = "tokenizer.chat_template"
_GGUF_TOOL_USE_KEY = "tokenizer.chat_template.tool_use"


class TemplateLoadError(Exception):
    """No usable chat template at a source; the message says which path and why."""


@dataclass(frozen=True)
class TemplateSet:
    """A model's chat templates: `default` for every shape, `tool_use` for requests with tools."""

    default: str
    tool_use: str | None = None
    origin: str = ""  # the file it came from, for log lines

    def for_tools(self) -> str:
        return self.default if self.tool_use is None else self.tool_use


class _NamedTemplate(msgspec.Struct):
    name: str
    template: str


class _ConfigFile(msgspec.Struct):
    """The one field we read from `tokenizer_config.json` or `chat_template.json`."""

    chat_template: str | list[_NamedTemplate] | None = None


_config_decoder = msgspec.json.Decoder(_ConfigFile)


def load_template(path: str | os.PathLike[str]) -> TemplateSet:
    """Read the chat template(s) at `path`; raise `TemplateLoadError` when there are none."""
    source = Path(path)
    if source.is_dir():
        return _from_snapshot(source)
    if not source.exists():
        raise TemplateLoadError(f"{source}: no such file or directory")
    if source.suffix.lower() == ".gguf":
        return _from_gguf(source)
    if source.suffix.lower() == ".json":
        return _required(_from_config(source), source)
    return TemplateSet(default=_nonempty(_read_text(source), source), origin=str(source))


def _from_snapshot(directory: Path) -> TemplateSet:
    for name in _SNAPSHOT_FILES:
        candidate = directory / name
        if not candidate.is_file():
            continue
        found = _from_config(candidate) if candidate.suffix == ".json" else _from_jinja(candidate)
        if found is not None:
            return _with_extra_tool_use(found, directory)
    looked_for = ", ".join(_SNAPSHOT_FILES)
    raise TemplateLoadError(f"{directory}: no chat template (looked for {looked_for})")


def _from_jinja(file: Path) -> TemplateSet | None:
    text = _read_text(file)
    return TemplateSet(default=text, origin=str(file)) if text.strip() else None


def _with_extra_tool_use(found: TemplateSet, directory: Path) -> TemplateSet:
    extra = directory / _EXTRA_TOOL_USE
    if found.tool_use is not None or not extra.is_file():
        return found
    return TemplateSet(found.default, _nonempty(_read_text(extra), extra), found.origin)


def _from_config(file: Path) -> TemplateSet | None:
    """The templates of a JSON config, or None when it has no `chat_template`."""
    try:
        config = _config_decoder.decode(_read_bytes(file))
    except msgspec.DecodeError as exc:  # ValidationError included: it names the bad field
        raise TemplateLoadError(f"{file}: unreadable chat template config: {exc}") from None
    templates = config.chat_template
    if isinstance(templates, list):
        return _from_named(templates, file)
    if templates is None or not templates.strip():
        return None
    return TemplateSet(default=templates, origin=str(file))


def _from_named(templates: list[_NamedTemplate], file: Path) -> TemplateSet:
    named = {entry.name: entry.template for entry in templates}
    if "default" not in named:
        raise TemplateLoadError(f"{file}: named chat templates without a 'default' one")
    return TemplateSet(named["default"], named.get("tool_use"), str(file))


def _from_gguf(file: Path) -> TemplateSet:
    try:
        import gguf
    except ImportError:
        raise TemplateLoadError(
            f"{file}: reading a .gguf chat template needs the gguf package "
            "(pip install 'dinfer[gguf]')"
        ) from None
    try:
        reader = gguf.GGUFReader(file)
        default = _gguf_string(reader, _GGUF_KEY)
        tool_use = _gguf_string(reader, _GGUF_TOOL_USE_KEY)
    # The gguf package reports a malformed file with whatever numpy or struct raised.
    except Exception as exc:
        raise TemplateLoadError(f"{file}: not a readable GGUF file ({exc})") from None
    if default is None or not default.strip():
        raise TemplateLoadError(f"{file}: GGUF metadata has no {_GGUF_KEY}")
    return TemplateSet(default, tool_use, str(file))


def _gguf_string(reader: GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def _required(found: TemplateSet | None, file: Path) -> TemplateSet:
    if found is None:
        raise TemplateLoadError(f"{file}: no chat_template in it")
    return found


def _nonempty(text: str, file: Path) -> str:
    if not text.strip():
        raise TemplateLoadError(f"{file}: the chat template is empty")
    return text


def _read_text(file: Path) -> str:
    try:
        return _read_bytes(file).decode("utf-8")
    except UnicodeDecodeError:
        raise TemplateLoadError(f"{file}: not UTF-8 text") from None


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise TemplateLoadError(f"{file}: {exc.strerror or exc}") from None
