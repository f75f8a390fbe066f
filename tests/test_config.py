"""Plain synchronous tests of Settings validation (trio_stream/config.py) and
of the ``serve`` options built from Settings (trio_stream/cli.py)."""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

import click
import pytest
from click.testing import CliRunner

from trio_stream import cli
from trio_stream.config import Settings, is_loopback
from trio_stream.errors import ConfigError


def problems(**changes: Any) -> str:
    with pytest.raises(ConfigError) as info:
        Settings(**changes).validate()
    return str(info.value)


def test_defaults_are_valid() -> None:
    """The defaults of docs/api.md section 1 validate, and validate() returns self."""
    settings = Settings()
    assert settings.validate() is settings
    assert (settings.host, settings.port, settings.upstream) == ("127.0.0.1", 8000, "mock")


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("port-negative", {"port": -1}, "--port"),
    ("port-too-big", {"port": 65536}, "--port"),
    ("upstream-unknown", {"upstream": "bard"}, "--upstream must be one of"),
    ("openai-without-url", {"upstream": "openai"}, "--upstream openai needs --upstream-url"),
    ("ollama-without-url", {"upstream": "ollama"}, "--upstream ollama needs --upstream-url"),
    ("url-scheme", {"upstream_url": "ftp://x"}, "--upstream-url must start with http"),
    ("empty-api-key", {"api_keys": ("",)}, "--api-key"),
    ("api-key-spaces", {"api_keys": (" k",)}, "--api-key"),
    ("certfile-alone", {"certfile": "c.pem"}, "--certfile and --keyfile"),
    ("keyfile-alone", {"keyfile": "k.pem"}, "--certfile and --keyfile"),
    ("log-format", {"log_format": "xml"}, "--log-format"),
    ("supersede-timeout", {"supersede_timeout": 0}, "--supersede-timeout must be > 0"),
    ("stall-timeout", {"stall_timeout": -1}, "--stall-timeout must be > 0"),
    ("ping-interval", {"ping_interval": 0}, "--ping-interval must be > 0"),
    ("graceful-timeout", {"graceful_timeout": 0}, "--graceful-timeout must be > 0"),
    ("run-ttl", {"run_ttl": float("nan")}, "--run-ttl must be > 0"),
    ("first-token-timeout", {"first_token_timeout": 0}, "--first-token-timeout must be > 0"),
    ("token-timeout", {"token_timeout": 0}, "--token-timeout must be > 0"),
    ("connect-timeout", {"connect_timeout": 0}, "--connect-timeout must be > 0"),
    ("save-timeout", {"save_timeout": 0}, "--save-timeout must be > 0"),
    ("body-timeout", {"body_timeout": 0}, "--body-timeout must be > 0"),
    ("body-timeout-negative", {"body_timeout": -1.5}, "--body-timeout must be > 0"),
    ("mock-delay", {"mock_delay_ms": -1}, "--mock-delay-ms must be >= 0"),
    ("max-streams", {"max_streams": 0}, "--max-streams"),
    ("max-body-bytes", {"max_body_bytes": 0}, "--max-body-bytes"),
    ("window", {"window": 0}, "--window"),
]


@pytest.mark.parametrize(
    ("changes", "fragment"), [row[1:] for row in INVALID], ids=[row[0] for row in INVALID]
)
def test_each_invalid_option_is_named(changes: dict[str, Any], fragment: str) -> None:
    """validate() raises ConfigError naming the invalid option."""
    assert fragment in problems(**changes)


def test_every_problem_is_reported_at_once() -> None:
    """All invalid options are named in one ConfigError, not just the first."""
    message = problems(port=-1, log_format="xml", window=0, host="0.0.0.0")
    for fragment in ("--port", "--log-format", "--window", "without an API key"):
        assert fragment in message
    assert message.count(";") == 3


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "::", "10.0.0.1", "example.com", "", "[::]"],
    ids=["any-v4", "any-v6", "private", "hostname", "empty", "bracketed-any-v6"],
)
def test_non_loopback_host_without_api_key_is_refused(host: str) -> None:
    """Open access is refused unless the bind address is loopback; an API key
    makes the same host acceptable."""
    assert "refusing to serve" in problems(host=host)
    Settings(host=host, api_keys=("k",)).validate()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.1", False),
        ("localhost.example.com", False),
        ("mylocalhost", False),
        ("", False),
        ("not an address", False),
    ],
    ids=lambda v: repr(v) if isinstance(v, str) else None,
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    """is_loopback: all of 127/8, ::1 (bare or bracketed) and the name
    localhost; nothing else, not even names that contain "localhost"."""
    assert is_loopback(host) is loopback
    if loopback:
        Settings(host=host).validate()


def test_settings_are_frozen() -> None:
    """Settings cannot change after creation; replace() makes a new object."""
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    other = settings.replace(port=0)
    assert (settings.port, other.port) == (8000, 0)


