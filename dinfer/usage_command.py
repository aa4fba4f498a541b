"""`dinfer usage`: the usage ledger's summaries, read from the store directly.

It works with the daemon down (or running: the store is SQLite in WAL mode). The filters and
groups are the admin API's (`GET /v1/admin/usage`); a table for people by default, `--json`
for scripts. `--data-dir` names the store, else the configured `DINFER_DATA_DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from daemon.accounts.usage import GROUPS, parse_query, query_usage

_COLUMNS = (
    ("requests", "requests"),
    ("completed", None),
    ("failed", None),
    ("rejected", None),
    ("in_band_error", None),
    ("client_gone", None),
    ("aborted", None),
    ("orphaned", None),
    ("prompt", "prompt_tokens"),
    ("completion", "completion_tokens"),
    ("reasoning", "reasoning_tokens"),
    ("ttft_p50_ms", "ttft_p50_ms"),
    ("ttft_p95_ms", "ttft_p95_ms"),
)


def add_usage_command(subparsers: Any) -> None:
    usage = subparsers.add_parser(
        "usage", help="summarise the usage ledger (works with the daemon down)"
    )
    usage.add_argument(
        "--config", type=Path, metavar="PATH", help="TOML config file (variables override it)"
    )
    usage.add_argument("--data-dir", type=Path, metavar="DIR", help="the daemon's data directory")
    usage.add_argument("--since", help="from this time: RFC 3339 or unix seconds")
    usage.add_argument("--until", help="before this time: RFC 3339 or unix seconds")
    usage.add_argument("--group-by", choices=sorted(GROUPS), help="one row per day, model, ...")
    usage.add_argument("--key-id", help="only this consumer key's requests")
    usage.add_argument("--model", help="only this model's requests")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.set_defaults(run=run_usage)


def run_usage(args: argparse.Namespace) -> int:
    from daemon.store import database_path, open_store

    data_dir = args.data_dir or _configured_data_dir(args.config)
    params = {
        name: value
        for name, value in (
            ("since", args.since),
            ("until", args.until),
            ("group_by", args.group_by),
            ("key_id", args.key_id),
            ("model", args.model),
        )
        if value is not None
    }
    try:
        query = parse_query(params)
    except ValueError as exc:
        sys.exit(f"dinfer: {exc}")

    async def migrate() -> None:  # an older store gains the usage table, as the daemon would
        async with open_store(data_dir):
            pass

    trio.run(migrate)
    groups = query_usage(database_path(data_dir), query)
    if args.json:
        print(json.dumps({"group_by": query.group_by, "data": groups}, indent=2))
    else:
        print(render_table(groups, query.group_by))
    return 0


def _configured_data_dir(config: Path | None) -> Path:
    from daemon.config import ConfigError, load_settings

    try:
        return load_settings(os.environ, config).data_dir
    except ConfigError as exc:
        sys.exit(f"dinfer: {exc}")


def render_table(groups: Sequence[dict[str, Any]], group_by: str | None) -> str:
    if not groups:
        return "no finished requests match"
    header = [group_by or "all", *(name for name, _ in _COLUMNS)]
    rows = [[_cell(g["group"] if group_by else "all"), *_values(g)] for g in groups]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    )


def _values(group: dict[str, Any]) -> list[str]:
    return [
        _cell(group[field] if field else group["outcomes"].get(name, 0)) for name, field in _COLUMNS
    ]


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)
