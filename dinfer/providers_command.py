"""`dinfer providers`: the running daemon's providers, from its admin API.

The daemon's address and admin key come from the same settings `dinfer serve` reads (the
config file and `DINFER_*` variables: DINFER_LISTEN, DINFER_ADMIN_KEY or
DINFER_ADMIN_KEY_FILE). A daemon bound to every address (0.0.0.0, ::) is asked on loopback.
A human table by default, the admin API's JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Final

import httpx

from daemon.config import ConfigError, Settings, load_settings

TIMEOUT_S: Final = 10.0
WILDCARD: Final = {"0.0.0.0": "127.0.0.1", "::": "::1"}
COLUMNS: Final = ("PROVIDER", "VERSION", "STATE", "IN FLIGHT", "MODELS", "TTFT p50", "COOLDOWNS")


def add_providers_command(subparsers: Any) -> None:
    command = subparsers.add_parser(
        "providers",
        help="list the running daemon's providers (asks its admin API)",
        description="List the providers connected to the running daemon, via its admin API.",
    )
    command.add_argument(
        "--config", type=Path, metavar="PATH", help="TOML config file (variables override it)"
    )
    command.add_argument("--json", action="store_true", help="print the admin API's JSON")
    command.set_defaults(run=run_providers)


def run_providers(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(os.environ, args.config)
    except ConfigError as exc:
        sys.exit(f"dinfer: {exc}")
    providers = fetch_providers(settings)
    if args.json:
        print(json.dumps({"providers": providers}, indent=2))
    else:
        print(table(providers))
    return 0


def daemon_url(settings: Settings) -> str:
    host = WILDCARD.get(settings.listen_host, settings.listen_host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{settings.listen_port}"


def fetch_providers(settings: Settings) -> list[dict[str, Any]]:
    """The admin API's provider view; exits with a clear message on every failure."""
    if settings.admin_key is None:
        sys.exit(
            "dinfer: no admin key: set DINFER_ADMIN_KEY or DINFER_ADMIN_KEY_FILE (or the "
            "config file's admin key) to the running daemon's"
        )
    url = daemon_url(settings)
    headers = {"Authorization": f"Bearer {settings.admin_key}"}
    try:
        reply = httpx.get(f"{url}/v1/admin/providers", headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        sys.exit(f"dinfer: no daemon answers at {url} ({exc}): is `dinfer serve` running?")
    if reply.status_code in (401, 403):
        sys.exit(f"dinfer: the daemon at {url} refused the admin key ({reply.status_code})")
    if reply.status_code != 200:
        sys.exit(f"dinfer: the daemon at {url} answered {reply.status_code}: {reply.text[:200]}")
    providers: list[dict[str, Any]] = reply.json()["providers"]
    return providers


def table(providers: list[dict[str, Any]]) -> str:
    if not providers:
        return "no providers connected"
    rows = [COLUMNS, *(_row(p) for p in providers)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _row(p: dict[str, Any]) -> tuple[str, ...]:
    return (
        p["provider_id"],
        p["version"],
        _state(p),
        f"{p['in_flight']}/{p['max_concurrency']}",
        ",".join(m["id"] for m in p["models"]) or "-",
        _ttft(p),
        ",".join(f"{c['model']}/{c['shape']} {c['seconds_left']:g}s" for c in p["cooldowns"])
        or "-",
    )


def _state(p: dict[str, Any]) -> str:
    if p.get("drained"):
        return "drained"
    if p["draining"]:
        return "draining"
    return "serving" if p["trusted"] else "untrusted"


def _ttft(p: dict[str, Any]) -> str:
    samples = [s for s in p.get("speed", []) if s.get("ttft_p50_ms") is not None]
    if not samples:
        return "-"
    best = max(samples, key=lambda s: s["samples"])
    return f"{best['ttft_p50_ms']:g} ms"
