"""Plain synchronous tests of Settings validation (trio_stream/config.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from trio_stream.config import Settings, is_loopback
from trio_stream.errors import ConfigError


def problems(**changes: Any) -> str:
    with pytest.raises(ConfigError) as info:
        Settings(**changes).validate()
    return str(info.value)


def test_defaults_are_valid() -> None:
    """The defaults of API.md section 1 validate, and validate() returns self."""
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
    """Boundary and combined values that API.md allows validate."""
    Settings(**changes).validate()
