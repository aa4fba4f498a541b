"""The daemon's settings: one frozen `Settings`, from `DINFER_*` variables over a TOML file.

`load_settings(os.environ, path)` is the only reader of the environment and of the config
file; everything else takes the `Settings` it returns. Each setting comes from its variable
when that is set and non-empty, else from the file (`[table] key`, see `ENV_VARS`), else its
default. A bad value raises `ConfigError` naming the variable or the file's key and what is
wrong. Durations are seconds (positive decimals), counts positive integers.

The variable names and file keys are a public contract. `ENV_VARS` below is their one table:
it generates the end of this docstring, `dinfer serve --help` (`describe_env()`), the file's
key of each setting and the README's table (`markdown_table()`; `python -m daemon.config`
prints it). `unknown_variables` lists set `DINFER_*` names that are not in it, typos most
likely. `live` settings may change on a reload (SIGHUP); the others need a restart.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from daemon.config_file import ConfigFileError, read_config

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HedgeMode = Literal["learned", "fixed", "off"]
LogFormat = Literal["text", "json"]


class ConfigError(Exception):
    """A `DINFER_*` variable or a config file key has a value the daemon cannot use."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    listen_host: str
    listen_port: int
    data_dir: Path
    admin_key: str | None
    admin_key_file: Path | None
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
    body_read_timeout_s: float
    keepalive_timeout_s: float
    trusted_proxies: tuple[IPNetwork, ...]
    drain_grace_s: float
    register_timeout_s: float
    challenge_answer_s: float
    challenge_max_age_s: float
    log_level: str
    log_format: LogFormat
    metrics_listen: tuple[str, int] | None
    redis_url: str | None
    rebalance_every_s: float
    cluster_listen: tuple[str, int]
    cluster_advertise: tuple[str, int] | None

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


def _optional_listen(raw: str) -> tuple[str, int] | None:
    """A listen address, or None for `off`."""
    return None if raw.lower() == "off" else _listen(raw)


def _advertise(raw: str) -> tuple[str, int] | None:
    """host:port peers dial, or None (unset: the bound cluster listen address)."""
    if not raw:
        return None
    host, port = _listen(raw)
    if port == 0:
        raise ValueError("host:port with a port peers can dial (not 0)")
    return host, port


def _ipv6(host: str) -> str:
    try:
        return str(ipaddress.IPv6Address(host))
    except ValueError:
        raise ValueError("host:port with a valid IPv6 address inside the brackets") from None


def _text(raw: str) -> str:
    return raw


def _redis_url(raw: str) -> str | None:
    if not raw:
        return None
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("a URL such as redis://127.0.0.1:6379/0")
    return raw


def _non_negative_float(raw: str) -> float:
    value = _number(raw)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError("a number of 0 or more")
    return value


