"""`dinfer keys ...` and `dinfer tokens ...` on the store file, with the daemon down.

Round trips through `--json` as a script would read them, the tables a person reads, the
refusals (a bad limit names its field), and which store the commands open when no
`--data-dir` is given: the one `dinfer serve` would open.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.store import database_path, open_store
from dinfer import cli

REPO = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    return json.loads(run(capsys, *argv, "--json"))


@pytest.fixture(autouse=True)
def no_dinfer_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DINFER_DATA_DIR", raising=False)


def test_keys_round_trip_through_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store = ["--data-dir", str(tmp_path)]
    created = run_json(
        capsys, "keys", "create", *store, "--name", "alice", "--rpm", "60", "--tpm", "10000",
        "--daily-tokens", "500000", "--max-concurrency", "4", "--models", "b,a",
        "--expires-at", "2027-01-01T00:00:00Z",
    )  # fmt: skip
    secret = created.pop("key")
    assert secret.startswith("dk_")
    assert created["name"] == "alice" and created["revoked_at"] is None
    limits = {k: created[k] for k in ("rpm", "tpm", "daily_tokens", "max_concurrency")}
    assert limits == {"rpm": 60, "tpm": 10000, "daily_tokens": 500000, "max_concurrency": 4}
    assert created["allowed_models"] == ["a", "b"]
    assert created["expires_at"] == "2027-01-01T00:00:00Z"
    assert run_json(capsys, "keys", "list", *store) == [created]

    key_id = created["id"]
    changed = run_json(capsys, "keys", "set", key_id, *store, "--rpm", "none", "--models", "none")
    assert (changed["rpm"], changed["allowed_models"], changed["tpm"]) == (None, None, 10000)

    rotated = run_json(capsys, "keys", "rotate", key_id, *store)
    assert rotated["id"] == key_id and rotated["key"] not in (secret, None)
    assert run_json(capsys, "keys", "revoke", key_id, *store) == {"id": key_id, "revoked": True}
    (listed,) = run_json(capsys, "keys", "list", *store)
    assert listed["revoked_at"] is not None
    text = database_path(tmp_path).read_bytes()
    assert secret.encode() not in text and rotated["key"].encode() not in text


def test_keys_list_is_a_table_by_default(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store = ["--data-dir", str(tmp_path)]
    out = run(capsys, "keys", "create", *store, "--name", "bob", "--rpm", "5")
    assert out.startswith("id:  key_") and "\nkey: dk_" in out and "rpm: 5" in out
    header, row = run(capsys, "keys", "list", *store).splitlines()
    assert header.split() == [
        "ID", "NAME", "STATUS", "RPM", "TPM", "DAILY", "CONC", "MODELS", "EXPIRES", "CREATED",
    ]  # fmt: skip
    assert row.split()[1:9] == ["bob", "live", "5", "-", "-", "-", "-", "-"]
    assert "dk_" not in row


def test_tokens_round_trip_through_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store = ["--data-dir", str(tmp_path)]
    created = run_json(capsys, "tokens", "create", *store, "--name", "rig")
    assert created["token"].startswith("dpt_") and created["name"] == "rig"
    (listed,) = run_json(capsys, "tokens", "list", *store)
    assert (listed["id"], listed["name"], listed["revoked_at"]) == (created["id"], "rig", None)
    assert "token" not in listed
    run_json(capsys, "tokens", "revoke", created["id"], *store)
    assert run_json(capsys, "tokens", "list", *store)[0]["revoked_at"] is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "create", "--name", "x", "--rpm", "-3"], "dinfer: rpm: must be a positive"),
        (["keys", "create", "--name", "x", "--tpm", "lots"], "dinfer: tpm: must be a positive"),
        (["keys", "create", "--name", "x", "--expires-at", "soon"], "dinfer: expires_at: "),
        (["keys", "set", "key_000000000000", "--rpm", "1"], "dinfer: no live API key"),
        (["keys", "rotate", "key_000000000000"], "dinfer: no live API key"),
        (["keys", "revoke", "key_000000000000"], "dinfer: no live API key"),
        (["tokens", "revoke", "pt_000000000000"], "dinfer: no live provider token"),
    ],
)
def test_refusals_exit_with_a_message(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--data-dir", str(tmp_path)])
    assert str(exited.value.code).startswith(message)


def test_without_data_dir_the_store_is_the_one_serve_would_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run(capsys, "keys", "create", "--name", "default")
    assert database_path(tmp_path / ".dinfer").exists()

    config = tmp_path / "dinfer.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "from-file"}"\n')
    run(capsys, "keys", "create", "--name", "file", "--config", str(config))
    assert database_path(tmp_path / "from-file").exists()

    monkeypatch.setenv("DINFER_DATA_DIR", str(tmp_path / "from-env"))
    run(capsys, "tokens", "create", "--name", "env", "--config", str(config))
    assert database_path(tmp_path / "from-env").exists()
    names = [t["name"] for t in run_json(capsys, "tokens", "list", "--config", str(config))]
    assert names == ["env"]


async def test_the_quickstarts_keys_command_writes_to_its_daemons_store(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import localnet
    finally:
        sys.path.remove(str(REPO / "scripts"))
    daemon = localnet.Daemon("http://127.0.0.1:1", "admin", tmp_path / "daemon", None)  # type: ignore[arg-type]
    command = daemon.keys_command("newcomer")
    assert f"--data-dir {tmp_path / 'daemon'}" in command
    done = await trio.run_process(shlex.split(command), capture_stdout=True, cwd=REPO)
    secret = done.stdout.decode().split("key: ")[1].split()[0]
    async with open_store(tmp_path / "daemon") as store:
        assert store.lookup_api_key(secret) is not None
