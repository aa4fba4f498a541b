"""`dinfer provider` options: flags, `DINFER_PROVIDER_*` variables, and their precedence."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from provider.cli import add_subcommand
from provider.config import ConfigError, ProviderConfig, config_from_args
from provider.keys import load_or_create_keys

WS = "ws://daemon:8000/ws/provider"


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dinfer")
    add_subcommand(parser.add_subparsers(dest="command"))
    return parser.parse_args(["provider", *argv])


def parse(*argv: str, env: dict[str, str] | None = None) -> ProviderConfig:
    return config_from_args(parse_args(*argv), env or {})


def test_defaults() -> None:
    config = parse("--coordinator", WS)
    assert config.coordinator == WS
    assert config.backend == "http://127.0.0.1:8080"
    assert config.token is None
    assert config.max_concurrency is None  # chosen from the backend kind later
    assert config.drain_grace == 30.0
    assert config.state_dir == Path("~/.dinfer/provider").expanduser()


def test_every_option_from_the_environment() -> None:
    env = {
        "DINFER_PROVIDER_COORDINATOR": WS,
        "DINFER_PROVIDER_BACKEND": "http://127.0.0.1:11434/v1/",
        "DINFER_PROVIDER_TOKEN": "tok",
        "DINFER_PROVIDER_MAX_CONCURRENCY": "2",
        "DINFER_PROVIDER_VISION": "llava, qwen-vl gemma3",
        "DINFER_PROVIDER_CHAT_TEMPLATE": "m1=/t/a.jinja,m2=/t/b.gguf",
        "DINFER_PROVIDER_STATE_DIR": "/var/lib/dinfer",
        "DINFER_PROVIDER_BACKEND_NAME": "ollama",
        "DINFER_PROVIDER_DRAIN_GRACE": "0",
    }
    config = parse(env=env)
    assert config.backend == "http://127.0.0.1:11434"  # the pasted /v1 base is accepted
    assert (config.token, config.max_concurrency, config.backend_name) == ("tok", 2, "ollama")
    assert config.vision == {"llava", "qwen-vl", "gemma3"}
    assert config.chat_templates == (("m1", Path("/t/a.jinja")), ("m2", Path("/t/b.gguf")))
    assert config.state_dir == Path("/var/lib/dinfer")
    assert config.drain_grace == 0.0


def test_flags_win_over_the_environment() -> None:
    env = {"DINFER_PROVIDER_COORDINATOR": "ws://other/ws/provider", "DINFER_PROVIDER_VISION": "a"}
    config = parse("--coordinator", WS, "--vision", "b", "c", env=env)
    assert config.coordinator == WS
    assert config.vision == {"b", "c"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "--coordinator"),
        (("--coordinator", "http://daemon/ws/provider"), "ws://"),
        (("--coordinator", WS, "--backend", "127.0.0.1:8080"), "--backend"),
        (("--coordinator", WS, "--max-concurrency", "0"), "MAX_CONCURRENCY"),
        (("--coordinator", WS, "--max-concurrency", "many"), "not a number"),
        (("--coordinator", WS, "--chat-template", "model-without-path"), "MODEL=PATH"),
        (("--coordinator", WS, "--log-level", "loud"), "--log-level"),
    ],
)
def test_bad_options_name_the_option(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_the_token_never_shows_in_repr() -> None:
    assert "s3cret" not in repr(parse("--coordinator", WS, "--token", "s3cret"))


def test_the_command_refuses_bad_options_with_exit_code_2(monkeypatch, capsys) -> None:
    monkeypatch.delenv("DINFER_PROVIDER_COORDINATOR", raising=False)
    args = parse_args()
    assert args.run(args) == 2
    assert "--coordinator" in capsys.readouterr().err


def test_the_command_refuses_exposed_keys_with_exit_code_1(tmp_path: Path, capsys) -> None:
    load_or_create_keys(tmp_path)
    (tmp_path / "identity.key").chmod(0o644)
    args = parse_args("--coordinator", WS, "--state-dir", str(tmp_path))
    assert args.run(args) == 1
    assert "chmod 600" in capsys.readouterr().err


def test_context_lengths_by_model() -> None:
    config = parse("--coordinator", WS, "--context-length", "gemma=2048", "qwen=32768")
    assert config.context_lengths == (("gemma", 2048), ("qwen", 32768))
    env = {"DINFER_PROVIDER_CONTEXT_LENGTH": "gemma=2048,qwen=32768"}
    assert parse("--coordinator", WS, env=env).context_lengths == config.context_lengths


@pytest.mark.parametrize("item", ["gemma", "gemma=", "=2048", "gemma=lots", "gemma=0"])
def test_a_bad_context_length_names_the_flag(item: str) -> None:
    with pytest.raises(ConfigError, match="--context-length"):
        parse("--coordinator", WS, "--context-length", item)


def test_a_max_concurrency_the_daemon_would_refuse_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="at most 1024, got 5000"):
        parse("--coordinator", WS, "--max-concurrency", "5000")
