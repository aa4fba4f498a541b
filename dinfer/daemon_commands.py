"""`dinfer serve` and `dinfer keys`: the daemon's subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import trio

from daemon.config import ConfigError, Settings, describe_env, load_settings, unknown_variables


def add_subcommands(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the coordinator daemon",
        description="Run the coordinator daemon. Configured by environment variables:",
        epilog=describe_env(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.set_defaults(run=run_serve)
    keys = subparsers.add_parser("keys", help="manage consumer API keys")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a consumer API key and print it once")
    create.add_argument("--name", required=True, help="who the key is for")
    create.set_defaults(run=run_keys_create)


def settings_or_exit() -> Settings:
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        sys.exit(f"dinfer: {exc}")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in unknown_variables(os.environ):
        logging.getLogger("dinfer").warning("ignoring unknown variable %s", name)
    return settings


def run_serve(_: argparse.Namespace) -> int:
    from daemon.api.serve import serve
    from daemon.serve_lock import DataDirInUse

    try:
        trio.run(serve, settings_or_exit())
    except DataDirInUse as exc:
        sys.exit(f"dinfer: {exc}")
    return 0


def run_keys_create(args: argparse.Namespace) -> int:
    from daemon.store import open_store

    settings = settings_or_exit()

    async def create() -> None:
        async with open_store(settings.data_dir) as store:
            issued = await store.create_api_key(args.name)
        print(f"id:  {issued.id}\nkey: {issued.secret}")

    try:
        trio.run(create)
    except ValueError as exc:
        sys.exit(f"dinfer: {exc}")
    return 0
