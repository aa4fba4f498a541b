"""Settings from the environment: documented defaults, and every bad value names its variable."""

from pathlib import Path

import msgspec
import pytest

from daemon import config
from daemon.config import ConfigError, load_settings


def test_defaults_match_the_documented_table() -> None:
    settings = load_settings({})
    assert settings.listen == "127.0.0.1:8000"
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 8000)
    assert settings.data_dir == Path(".dinfer")
    assert settings.admin_key is None
    assert settings.provider_auth == "token"
    assert settings.challenge_interval_s == 300.0
    assert settings.heartbeat_timeout_s == 90.0
    assert settings.breaker_threshold == 2
    assert settings.breaker_window_s == 60.0
    assert settings.breaker_cooldown_s == 300.0
    assert settings.queue_max == 10
    assert settings.queue_timeout_s == 120.0
    assert settings.tools_min_version == (0, 6, 3)
    assert settings.max_attempts == 3
    assert settings.ttft_base_s == 5.0
    assert settings.ttft_per_token_ms == 1.0
    assert settings.speculative_ratio == 0.5
    assert settings.hedge_mode == "learned"
    assert settings.hedge_percentile == 95.0
    assert settings.hedge_min_ms == 50.0
    assert settings.hedge_budget == 0.05
    assert settings.hedge_window_s == 60.0
    assert settings.preamble_timeout_s == 90.0
    assert settings.inference_timeout_s == 600.0
    assert settings.max_body_bytes == 16 * 1024 * 1024
    assert settings.body_read_timeout_s == 30.0
    assert settings.keepalive_timeout_s == 5.0
    assert settings.register_timeout_s == 10.0
    assert settings.challenge_answer_s == 30.0
    assert settings.challenge_max_age_s == 960.0
    assert settings.log_level == "info"


def test_every_setting_has_exactly_one_variable() -> None:
    fields = set(config.Settings.__struct_fields__) - {"listen_host", "listen_port"}
    assert {var.field for var in config.ENV_VARS} == fields | {"listen"}


def test_empty_values_take_the_default() -> None:
    env = {var.name: "" for var in config.ENV_VARS}
    assert load_settings(env) == load_settings({})


def test_values_are_read_and_converted() -> None:
    settings = load_settings(
        {
            "DINFER_LISTEN": "0.0.0.0:0",
            "DINFER_DATA_DIR": "/var/lib/dinfer",
            "DINFER_ADMIN_KEY": " s3cret \n",
            "DINFER_QUEUE_MAX": "25",
            "DINFER_INFERENCE_TIMEOUT_S": "12.5",
            "DINFER_SPECULATIVE_RATIO": "1",
            "DINFER_HEDGE_MODE": "Fixed",
            "DINFER_HEDGE_PERCENTILE": "99.5",
            "DINFER_HEDGE_BUDGET": "1",
            "DINFER_TOOLS_MIN_VERSION": "1.10",
            "DINFER_LOG_LEVEL": "DEBUG",
        }
    )
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 0)
    assert settings.data_dir == Path("/var/lib/dinfer")
    assert settings.admin_key == "s3cret"
    assert settings.queue_max == 25
    assert settings.inference_timeout_s == 12.5
    assert settings.speculative_ratio == 1.0
    assert (settings.hedge_mode, settings.hedge_percentile) == ("fixed", 99.5)
    assert settings.hedge_budget == 1.0
    assert settings.tools_min_version == (1, 10)
    assert settings.log_level == "debug"


@pytest.mark.parametrize(
    ("value", "host", "port", "listen"),
    [
        ("[::1]:8000", "::1", 8000, "[::1]:8000"),
        ("[::]:0", "::", 0, "[::]:0"),
        ("[2001:DB8::0001]:443", "2001:db8::1", 443, "[2001:db8::1]:443"),
        ("localhost:65535", "localhost", 65535, "localhost:65535"),
    ],
)
def test_listen_addresses(value: str, host: str, port: int, listen: str) -> None:
    settings = load_settings({"DINFER_LISTEN": value})
    assert (settings.listen_host, settings.listen_port, settings.listen) == (host, port, listen)