def _optional_path(raw: str) -> Path | None:
    return Path(raw) if raw else None


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in raw.replace(",", " ").split()
        )
    except ValueError:
        raise ValueError("a list of CIDRs such as 127.0.0.1/32 10.0.0.0/8 ::1") from None


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One setting: its variable's name, default (as written), meaning, and its file key
    `[table] key`. `live` settings change on a reload; `secret` ones are never printed."""

    name: str
    default: str
    meaning: str
    parse: Callable[[str], Any]
    field: str
    table: str
    key: str
    live: bool
    secret: bool = False
    many: bool = False  # the file may give a list of strings

    @property
    def file_key(self) -> str:
        return f"[{self.table}] {self.key}"


# The file's tables, in the order `dinfer config check` prints them.
TABLES: Final = ("server", "http", "providers", "breaker", "queue", "dispatch")


def _var(
    name: str,
    default: str,
    meaning: str,
    parse: Callable[[str], Any],
    *,
    table: str,
    key: str | None = None,
    live: bool = True,
    secret: bool = False,
    many: bool = False,
) -> EnvVar:
    field = name.removeprefix("DINFER_").lower()
    key = key or field.removeprefix(table + "_")
    return EnvVar(name, default, meaning, parse, field, table, key, live, secret, many)


ENV_VARS: Final[tuple[EnvVar, ...]] = (
    _var(
        "DINFER_LISTEN",
        "127.0.0.1:8000",
        "HTTP and WebSocket address, host:port (IPv6 as [::1]:8000; port 0 picks a free port)",
        _listen,
        table="server",
        key="listen",
        live=False,
    ),
    _var(
        "DINFER_DATA_DIR",
        ".dinfer",
        "directory of the SQLite store (relative to the working directory); one dinfer serve each",
        Path,
        table="server",
        live=False,
    ),
    _var(
        "DINFER_ADMIN_KEY",
        "",
        "bearer key of the admin API; unset disables it",
        _text,
        table="server",
        live=False,
        secret=True,
    ),
    _var(
        "DINFER_ADMIN_KEY_FILE",
        "",
        "file holding the admin key, instead of giving the key itself; unset: "
        "$CREDENTIALS_DIRECTORY/admin_key when systemd passes one",
        _optional_path,
        table="server",
        live=False,
    ),
    _var(
        "DINFER_PROVIDER_AUTH",
        "token",
        "token: providers need an admin-issued token; open: anyone may register (development)",
        _choice("token", "open"),
        table="providers",
        key="auth",
        live=False,
    ),
    _var(
        "DINFER_CHALLENGE_INTERVAL_S",
        "300",
        "seconds between attestation challenges",
        _positive_float,
        table="providers",
    ),
    _var(
        "DINFER_HEARTBEAT_TIMEOUT_S",
        "90",
        "silence after which a provider is dropped",
        _positive_float,
        table="providers",
    ),
    _var(
        "DINFER_BREAKER_THRESHOLD",
        "2",
        "failures within the window that put (provider, model, shape) in cooldown",
        _positive_int,
        table="breaker",
    ),
    _var(
        "DINFER_BREAKER_WINDOW_S",
        "60",
        "window in which breaker failures count",
        _positive_float,
        table="breaker",
    ),
    _var(
        "DINFER_BREAKER_COOLDOWN_S",
        "300",
        "how long a cooldown keeps a provider out",
        _positive_float,
        table="breaker",
    ),
    _var(
        "DINFER_QUEUE_MAX",
        "10",
        "queued requests per model before 429",
        _positive_int,
        table="queue",
    ),
    _var(
        "DINFER_QUEUE_TIMEOUT_S",
        "120",
        "longest a request waits in the queue",
        _positive_float,
        table="queue",
    ),
    _var(
        "DINFER_TOOLS_MIN_VERSION",
        "0.6.3",
        "lowest provider version routed tool requests",
        _version,
        table="providers",
    ),
    _var(
        "DINFER_MAX_ATTEMPTS",
        "3",
        "providers tried per request (failover)",
        _positive_int,
        table="dispatch",
    ),
    _var(
        "DINFER_TTFT_BASE_S",
        "5",
        "first-token deadline, fixed part",
        _positive_float,
        table="dispatch",
    ),
    _var(
        "DINFER_TTFT_PER_TOKEN_MS",
        "1",
        "first-token deadline, added per prompt token",
        _positive_float,
        table="dispatch",
    ),
    _var(
        "DINFER_SPECULATIVE_RATIO",
        "0.5",
        "fraction of the first-token deadline by which a backup provider starts at the latest"
        " (always at it with DINFER_HEDGE_MODE=fixed), in (0, 1]",
        _ratio,
        table="dispatch",
    ),
    _var(
        "DINFER_HEDGE_MODE",
        "learned",
        "learned: a backup starts at the percentile of recent first-token times; fixed: at the"
        " speculative ratio of the deadline; off: never (failover at the deadline only)",
        _choice("learned", "fixed", "off"),
        table="dispatch",
    ),
    _var(
        "DINFER_HEDGE_PERCENTILE",
        "95",
        "percentile of recent first-token times (per model and prompt size; the primary's own"
        " once it has enough, 20 at p95) after which a backup starts, 50 to 99.5",
        _percentile,
        table="dispatch",
    ),
    _var(
        "DINFER_HEDGE_MIN_MS",
        "50",
        "earliest a backup starts, in milliseconds after its primary",
        _positive_float,
        table="dispatch",
    ),
    _var(
        "DINFER_HEDGE_BUDGET",
        "0.05",
        "most backups per dispatch over the hedge window, in (0, 1]; 1 lifts the bound",
        _ratio,
        table="dispatch",
    ),
    _var(
        "DINFER_HEDGE_WINDOW_S",
        "60",
        "sliding window of the hedge budget",
        _positive_float,
        table="dispatch",
    ),
    _var(
        "DINFER_PREAMBLE_TIMEOUT_S",
        "90",
        "extra wait for content, once, when a provider sent only boilerplate by the deadline",
        _positive_float,
        table="dispatch",
    ),
    _var(
        "DINFER_INFERENCE_TIMEOUT_S",
        "600",
        "wait for content after inference_accepted, and the longest time without content"
        " after it (boilerplate does not count)",
        _positive_float,
        table="dispatch",
    ),
    _var(
        "DINFER_MAX_BODY_BYTES",
        "16777216",
        "largest accepted request body (16 MiB)",
        _positive_int,
        table="http",
    ),
    _var(
        "DINFER_BODY_READ_TIMEOUT_S",
        "30",
        "time a request body has to arrive after its head; later: 408, connection closed",
        _positive_float,
        table="http",
        live=False,
    ),
    _var(
        "DINFER_KEEPALIVE_TIMEOUT_S",
        "5",
        "idle time that closes an HTTP connection: between requests, and before a request head",
        _positive_float,
        table="http",
        live=False,
    ),
    _var(
        "DINFER_TRUSTED_PROXIES",
        "",
        "CIDRs of reverse proxies whose X-Forwarded-For names the client; from others it is "
        "ignored",
        _networks,
        table="http",
        live=False,
        many=True,
    ),
    _var(
        "DINFER_DRAIN_GRACE_S",
        "30",
        "on SIGTERM, time requests in flight get to finish before they are cut off",
        _positive_float,
        table="server",
    ),
    _var(
        "DINFER_REGISTER_TIMEOUT_S",
        "10",
        "time a new connection has to send register",
        _positive_float,
        table="providers",
    ),
    _var(
        "DINFER_CHALLENGE_ANSWER_S",
        "30",
        "time a provider has to answer a challenge",
        _positive_float,
        table="providers",
    ),
    _var(
        "DINFER_CHALLENGE_MAX_AGE_S",
        "960",
        "age after which a passed challenge is stale (not routable)",
        _positive_float,
        table="providers",
    ),
    _var(
        "DINFER_LOG_LEVEL",
        "info",
        "debug, info, warning, error or critical",
        _choice("debug", "info", "warning", "error", "critical"),
        table="server",
    ),
    _var(
        "DINFER_LOG_FORMAT",
        "text",
        "text (one human line per record) or json (one JSON object per line)",
        _choice("text", "json"),
        table="server",
        live=False,
    ),
    _var(
        "DINFER_METRICS_LISTEN",
        "127.0.0.1:9464",
        "address of the Prometheus /metrics listener, host:port, apart from the API's; off "
        "disables it",
        _optional_listen,
        table="server",
        live=False,
    ),
    _var(
        "DINFER_REDIS_URL",
        "",
        "redis://host:port of the cluster's Redis (several daemons sharing providers, see "
        "Running a cluster); unset runs alone",
        _redis_url,
        table="server",
        live=False,
        secret=True,
    ),
    _var(
        "DINFER_REBALANCE_EVERY_S",
        "1",
        "in a cluster, seconds between rebalancing rounds: an instance holding more than its "
        "share of providers sends a few idle ones 1001 to reconnect through the balancer; "
        "0 turns it off",
        _non_negative_float,
        table="server",
        live=False,
    ),
    _var(
        "DINFER_CLUSTER_LISTEN",
        "127.0.0.1:0",
        "address of this instance's link to the others (requests and frames between daemons "
        "of a cluster), host:port; port 0 picks a free one; loopback serves --workers only",
        _listen,
        table="server",
        live=False,
    ),
    _var(
        "DINFER_CLUSTER_ADVERTISE",
        "",
        "host:port the other instances dial to reach this one's link; unset: the bound "
        "DINFER_CLUSTER_LISTEN address. Daemons on several machines must set a reachable one",
        _advertise,
        table="server",
        live=False,
    ),
)


class Source(enum.StrEnum):
    """Where a setting's value came from: precedence is env over file over default."""

    DEFAULT = "default"
    FILE = "file"
    ENV = "env"


