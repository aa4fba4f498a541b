"""The provider node's options: command-line flags, `DINFER_PROVIDER_*` variables, validation.

Every flag has an environment variable named after it (`--max-concurrency` is
`DINFER_PROVIDER_MAX_CONCURRENCY`); a flag given on the command line wins over the variable,
which wins over the default. List variables (`DINFER_PROVIDER_VISION`,
`DINFER_PROVIDER_CHAT_TEMPLATE`, `DINFER_PROVIDER_CONTEXT_LENGTH`) are space- or
comma-separated.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Final, TypeVar

from protocol.messages import MAX_CONCURRENCY

ENV_PREFIX: Final = "DINFER_PROVIDER_"
DEFAULT_BACKEND: Final = "http://127.0.0.1:8080"
DEFAULT_STATE_DIR: Final = Path("~/.dinfer/provider")
DEFAULT_DRAIN_GRACE: Final = 30.0
# The longest silence tolerated between two bytes of a backend answer: prefill of a long prompt
# sends nothing until the first token, so this is generous.
DEFAULT_BACKEND_TIMEOUT: Final = 300.0
_LIST_SEPARATORS: Final = re.compile(r"[,\s]+")
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")

T = TypeVar("T")


class ConfigError(Exception):
    """An option that cannot be used; the message names the flag and its variable."""


@dataclass(frozen=True)
class ProviderConfig:
    coordinator: str
    backend: str
    token: str | None = None
    # None: chosen from the backend kind once it is known (see provider.models).
    max_concurrency: int | None = None
    vision: frozenset[str] = frozenset()
    chat_templates: tuple[tuple[str, Path], ...] = ()
    # Tokens of context per model, for servers that do not report it (llama-cpp-python).
    context_lengths: tuple[tuple[str, int], ...] = ()
    state_dir: Path = field(default_factory=DEFAULT_STATE_DIR.expanduser)
    backend_name: str | None = None
    drain_grace: float = DEFAULT_DRAIN_GRACE
    backend_timeout: float = DEFAULT_BACKEND_TIMEOUT
    log_level: str = "info"

    def __repr__(self) -> str:
        # The token is a credential: never let a log line or traceback print it.
        token = "<set>" if self.token else None
        return f"ProviderConfig(coordinator={self.coordinator!r}, token={token}, ...)"


def node_version() -> str:
    """The installed `dinfer` version, sent in `register` (tool routing has version floors)."""
    try:
        return version("dinfer")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dinfer provider` flags; every default is None so the environment can fill it."""
    add = parser.add_argument
    add("--coordinator", metavar="URL", help="daemon WebSocket URL, ws://HOST:PORT/ws/provider")
    add("--backend", metavar="URL", help=f"OpenAI-compatible model server ({DEFAULT_BACKEND})")
    add("--token", metavar="T", help="daemon-issued token (prefer the variable: ps shows flags)")
    add(
        "--max-concurrency",
        metavar="N",
        help="requests served at once (default 1 for llama-cpp-python and Ollama, else 4)",
    )
    add("--vision", metavar="MODEL", nargs="+", action="extend", help="models that take images")
    add(
        "--chat-template",
        metavar="MODEL=PATH",
        nargs="+",
        action="extend",
        help="a model's Jinja chat template, checked at start",
    )
    add(
        "--context-length",
        metavar="MODEL=TOKENS",
        nargs="+",
        action="extend",
        help="a model's context size as the server runs it (llama-cpp-python: its --n_ctx)",
    )
    add("--state-dir", metavar="DIR", help=f"where the keys live ({DEFAULT_STATE_DIR})")
    add("--backend-name", metavar="NAME", help="backend advertised to the daemon (guessed)")
    add("--drain-grace", metavar="SECONDS", help="on SIGTERM, time allowed to finish requests")
    add("--backend-timeout", metavar="SECONDS", help="longest backend silence before 504")
    add("--log-level", metavar="LEVEL", help="debug, info, warning or error")


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> ProviderConfig:
    """Merge parsed flags with the environment; raise ConfigError naming a bad option."""
    options = _Options(args, env)
    coordinator = options.text("coordinator")
    if coordinator is None:
        raise ConfigError(f"--coordinator (or {ENV_PREFIX}COORDINATOR) is required")
    return ProviderConfig(
        coordinator=_url(coordinator, ("ws://", "wss://"), "--coordinator"),
        backend=_backend_base(options.text("backend") or DEFAULT_BACKEND),
        token=options.text("token"),
        max_concurrency=_concurrency(options.integer("max_concurrency", minimum=1)),
        vision=frozenset(options.items("vision")),
        chat_templates=tuple(_template_entry(item) for item in options.items("chat_template")),
        context_lengths=tuple(_context_entry(item) for item in options.items("context_length")),
        state_dir=Path(options.text("state_dir") or DEFAULT_STATE_DIR).expanduser(),
        backend_name=options.text("backend_name"),
        drain_grace=_or(options.seconds("drain_grace", minimum=0), DEFAULT_DRAIN_GRACE),
        backend_timeout=_or(options.seconds("backend_timeout", minimum=1), DEFAULT_BACKEND_TIMEOUT),
        log_level=_log_level(options.text("log_level") or "info"),
    )