@pytest.mark.parametrize(
    "value", ["8000", ":8000", "::1:8000", "[::1]", "[::1]:", "[nothost]:80", "h:65536", "h:-1"]
)
def test_bad_listen_addresses(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^DINFER_LISTEN must be host:port"):
        load_settings({"DINFER_LISTEN": value})


@pytest.mark.parametrize("value", ["token", "open", "OPEN"])
def test_provider_auth_values(value: str) -> None:
    assert load_settings({"DINFER_PROVIDER_AUTH": value}).provider_auth == value.lower()


def test_unknown_provider_auth_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DINFER_PROVIDER_AUTH": "none"})
    assert str(caught.value) == "DINFER_PROVIDER_AUTH must be one of token, open, got 'none'"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DINFER_BREAKER_THRESHOLD", "x", "a positive integer"),
        ("DINFER_QUEUE_MAX", "0", "a positive integer"),
        ("DINFER_MAX_ATTEMPTS", "-3", "a positive integer"),
        ("DINFER_MAX_BODY_BYTES", "1.5", "a positive integer"),
        ("DINFER_QUEUE_TIMEOUT_S", "soon", "a positive number"),
        ("DINFER_HEARTBEAT_TIMEOUT_S", "0", "a positive number"),
        ("DINFER_CHALLENGE_INTERVAL_S", "-1", "a positive number"),
        ("DINFER_PREAMBLE_TIMEOUT_S", "inf", "a positive number"),
        ("DINFER_TTFT_BASE_S", "nan", "a positive number"),
        ("DINFER_SPECULATIVE_RATIO", "0", "a number in (0, 1]"),
        ("DINFER_SPECULATIVE_RATIO", "1.01", "a number in (0, 1]"),
        ("DINFER_SPECULATIVE_RATIO", "half", "a number in (0, 1]"),
        ("DINFER_HEDGE_MODE", "always", "one of learned, fixed, off"),
        ("DINFER_HEDGE_PERCENTILE", "49", "a percentile from 50 to 99.5"),
        ("DINFER_HEDGE_PERCENTILE", "99.9", "a percentile from 50 to 99.5"),
        ("DINFER_HEDGE_PERCENTILE", "p95", "a percentile from 50 to 99.5"),
        ("DINFER_HEDGE_MIN_MS", "0", "a positive number"),
        ("DINFER_HEDGE_BUDGET", "0", "a number in (0, 1]"),
        ("DINFER_HEDGE_BUDGET", "5%", "a number in (0, 1]"),
        ("DINFER_HEDGE_WINDOW_S", "-60", "a positive number"),
        ("DINFER_TOOLS_MIN_VERSION", "0.6.x", "a dot-separated version of integers"),
        ("DINFER_TOOLS_MIN_VERSION", "v1", "a dot-separated version of integers"),
        ("DINFER_LOG_LEVEL", "loud", "one of debug, info, warning, error, critical"),
    ],
)
def test_bad_values_name_their_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name} must be {expected}")
    assert message.endswith(f", got {value!r}")


def test_the_documented_example_message() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DINFER_BREAKER_THRESHOLD": "x"})
    assert str(caught.value) == "DINFER_BREAKER_THRESHOLD must be a positive integer, got 'x'"


def test_settings_are_frozen_and_replaceable() -> None:
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.queue_max = 3  # type: ignore[misc]
    changed = msgspec.structs.replace(settings, queue_max=3)
    assert (changed.queue_max, settings.queue_max) == (3, 10)


def test_unknown_variables_are_reported_not_fatal() -> None:
    env = {"DINFER_QUEU_MAX": "5", "DINFER_QUEUE_MAX": "5", "PATH": "/bin"}
    assert load_settings(env).queue_max == 5
    assert config.unknown_variables(env) == ["DINFER_QUEU_MAX"]


def test_describe_env_lists_every_variable_with_its_default() -> None:
    lines = [line for line in config.describe_env().splitlines() if not line.startswith(" ")]
    assert [line.split()[0] for line in lines] == [var.name for var in config.ENV_VARS]
    assert lines[0].split()[1] == "127.0.0.1:8000"
    assert "(unset)" in lines[2]