@dataclass(frozen=True, slots=True)
class Resolved:
    """One setting's raw value, its source, and how an error about it names it."""

    var: EnvVar
    raw: str
    source: Source
    where: str


def resolve(environ: Mapping[str, str], path: Path | None = None) -> list[Resolved]:
    """Each setting's raw value: its variable if set, else the file's key, else the default."""
    keys = {(var.table, var.key): var.many for var in ENV_VARS}
    try:
        in_file = read_config(path, keys) if path is not None else {}
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    resolved = []
    for var in ENV_VARS:
        from_env = environ.get(var.name, "").strip()
        found = in_file.get((var.table, var.key))
        if from_env:
            resolved.append(Resolved(var, from_env, Source.ENV, var.name))
        elif found is not None and found.raw.strip():
            line = f"line {found.line}: " if found.line is not None else ""
            where = f"{path}: {line}{var.file_key}"
            resolved.append(Resolved(var, found.raw.strip(), Source.FILE, where))
        else:
            resolved.append(Resolved(var, var.default, Source.DEFAULT, var.name))
    return resolved


def _parse(item: Resolved) -> Any:
    try:
        return item.var.parse(item.raw)
    except ValueError as exc:
        raise ConfigError(f"{item.where} must be {exc}, got {item.raw!r}") from None


