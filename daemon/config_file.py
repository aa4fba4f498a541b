"""The daemon's TOML config file: its tables and keys, read into raw values with their lines.

`read_config` knows nothing of what a setting means: `daemon.config` passes the keys its one
table (`ENV_VARS`) allows, and parses the raw strings it gets back exactly as it parses
variables, so a value means the same in the file and in the environment. Numbers are read as
TOML numbers or strings; a list of strings is allowed only where the setting takes several.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class ConfigFileError(Exception):
    """The file cannot be read, is not TOML, or holds a key or a type no setting takes."""


@dataclass(frozen=True, slots=True)
class FileValue:
    raw: str
    line: int | None  # where the key is written, for messages; None if it cannot be found


# (table, key) -> whether the setting takes a list
Keys = Mapping[tuple[str, str], bool]


def read_config(path: Path, keys: Keys) -> dict[tuple[str, str], FileValue]:
    """The file's values by `(table, key)`; raise ConfigFileError naming what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot read the config file: {exc}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message names the line and column
        raise ConfigFileError(f"{path}: not valid TOML: {exc}") from None
    values = {}
    for table, entries in document.items():
        if not isinstance(entries, dict):
            raise ConfigFileError(f"{path}: {table!r} is not a [table]")
        for key, value in entries.items():
            line = _line_of(text, table, key)
            where = f"{path}: {_at(line)}[{table}] {key}"
            if (table, key) not in keys:
                raise ConfigFileError(f"{where}: unknown key")
            values[table, key] = FileValue(_raw(value, keys[table, key], where), line)
    return values


def _raw(value: object, many: bool, where: str) -> str:
    """The value as the string its variable would hold."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        raise ConfigFileError(f"{where}: expected a number or a string, got {value!r}")
    if isinstance(value, str | int | float):
        return str(value)
    if many and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return " ".join(value)
    expected = "a string or a list of strings" if many else "a number or a string"
    raise ConfigFileError(f"{where}: expected {expected}, got {value!r}")


def _at(line: int | None) -> str:
    return f"line {line}: " if line is not None else ""


def _line_of(text: str, table: str, key: str) -> int | None:
    """The line that sets `key` in `[table]` (tomllib reports lines only for syntax errors)."""
    current = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"\s*\[\s*([A-Za-z0-9_-]+)\s*\]", line)
        if header:
            current = header[1]
        elif current == table and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return number
    return None
