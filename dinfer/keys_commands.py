"""`dinfer keys ...` and `dinfer tokens ...`: consumer keys and provider tokens, on the store.

They open the store file directly, so they work with the daemon down; a running daemon sees
their changes within 10 ms (`daemon/store.py`, `PRAGMA data_version`), and with
DINFER_REDIS_URL every instance of its cluster within about a second (the running daemon
pushes them: `daemon/cluster/credentials.py`). The store is
the one `dinfer serve` would use: `--data-dir`, else `DINFER_DATA_DIR`, else the config file's
`[server] data_dir`, else `.dinfer` (relative to the working directory). Limits are validated
by `daemon.key_policy`, as the admin API does. Tables by default, `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from daemon.config import ConfigError, load_settings
from daemon.key_policy import NO_LIMITS, parse_changes
from daemon.store import Store, open_store

T = TypeVar("T")
CLEAR = "none"  # `dinfer keys set ID --rpm none` clears a limit


def add_subcommands(subparsers: Any) -> None:
    _add_keys(subparsers)
    _add_tokens(subparsers)


def _add_keys(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="manage consumer API keys and their limits")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    _action(actions, "list", "list every key (never its secret)", run_keys_list)
    create = _action(actions, "create", "create a key and print it once", run_keys_create)
    create.add_argument("--name", required=True, help="who the key is for")
    _limit_options(create, clearable=False)
    update = _action(actions, "set", "set or clear a key's limits", run_keys_set)
    update.add_argument("id", help="the key's id (key_...)")
    update.add_argument("--name", help="a new name")
    _limit_options(update, clearable=True)
    rotate = _action(actions, "rotate", "a new secret for a key; the old one dies", run_rotate)
    rotate.add_argument("id", help="the key's id (key_...)")
    revoke = _action(actions, "revoke", "revoke a key", run_keys_revoke)
    revoke.add_argument("id", help="the key's id (key_...)")


def _add_tokens(subparsers: Any) -> None:
    tokens = subparsers.add_parser("tokens", help="manage provider tokens")
    actions = tokens.add_subparsers(dest="action", metavar="ACTION", required=True)
    _action(actions, "list", "list every provider token (never its secret)", run_tokens_list)
    create = _action(
        actions, "create", "create a provider token and print it once", run_tokens_create
    )
    create.add_argument("--name", required=True, help="whose machines use it")
    revoke = _action(actions, "revoke", "revoke a provider token", run_tokens_revoke)
    revoke.add_argument("id", help="the token's id (pt_...)")


def _action(
    actions: Any, name: str, help: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, help=help, description=help)
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the store's directory (default: what dinfer serve uses: DINFER_DATA_DIR, the "
        "config file's data_dir, else .dinfer)",
    )
    parser.add_argument(
        "--config", type=Path, metavar="PATH", help="TOML config file (variables override it)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    parser.set_defaults(run=run)
    return parser


def _limit_options(parser: argparse.ArgumentParser, *, clearable: bool) -> None:
    clear = f" ('{CLEAR}' clears it)" if clearable else ""
    for flag, what in (
        ("--rpm", "requests per minute"),
        ("--tpm", "tokens (prompt + completion) per minute"),
        ("--daily-tokens", "tokens per UTC day"),
        ("--max-concurrency", "requests in flight at once"),
    ):
        parser.add_argument(flag, metavar="N", help=what + clear)
    parser.add_argument("--models", metavar="A,B", help="the only models the key may use" + clear)
    parser.add_argument(
        "--expires-at", metavar="TIME", help="RFC 3339, e.g. 2027-01-01T00:00:00Z" + clear
    )


def limit_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The limit options given, validated as the admin API validates its body."""
    raw: dict[str, Any] = {}
    for field in ("rpm", "tpm", "daily_tokens", "max_concurrency"):
        value = getattr(args, field)
        if value is not None:
            raw[field] = None if value == CLEAR else _integer(field, value)
    if args.models is not None:
        models = [model.strip() for model in args.models.split(",")]
        raw["allowed_models"] = None if args.models == CLEAR else models
    if args.expires_at is not None:
        raw["expires_at"] = None if args.expires_at == CLEAR else args.expires_at
    return parse_changes(raw)