def load_settings(environ: Mapping[str, str], path: Path | None = None) -> Settings:
    """Build the settings from `environ` (normally `os.environ`) over the config file at
    `path`, if any; raise ConfigError naming the variable or key if anything is bad."""
    values = {item.var.field: _parse(item) for item in resolve(environ, path)}
    values["listen_host"], values["listen_port"] = values.pop("listen")
    values["admin_key"] = _admin_key(values["admin_key"], values["admin_key_file"], environ)
    return Settings(**values)


def _admin_key(key: str, key_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The admin key: given inline, or read from its file, or from systemd's credential
    (`LoadCredential=admin_key:...`), so it need not sit in the unit or the environment."""
    if key and key_file is not None:
        raise ConfigError("set the admin key or the admin key file, not both")
    if key:
        return key
    if key_file is None:
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        if not credentials or not (Path(credentials) / "admin_key").is_file():
            return None
        key_file = Path(credentials) / "admin_key"
    try:
        secret = key_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the admin key file {key_file}: {exc}") from None
    if not secret:
        raise ConfigError(f"the admin key file {key_file} is empty")
    return secret


def value_of(settings: Settings, var: EnvVar) -> Any:
    return settings.listen if var.field == "listen" else getattr(settings, var.field)


@dataclass(frozen=True, slots=True)
class Reload:
    """A reload's outcome: the settings to run with (restart-only ones kept as they were),
    the file keys that changed live, and those that changed but need a restart."""

    settings: Settings
    changed: tuple[str, ...]
    needs_restart: tuple[str, ...]


def reload(old: Settings, new: Settings) -> Reload:
    changed = [var for var in ENV_VARS if value_of(old, var) != value_of(new, var)]
    kept = {
        field: getattr(old, field)
        for field in Settings.__struct_fields__
        if not _live_field(field) and getattr(old, field) != getattr(new, field)
    }
    return Reload(
        msgspec.structs.replace(new, **kept),
        tuple(var.file_key for var in changed if var.live),
        tuple(var.file_key for var in changed if not var.live),
    )


def _live_field(field: str) -> bool:
    name = "listen" if field in ("listen_host", "listen_port") else field
    return next(var.live for var in ENV_VARS if var.field == name)


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
    rows = ["| variable | file key | default | meaning |", "|---|---|---|---|"]
    for var in ENV_VARS:
        default = f"`{var.default}`" if var.default else "unset"
        reload = "" if var.live else " (restart to change)"
        rows.append(f"| `{var.name}` | `{var.file_key}` | {default} | {var.meaning}{reload} |")
    return "\n".join(rows)


__doc__ = f"{__doc__}\n::\n\n" + textwrap.indent(describe_env(), "    ") + "\n"

if __name__ == "__main__":
    print(markdown_table())
