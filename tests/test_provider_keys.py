"""The node's key files: created private on first start, reused after, refused when exposed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from protocol import crypto
from provider.keys import BOX_KEY_FILE, IDENTITY_KEY_FILE, KeyFileError, load_or_create_keys


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_both_key_files_with_mode_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    load_or_create_keys(state)
    assert mode(state / BOX_KEY_FILE) == 0o600
    assert mode(state / IDENTITY_KEY_FILE) == 0o600
    assert mode(state) == 0o700
    assert sorted(p.name for p in state.iterdir()) == [BOX_KEY_FILE, IDENTITY_KEY_FILE]


def test_a_restart_reuses_the_keys_and_keeps_the_provider_id(tmp_path: Path) -> None:
    first = load_or_create_keys(tmp_path)
    again = load_or_create_keys(tmp_path)
    assert again.provider_id == first.provider_id
    assert again.public_key == first.public_key


def test_provider_id_is_the_one_the_daemon_computes(tmp_path: Path) -> None:
    keys = load_or_create_keys(tmp_path)
    identity = crypto.decode_identity_key(keys.identity_key)
    assert keys.provider_id == crypto.provider_id(identity)
    assert len(keys.provider_id) == 16


@pytest.mark.parametrize("exposed", [0o640, 0o604, 0o660, 0o620])
@pytest.mark.parametrize("name", [BOX_KEY_FILE, IDENTITY_KEY_FILE])
def test_a_key_file_others_can_access_is_refused(tmp_path: Path, name: str, exposed: int) -> None:
    load_or_create_keys(tmp_path)
    (tmp_path / name).chmod(exposed)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_keys(tmp_path)


def test_a_damaged_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    load_or_create_keys(tmp_path)
    (tmp_path / IDENTITY_KEY_FILE).write_text("c2hvcnQ=\n")  # valid base64, 5 bytes
    with pytest.raises(KeyFileError, match="damaged"):
        load_or_create_keys(tmp_path)
    assert (tmp_path / IDENTITY_KEY_FILE).read_text() == "c2hvcnQ=\n"


def test_keys_never_show_in_repr(tmp_path: Path) -> None:
    keys = load_or_create_keys(tmp_path)
    secret = (tmp_path / BOX_KEY_FILE).read_text().strip()
    assert secret not in repr(keys)
