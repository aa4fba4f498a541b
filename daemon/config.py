"""The daemon's settings: one frozen `Settings`, read from `DINFER_*` environment variables.

`load_settings(os.environ)` is the only reader of the environment; everything else takes the
`Settings` it returns. A bad value raises `ConfigError` naming the variable and what is wrong.
An unset or empty variable takes its default. Durations are seconds (positive decimals), counts
positive integers.

The variable names are a public contract. `ENV_VARS` below is their one table: it generates
the end of this docstring, `dinfer serve --help` (`describe_env()`) and the README's table
(`markdown_table()`; `python -m daemon.config` prints it). `unknown_variables` lists set
`DINFER_*` names that are not in it, typos most likely.
"""

from __future__ import annotations

import ipaddress
import math
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

HedgeMode = Literal["learned", "fixed", "off"]


class ConfigError(Exception):
    """A `DINFER_*` variable has a value the daemon cannot use."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    listen_host: str
    listen_port: int
    data_dir: Path
    admin_key: str | None
    provider_auth: str
    challenge_interval_s: float
    heartbeat_timeout_s: float
    breaker_threshold: int
    breaker_window_s: float
    breaker_cooldown_s: float
    queue_max: int
    queue_timeout_s: float
    tools_min_version: tuple[int, ...]
    max_attempts: int
    ttft_base_s: float
    ttft_per_token_ms: float
    speculative_ratio: float
    hedge_mode: HedgeMode
    hedge_percentile: float
    hedge_min_ms: float
    hedge_budget: float
    hedge_window_s: float
    preamble_timeout_s: float
    inference_timeout_s: float
    max_body_bytes: int
    register_timeout_s: float
    challenge_answer_s: float
    challenge_max_age_s: float
    log_level: str

    @property
    def listen(self) -> str:
        """The address as `host:port`, IPv6 hosts in brackets (what hypercorn's bind takes)."""
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


# Parsers: each takes the raw (stripped, non-empty) value, returns the parsed one or raises
# ValueError whose message completes "<NAME> must be ...".


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("a positive integer")
    return value


def _number(raw: str) -> float:
    """The float `raw` spells, or NaN (which every range check then refuses)."""
    try:
        return float(raw)
    except ValueError:
        return math.nan


def _positive_float(raw: str) -> float:
    value = _number(raw)
    if not (math.isfinite(value) and value > 0):
        raise ValueError("a positive number")
    return value


def _ratio(raw: str) -> float:
    value = _number(raw)
    if not 0 < value <= 1:
        raise ValueError("a number in (0, 1]")
    return value


def _percentile(raw: str) -> float:
    value = _number(raw)
    if not 50 <= value <= 99.5:
        raise ValueError("a percentile from 50 to 99.5")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in allowed:
            raise ValueError("one of " + ", ".join(allowed))
        return raw.lower()

    return parse


def _version(raw: str) -> tuple[int, ...]:
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", raw):
        raise ValueError("a dot-separated version of integers such as 0.6.3")
    return tuple(int(part) for part in raw.split("."))


def _listen(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ValueError("host:port, with IPv6 hosts in brackets as in [::1]:8000")
    if host.startswith("[") and host.endswith("]"):
        host = _ipv6(host[1:-1])
    elif ":" in host:
        raise ValueError("host:port, with IPv6 hosts in brackets as in [::1]:8000")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError("host:port with a port from 0 to 65535")
    return host, int(port)


def _ipv6(host: str) -> str:
    try:
        return str(ipaddress.IPv6Address(host))
    except ValueError:
        raise ValueError("host:port with a valid IPv6 address inside the brackets") from None


def _text(raw: str) -> str:
    return raw


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One `DINFER_*` variable: its name, default (as written) and meaning."""

    name: str
    default: str
    meaning: str
    parse: Callable[[str], Any]
    field: str


def _var(name: str, default: str, meaning: str, parse: Callable[[str], Any]) -> EnvVar:
    return EnvVar(name, default, meaning, parse, field=name.removeprefix("DINFER_").lower())


ENV_VARS: Final[tuple[EnvVar, ...]] = (
    _var(
        "DINFER_LISTEN",
        "127.0.0.1:8000",
        "HTTP and WebSocket address, host:port (IPv6 as [::1]:8000; port 0 picks a free port)",
        _listen,
    ),
    _var(
        "DINFER_DATA_DIR",
        ".dinfer",
        "directory of the SQLite store (relative to the working directory)",
        Path,
    ),
    _var("DINFER_ADMIN_KEY", "", "bearer key of the admin API; unset disables it", _text),
    _var(
        "DINFER_PROVIDER_AUTH",
        "token",
        "token: providers need an admin-issued token; open: anyone may register (development)",
        _choice("token", "open"),
    ),
    _var(
        "DINFER_CHALLENGE_INTERVAL_S",
        "300",
        "seconds between attestation challenges",
        _positive_float,
    ),
    _var(
        "DINFER_HEARTBEAT_TIMEOUT_S",
        "90",
        "silence after which a provider is dropped",
        _positive_float,
    ),
    _var(
        "DINFER_BREAKER_THRESHOLD",
        "2",
        "failures within the window that put (provider, model, shape) in cooldown",
        _positive_int,
    ),
    _var(
        "DINFER_BREAKER_WINDOW_S", "60", "window in which breaker failures count", _positive_float
    ),
    _var(
        "DINFER_BREAKER_COOLDOWN_S",
        "300",
        "how long a cooldown keeps a provider out",
        _positive_float,
    ),
    _var("DINFER_QUEUE_MAX", "10", "queued requests per model before 429", _positive_int),
    _var("DINFER_QUEUE_TIMEOUT_S", "120", "longest a request waits in the queue", _positive_float),
    _var(
        "DINFER_TOOLS_MIN_VERSION",
        "0.6.3",
        "lowest provider version routed tool requests",
        _version,
    ),
    _var("DINFER_MAX_ATTEMPTS", "3", "providers tried per request (failover)", _positive_int),
    _var("DINFER_TTFT_BASE_S", "5", "first-token deadline, fixed part", _positive_float),
    _var(
        "DINFER_TTFT_PER_TOKEN_MS",
        "1",
        "first-token deadline, added per prompt token",
        _positive_float,
    ),
    _var(
        "DINFER_SPECULATIVE_RATIO",
        "0.5",
        "fraction of the first-token deadline by which a backup provider starts at the latest"
        " (always at it with DINFER_HEDGE_MODE=fixed), in (0, 1]",
        _ratio,
    ),
    _var(
        "DINFER_HEDGE_MODE",
        "learned",
        "learned: a backup starts at the percentile of recent first-token times; fixed: at the"
        " speculative ratio of the deadline; off: never (failover at the deadline only)",
        _choice("learned", "fixed", "off"),
    ),
    _var(
        "DINFER_HEDGE_PERCENTILE",
        "95",
        "percentile of recent first-token times (per model and prompt size; the primary's own"
        " once it has enough, 20 at p95) after which a backup starts, 50 to 99.5",
        _percentile,
    ),
    _var(
        "DINFER_HEDGE_MIN_MS",
        "50",
        "earliest a backup starts, in milliseconds after its primary",
        _positive_float,
    ),
    _var(
        "DINFER_HEDGE_BUDGET",
        "0.05",
        "most backups per dispatch over the hedge window, in (0, 1]; 1 lifts the bound",
        _ratio,
    ),
    _var(
        "DINFER_HEDGE_WINDOW_S",
        "60",
        "sliding window of the hedge budget",
        _positive_float,
    ),
    _var(
        "DINFER_PREAMBLE_TIMEOUT_S",
        "90",
        "extra wait for content, once, when a provider sent only boilerplate by the deadline",
        _positive_float,
    ),
    _var(
        "DINFER_INFERENCE_TIMEOUT_S",
        "600",
        "wait for content after inference_accepted, and the longest silence after content",
        _positive_float,
    ),
    _var(
        "DINFER_MAX_BODY_BYTES", "16777216", "largest accepted request body (16 MiB)", _positive_int
    ),
    _var(
        "DINFER_REGISTER_TIMEOUT_S",
        "10",
        "time a new connection has to send register",
        _positive_float,
    ),
    _var(
        "DINFER_CHALLENGE_ANSWER_S",
        "30",
        "time a provider has to answer a challenge",
        _positive_float,
    ),
    _var(
        "DINFER_CHALLENGE_MAX_AGE_S",
        "960",
        "age after which a passed challenge is stale (not routable)",
        _positive_float,
    ),
    _var(
        "DINFER_LOG_LEVEL",
        "info",
        "debug, info, warning, error or critical",
        _choice("debug", "info", "warning", "error", "critical"),
    ),
)


def _parse(var: EnvVar, environ: Mapping[str, str]) -> Any:
    raw = environ.get(var.name, "").strip() or var.default
    try:
        return var.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{var.name} must be {exc}, got {raw!r}") from None


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build the settings from `environ` (normally `os.environ`); raise ConfigError if bad."""
    values = {var.field: _parse(var, environ) for var in ENV_VARS}
    values["listen_host"], values["listen_port"] = values.pop("listen")
    values["admin_key"] = values["admin_key"] or None
    return Settings(**values)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Set `DINFER_*` names that no setting reads: worth a warning, most are typos."""
    known = {var.name for var in ENV_VARS}
    return sorted(name for name in environ if name.startswith("DINFER_") and name not in known)


def describe_env() -> str:
    """The variables as an aligned `name  default  meaning` table, for help output."""
    width = max(len(var.name) for var in ENV_VARS)
    indent = " " * (width + 18)
    rows = []
    for var in ENV_VARS:
        lines = textwrap.wrap(var.meaning, 96 - len(indent)) or [""]
        rows.append(f"{var.name:<{width}}  {var.default or '(unset)':<14}  {lines[0]}")
        rows.extend(indent + line for line in lines[1:])
    return "\n".join(rows)


def markdown_table() -> str:
    """The variables as the README's Markdown table."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for var in ENV_VARS:
        default = f"`{var.default}`" if var.default else "unset"
        rows.append(f"| `{var.name}` | {default} | {var.meaning} |")
    return "\n".join(rows)


__doc__ = f"{__doc__}\n::\n\n" + textwrap.indent(describe_env(), "    ") + "\n"

if __name__ == "__main__":
    print(markdown_table())