class _Options:
    """Looks each option up on the command line first, then in the environment."""

    def __init__(self, args: argparse.Namespace, env: Mapping[str, str]) -> None:
        self._args = args
        self._env = env

    def text(self, name: str) -> str | None:
        value = getattr(self._args, name, None)
        if value is None:
            value = self._env.get(ENV_PREFIX + name.upper())
        return value or None

    def items(self, name: str) -> list[str]:
        values: list[str] | None = getattr(self._args, name, None)
        if values is None:
            values = [self._env.get(ENV_PREFIX + name.upper(), "")]
        return [item for value in values for item in _LIST_SEPARATORS.split(value) if item]

    def integer(self, name: str, *, minimum: int) -> int | None:
        value = self._number(name, int)
        return None if value is None else int(self._at_least(name, value, minimum))

    def seconds(self, name: str, *, minimum: float) -> float | None:
        value = self._number(name, float)
        return None if value is None else self._at_least(name, value, minimum)

    def _number(self, name: str, kind: Callable[[str], float]) -> float | None:
        text = self.text(name)
        if text is None:
            return None
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{_flag(name)}: {text!r} is not a number") from None

    @staticmethod
    def _at_least(name: str, value: float, minimum: float) -> float:
        if value < minimum:
            raise ConfigError(f"{_flag(name)}: must be at least {minimum}, got {value}")
        return value


def _or(value: T | None, default: T) -> T:
    # Not `value or default`: a drain grace of 0 is a real choice.
    return default if value is None else value


def _concurrency(value: int | None) -> int | None:
    """A daemon refuses a register above MAX_CONCURRENCY slots: say so at start-up instead."""
    if value is not None and value > MAX_CONCURRENCY:
        raise ConfigError(f"--max-concurrency must be at most {MAX_CONCURRENCY}, got {value}")
    return value


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')} ({ENV_PREFIX}{name.upper()})"


def _url(value: str, schemes: tuple[str, ...], flag: str) -> str:
    if not value.startswith(schemes):
        raise ConfigError(f"{flag}: {value!r} must start with {' or '.join(schemes)}")
    return value


def _backend_base(value: str) -> str:
    """The server root: users often paste the `/v1` base URL their other tools want."""
    base = _url(value, ("http://", "https://"), "--backend").rstrip("/")
    return base.removesuffix("/v1")


def _template_entry(item: str) -> tuple[str, Path]:
    model, sep, path = item.partition("=")
    if not sep or not model or not path:
        raise ConfigError(f"--chat-template: {item!r} is not MODEL=PATH")
    return model, Path(path).expanduser()


def _context_entry(item: str) -> tuple[str, int]:
    model, _, tokens = item.partition("=")
    if not model or not tokens.isdecimal() or int(tokens) < 1:
        raise ConfigError(f"--context-length: {item!r} is not MODEL=TOKENS (a positive number)")
    return model, int(tokens)


def _log_level(value: str) -> str:
    if value.lower() not in _LOG_LEVELS:
        raise ConfigError(f"--log-level: {value!r} is not one of {', '.join(_LOG_LEVELS)}")
    return value.lower()
