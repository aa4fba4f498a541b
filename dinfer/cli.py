"""The `dinfer` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from dinfer.daemon_commands import add_subcommands as add_daemon_commands
from provider.cli import add_subcommand as add_provider_command


def package_version() -> str:
    try:
        return version("dinfer")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinfer",
        description="Coordinator daemon and provider node of a decentralized LLM network.",
    )
    parser.add_argument("--version", action="version", version=f"dinfer {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_daemon_commands(subparsers)
    add_provider_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