@pytest.mark.parametrize(
    "changes",
    [
        {"port": 0},
        {"port": 65535},
        {"upstream": "openai", "upstream_url": "http://127.0.0.1:9/v1"},
        {"upstream": "ollama", "upstream_url": "https://h:11434"},
        {"certfile": "c.pem", "keyfile": "k.pem"},
        {"mock_delay_ms": 0},
        {"log_format": "json"},
        {"host": "0.0.0.0", "api_keys": ("a", "b")},
    ],
    ids=["port-0", "port-max", "openai", "ollama", "tls", "mock-delay-0", "json-logs", "keys"],
)
def test_valid_settings(changes: dict[str, Any]) -> None:
    """Boundary and combined values that docs/api.md allows validate."""
    Settings(**changes).validate()


# -- the command line, built from Settings -----------------------------------------

#: The fields with a command-line option (``upstreams`` is set only by the
#: configuration file: tests/test_config_file.py).
FIELDS = [f for f in dataclasses.fields(Settings) if "cli" in f.metadata]


def options() -> dict[str, click.Option]:
    """``serve``'s options by the Settings field they set."""
    return {p.name: p for p in cli.serve.params if isinstance(p, click.Option) and p.name}


def parse(*args: str) -> Settings:
    """The Settings ``trio-stream serve ARGS`` would run with (nothing is served)."""
    ctx = cli.serve.make_context("serve", list(args))
    return cli.settings_from(ctx.params)


@pytest.fixture(autouse=True)
def no_trio_stream_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own environment never reaches the options under test."""
    for name in list(os.environ):
        if name.startswith("TRIO_STREAM_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_every_setting_has_an_option_with_its_default(field: dataclasses.Field[Any]) -> None:
    """Each Settings field has exactly one serve option, which sets it, whose
    default is the field's default and which has help text: the command line
    and Settings cannot drift apart."""
    option = options()[field.name]
    assert option.default == field.default
    assert option.help


def test_every_option_sets_a_setting() -> None:
    """serve has no option that is not a Settings field, and no two options
    set the same field."""
    assert sorted(p.name or "" for p in cli.serve.params) == sorted(f.name for f in FIELDS)


def test_no_arguments_give_the_default_settings() -> None:
    """``trio-stream serve`` with no argument and no environment runs
    exactly Settings()."""
    assert parse() == Settings()


#: ``--config`` names a file that is read at once: tests/test_config_file.py.
ONE_VALUE = [f for f in FIELDS if f.name not in ("api_keys", "config")]
SAMPLES: dict[type, tuple[str, Any]] = {
    str: ("sample", "sample"), int: ("7", 7), float: ("2.5", 2.5), bool: ("false", False),
}  # fmt: skip


@pytest.mark.parametrize("field", ONE_VALUE, ids=[f.name for f in ONE_VALUE])
def test_every_option_reads_its_environment_variable(
    field: dataclasses.Field[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRIO_STREAM_<FIELD_NAME> sets each option whose flag is absent, as
    the option's own type (the keys are tested below)."""
    hint = typing.get_type_hints(Settings)[field.name]
    base = next(t for t in (*typing.get_args(hint), hint) if t in SAMPLES)
    choices = field.metadata["cli"].choices
    raw, expected = (choices[-1], choices[-1]) if choices else SAMPLES[base]
    if field.default is False:  # an option that is off by default (--otel)
        raw, expected = "true", True
    assert expected != field.default
    monkeypatch.setenv(f"TRIO_STREAM_{field.name.upper()}", raw)
    assert cli.serve.make_context("serve", []).params[field.name] == expected


def test_api_keys_from_flags_and_environment_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """--api-key is repeatable, and TRIO_STREAM_API_KEYS=k1,k2 adds its keys."""
    monkeypatch.setenv("TRIO_STREAM_API_KEYS", "k1,k2")
    assert parse("--api-key", "a", "--api-key", "b").api_keys == ("a", "b", "k1", "k2")


def test_coalesce_switches_off() -> None:
    """--coalesce is on by default; --no-coalesce turns it off."""
    assert parse().coalesce is True
    assert parse("--no-coalesce").coalesce is False


def test_body_timeout_option() -> None:
    """--body-timeout sets Settings.body_timeout (default 30 s); 0 is refused."""
    assert Settings().body_timeout == 30.0
    assert parse("--body-timeout", "4.5").body_timeout == 4.5
    with pytest.raises(ConfigError, match="--body-timeout must be > 0"):
        parse("--body-timeout", "0")


def test_help_shows_every_default() -> None:
    """``trio-stream serve --help`` works and shows, for every option with a
    default, that default (the Settings one)."""
    result = CliRunner().invoke(cli.main, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    assert "--body-timeout" in result.output
    ctx = click.Context(cli.serve)
    for field in FIELDS:
        record = options()[field.name].get_help_record(ctx)
        assert record is not None
        if field.default not in (None, ()):
            shown = field.name if field.default is True else field.default
            if field.default is False:  # an option off by default (--otel/--no-otel)
                shown = f"no-{field.name}"
            assert f"[default: {shown}]" in record[1], record


def test_invalid_options_are_a_usage_error() -> None:
    """An invalid setting on the command line exits 2, naming the option,
    before anything is served."""
    result = CliRunner().invoke(cli.main, ["serve", "--window", "0", "--port", "-1"])
    assert result.exit_code == 2
    assert "--window" in result.output
    assert "--port" in result.output
