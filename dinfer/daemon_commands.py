"""`dinfer serve` and `dinfer config check`: the daemon's subcommands (with `dinfer keys` and
`dinfer tokens` from `keys_commands`, and `dinfer providers` from its own module)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from daemon.config import (
    TABLES,
    ConfigError,
    Settings,
    Source,
    describe_env,
    load_settings,
    resolve,
    unknown_variables,
)
from daemon.log_format import configure_logging
from dinfer.keys_commands import add_subcommands as add_store_commands
from dinfer.providers_command import add_providers_command
from dinfer.usage_command import add_usage_command

MASK = "********"


def add_subcommands(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the coordinator daemon",
        description=(
            "Run the coordinator daemon. Configured by a TOML file (--config; each setting's "
            "[table] key is in the README) and by environment variables, which win over it:"
        ),
        epilog=describe_env(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_option(serve)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N daemon processes on one port (SO_REUSEPORT), one cluster: needs "
        "DINFER_REDIS_URL (see the README's Running a cluster)",
    )
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(run=run_serve)
    add_store_commands(subparsers)
    config = subparsers.add_parser("config", help="inspect the daemon's configuration")
    checks = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = checks.add_parser(
        "check",
        help="print the effective settings and where each came from; exit 1 on any error",
    )
    _config_option(check)
    check.set_defaults(run=run_config_check)
    add_providers_command(subparsers)
    add_usage_command(subparsers)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="PATH", help="TOML config file (variables override it)"
    )


def settings_or_exit(path: Path | None) -> Settings:
    try:
        settings = load_settings(os.environ, path)
    except ConfigError as exc:
        sys.exit(f"dinfer: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    for name in unknown_variables(os.environ):
        logging.getLogger("dinfer").warning("ignoring unknown variable %s", name)
    return settings


def run_serve(args: argparse.Namespace) -> int:
    from daemon.api.serve import serve
    from daemon.serve_lock import DataDirInUse

    settings = settings_or_exit(args.config)
    if args.workers < 1:
        sys.exit("dinfer: --workers must be at least 1")
    if args.workers > 1 and settings.redis_url is None:
        sys.exit("dinfer: --workers needs DINFER_REDIS_URL: the workers share providers through it")
    try:
        if args.workers > 1:
            from dinfer.workers import run_workers

            return trio.run(run_workers, settings, args.workers, args.config)
        trio.run(partial(serve, settings, config_path=args.config, worker=args.worker))
    except DataDirInUse as exc:
        sys.exit(f"dinfer: {exc}")
    return 0


def run_config_check(args: argparse.Namespace) -> int:
    """Every setting with its value and source, secrets masked; then whether it all loads."""
    try:
        resolved = resolve(os.environ, args.config)
        load_settings(os.environ, args.config)  # what resolve cannot see: the key file
    except ConfigError as exc:
        print(f"dinfer: {exc}", file=sys.stderr)
        return 1
    width = max(len(item.var.file_key) for item in resolved)
    for item in sorted(resolved, key=lambda item: TABLES.index(item.var.table)):
        value = MASK if item.var.secret and item.raw else item.raw or "(unset)"
        source = f"env {item.var.name}" if item.source is Source.ENV else str(item.source)
        print(f"{item.var.file_key:<{width}}  {value}  ({source})")
    for name in unknown_variables(os.environ):
        print(f"warning: ignoring unknown variable {name}", file=sys.stderr)
    return 0