def test_module_docstring_documents_every_variable_and_default() -> None:
    rows = {
        line.split()[0]: line.split()[1]
        for line in (config.__doc__ or "").splitlines()
        if line.strip().startswith("DINFER_")
    }
    assert rows == {var.name: var.default or "(unset)" for var in config.ENV_VARS}


def test_the_readme_table_is_the_generated_one() -> None:
    """One table of variables: the README's copy is what `python -m daemon.config` prints."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- env-table:begin -->\n")[1].split("\n<!-- env-table:end -->")[0]
    assert block == config.markdown_table(), "run: .venv/bin/python -m daemon.config"


# The config file ------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dinfer.toml"
    path.write_text(text)
    return path


def test_every_setting_has_a_file_key_in_a_documented_table() -> None:
    keys = [var.file_key for var in config.ENV_VARS]
    assert len(set(keys)) == len(keys)
    assert {var.table for var in config.ENV_VARS} == set(config.TABLES)


def test_the_file_sets_values_and_a_variable_wins_over_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\nlisten = "[::1]:9000"\n[queue]\nmax = 4\ntimeout_s = 2.5\n'
        '[http]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/8"]\n',
    )
    settings = load_settings({"DINFER_QUEUE_MAX": "7"}, path)
    assert settings.listen == "[::1]:9000"
    assert (settings.queue_max, settings.queue_timeout_s) == (7, 2.5)
    assert [str(n) for n in settings.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8"]
    sources = {item.var.name: item.source for item in config.resolve({}, path)}
    assert sources["DINFER_QUEUE_MAX"] is config.Source.FILE
    assert sources["DINFER_LOG_LEVEL"] is config.Source.DEFAULT


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[queue]\nmax = 4\n\n[breaker]\nthreshold = 0\n", "line 5: [breaker] threshold must be "
         "a positive integer, got '0'"),
        ("[breaker]\nthreshhold = 3\n", "line 2: [breaker] threshhold: unknown key"),
        ("[brekaer]\nthreshold = 3\n", "line 2: [brekaer] threshold: unknown key"),
        ("[queue]\nmax = true\n", "line 2: [queue] max: expected a number or a string, got True"),
        ("[queue]\nmax = [1]\n", "[queue] max: expected a number or a string"),
        ("[queue\nmax = 1\n", "not valid TOML: Expected ']' at the end of a table declaration "
         "(at line 1, column 7)"),
        ("listen = 'x'\n", "'listen' is not a [table]"),
    ],
)  # fmt: skip
def test_a_bad_file_names_the_key_and_its_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings({}, path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings({}, tmp_path / "absent.toml")


def test_the_admin_key_may_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("s3cret\n")
    settings = load_settings({"DINFER_ADMIN_KEY_FILE": str(tmp_path / "key")})
    assert settings.admin_key == "s3cret"


def test_the_admin_key_may_come_from_a_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "admin_key").write_text("from-systemd")
    assert load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path)}).admin_key == "from-systemd"
    assert load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path / "none")}).admin_key is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DINFER_ADMIN_KEY": "a", "DINFER_ADMIN_KEY_FILE": "/k"}, "not both"),
        ({"DINFER_ADMIN_KEY_FILE": "/nonexistent/key"}, "cannot read the admin key file"),
    ],
)
def test_admin_key_file_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_an_empty_admin_key_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings({"DINFER_ADMIN_KEY_FILE": str(tmp_path / "key")})


def test_bad_trusted_proxies_name_their_variable() -> None:
    with pytest.raises(ConfigError, match=r"^DINFER_TRUSTED_PROXIES must be a list of CIDRs"):
        load_settings({"DINFER_TRUSTED_PROXIES": "10.0.0.0/8, nonsense"})


def test_a_reload_applies_live_changes_and_keeps_restart_only_ones() -> None:
    old = load_settings({})
    new = load_settings(
        {"DINFER_QUEUE_MAX": "3", "DINFER_LISTEN": "127.0.0.1:9", "DINFER_LOG_LEVEL": "debug"}
    )
    outcome = config.reload(old, new)
    assert outcome.changed == ("[queue] max", "[server] log_level")
    assert outcome.needs_restart == ("[server] listen",)
    assert outcome.settings.queue_max == 3
    assert outcome.settings.listen == old.listen
    assert config.reload(old, old) == config.Reload(old, (), ())
