"""The `dinfer provider` subcommand: parse the options, load the keys, run the node."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import trio

from provider.config import (
    ConfigError,
    ProviderConfig,
    add_arguments,
    config_from_args,
    node_version,
)
from provider.keys import KeyFileError, NodeKeys, load_or_create_keys
from provider.node import serve

EXIT_CONFIG = 2
EXIT_KEYS = 1
EXIT_INTERRUPTED = 130

_DESCRIPTION = """\
Connect a local OpenAI-compatible model server (llama.cpp, vLLM, Ollama, ...) to a dinfer
daemon and serve its requests. Every option can also be set with a DINFER_PROVIDER_* variable
named after it (DINFER_PROVIDER_TOKEN, DINFER_PROVIDER_MAX_CONCURRENCY, ...); list variables
are space- or comma-separated. SIGTERM drains: no new requests, in-flight ones get
--drain-grace seconds to finish.
"""


def add_subcommand(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "provider",
        help="run a provider node in front of a local model server",
        description=_DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args, os.environ)
    except ConfigError as exc:
        print(f"dinfer provider: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    keys = _keys(config)
    if keys is None:
        return EXIT_KEYS
    _configure_logging(config)
    print(f"dinfer provider {node_version()}: provider id {keys.provider_id}", flush=True)
    try:
        trio.run(serve, config, keys)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def _keys(config: ProviderConfig) -> NodeKeys | None:
    try:
        return load_or_create_keys(config.state_dir)
    except (KeyFileError, OSError) as exc:
        print(f"dinfer provider: {exc}", file=sys.stderr)
        return None


def _configure_logging(config: ProviderConfig) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request line at INFO: one per inference request is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