def _integer(field: str, text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text  # parse_changes names the field and says what it must be


def data_dir(args: argparse.Namespace) -> Path:
    """The store `dinfer serve` would use, unless `--data-dir` says otherwise."""
    if args.data_dir is not None:
        path: Path = args.data_dir
        return path
    try:
        return load_settings(os.environ, args.config).data_dir
    except ConfigError as exc:
        sys.exit(f"dinfer: {exc}")


def on_store(args: argparse.Namespace, work: Callable[[Store], Awaitable[T]]) -> T:
    """Run `work` on the store; a bad value or an unknown id exits with its message."""
    path = data_dir(args)

    async def run() -> T:
        async with open_store(path) as store:
            return await work(store)

    try:
        return trio.run(run)
    except (ValueError, LookupError) as exc:
        sys.exit(f"dinfer: {exc}")


def emit(args: argparse.Namespace, payload: Any, lines: Sequence[str]) -> int:
    print(json.dumps(payload, indent=2) if args.json else "\n".join(lines))
    return 0


# keys ----------------------------------------------------------------------------------------

KEY_COLUMNS = (
    ("id", "ID"),
    ("name", "NAME"),
    ("status", "STATUS"),
    ("rpm", "RPM"),
    ("tpm", "TPM"),
    ("daily_tokens", "DAILY"),
    ("max_concurrency", "CONC"),
    ("allowed_models", "MODELS"),
    ("expires_at", "EXPIRES"),
    ("created_at", "CREATED"),
)


def run_keys_list(args: argparse.Namespace) -> int:
    keys = [record.to_json() for record in on_store(args, Store.list_api_keys)]
    return emit(args, keys, table(KEY_COLUMNS, [_key_row(key) for key in keys]))


def _key_row(key: dict[str, Any]) -> dict[str, Any]:
    status = "live" if key["revoked_at"] is None else "revoked"
    models = key["allowed_models"]
    return {**key, "status": status, "allowed_models": None if models is None else ",".join(models)}


def run_keys_create(args: argparse.Namespace) -> int:
    async def create(store: Store) -> dict[str, Any]:
        limits = NO_LIMITS.with_changes(limit_changes(args))
        issued = await store.create_api_key(args.name, limits)
        record = await store.get_api_key(issued.id)
        assert record is not None
        return {**record.to_json(), "key": issued.secret}

    key = on_store(args, create)
    return emit(args, key, [f"id:  {key['id']}", f"key: {key['key']}", *_limit_lines(key)])


def run_keys_set(args: argparse.Namespace) -> int:
    async def update(store: Store) -> dict[str, Any]:
        record = await store.update_api_key(args.id, limit_changes(args), name=args.name)
        if record is None:
            raise LookupError(f"no live API key {args.id!r}")
        return record.to_json()

    key = on_store(args, update)
    return emit(args, key, [f"id:  {key['id']}", *_limit_lines(key)])


def _limit_lines(key: dict[str, Any]) -> list[str]:
    return [
        f"{title.lower()}: {_cell(_key_row(key)[field])}"
        for field, title in KEY_COLUMNS[3:9]
        if key[field] is not None
    ]


def run_rotate(args: argparse.Namespace) -> int:
    async def rotate(store: Store) -> dict[str, Any]:
        issued = await store.rotate_api_key(args.id)
        if issued is None:
            raise LookupError(f"no live API key {args.id!r}")
        return {"id": issued.id, "key": issued.secret}

    key = on_store(args, rotate)
    return emit(args, key, [f"id:  {key['id']}", f"key: {key['key']}"])


def run_keys_revoke(args: argparse.Namespace) -> int:
    async def revoke(store: Store) -> dict[str, Any]:
        if not await store.revoke_api_key(args.id):
            raise LookupError(f"no live API key {args.id!r}")
        return {"id": args.id, "revoked": True}

    return emit(args, on_store(args, revoke), [f"revoked {args.id}"])


# tokens --------------------------------------------------------------------------------------

TOKEN_COLUMNS = (("id", "ID"), ("name", "NAME"), ("status", "STATUS"), ("created_at", "CREATED"))


def run_tokens_list(args: argparse.Namespace) -> int:
    tokens = [record.to_json() for record in on_store(args, Store.list_provider_tokens)]
    rows = [{**t, "status": "live" if t["revoked_at"] is None else "revoked"} for t in tokens]
    return emit(args, tokens, table(TOKEN_COLUMNS, rows))


def run_tokens_create(args: argparse.Namespace) -> int:
    async def create(store: Store) -> dict[str, Any]:
        issued = await store.create_provider_token(args.name)
        return {"id": issued.id, "token": issued.secret, "name": args.name}

    token = on_store(args, create)
    return emit(args, token, [f"id:    {token['id']}", f"token: {token['token']}"])


def run_tokens_revoke(args: argparse.Namespace) -> int:
    async def revoke(store: Store) -> dict[str, Any]:
        if not await store.revoke_provider_token(args.id):
            raise LookupError(f"no live provider token {args.id!r}")
        return {"id": args.id, "revoked": True}

    return emit(args, on_store(args, revoke), [f"revoked {args.id}"])


# tables --------------------------------------------------------------------------------------


def table(columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> list[str]:
    """Left-aligned columns; `-` for an unset value."""
    cells = [[title for _, title in columns]]
    cells += [[_cell(row[field]) for field, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)
