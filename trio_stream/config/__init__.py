"""Settings: every option of ``trio-stream serve`` (docs/api.md section 1), validated.

:class:`Settings` is what embedders build (``Settings(port=0, ...)``) and what
the command line produces.  It is frozen: nothing changes it after start.

Each field is also the one definition of its command-line option: its default,
and (in ``metadata["cli"]``, a :class:`CLI`) its help text, choices and flag.
:mod:`trio_stream.cli` builds ``--<field-name>`` (env ``TRIO_STREAM_<FIELD_NAME>``)
from it, so an option and its setting cannot drift apart.

The upstream members (``[[upstream]]`` tables of a configuration file, or the
one-upstream shorthand ``--upstream``/``--upstream-url``) are in
:mod:`.members`; the configuration file (``--config``) is read by :mod:`.file`.

This package never imports trio.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .members import Upstreams, shorthand
from .members import problems as member_problems

UPSTREAMS = ("mock", "openai", "ollama")
LOG_FORMATS = ("text", "json")
OUTAGE = ("closed", "open")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def otel_installed() -> bool:
    """Is the ``otel`` extra (the SDK and its OTLP/HTTP exporter) installed?
    Asked only with ``--otel``; finds the modules without importing them."""
    try:
        names = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
        return all(importlib.util.find_spec(name) is not None for name in names)
    except ModuleNotFoundError:  # not even the ``opentelemetry`` namespace
        return False


@dataclass(frozen=True, slots=True)
class CLI:
    """How a :class:`Settings` field appears on the command line."""

    help: str
    choices: tuple[str, ...] = ()  # the only values allowed, if any
    flag: str = ""  # the option's name when it is not the field's (``api-key``)


def setting(default: Any, help: str, *, choices: tuple[str, ...] = (), flag: str = "") -> Any:
    """A :class:`Settings` field: its default, and its command-line option."""
    return dataclasses.field(default=default, metadata={"cli": CLI(help, choices, flag)})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = setting("127.0.0.1", "Bind address.")
    port: int = setting(8000, "Bind port (0 picks a free port and logs it).")
    upstream: str = setting("mock", "Where completions come from.", choices=UPSTREAMS)
    upstream_url: str | None = setting(
        None, "Base URL: http://host:port/v1 (openai), http://host:11434 (ollama)."
    )
    upstream_api_key: str | None = setting(
        None, "Sent as 'Authorization: Bearer' to an openai upstream."
    )
    api_keys: tuple[str, ...] = setting(
        (), "Accepted client key (repeatable; env TRIO_STREAM_API_KEYS=k1,k2).", flag="api-key"
    )
    db: str = setting(
        "trio-stream.db",
        "Saved messages: a SQLite file (':memory:' allowed) or a postgresql:// URL.",
    )
    certfile: str | None = setting(None, "TLS certificate; HTTP/2 is then offered by ALPN.")
    keyfile: str | None = setting(None, "TLS private key.")
    supersede_timeout: float = setting(
        2.0, "Seconds a new request waits for the previous run's cleanup."
    )
    stall_timeout: float = setting(30.0, "Seconds a client may refuse data before it is cut.")
    ping_interval: float = setting(15.0, "Seconds of silence before ': ping'.")
    graceful_timeout: float = setting(10.0, "Seconds running streams get after SIGTERM/SIGINT.")
    run_ttl: float = setting(300.0, "Seconds a finished detached run stays resumable.")
    max_streams: int = setting(10000, "Concurrent client streams; beyond it 429.")
    max_body_bytes: int = setting(1_048_576, "Request bodies beyond it get 413.")
    mock_delay_ms: float = setting(20.0, "The mock upstream's gap between tokens.")
    log_format: str = setting("text", "text or json, on stderr.", choices=LOG_FORMATS)
    # Options beyond docs/api.md section 1 (documented in README and docs/design.md).
    first_token_timeout: float = setting(
        60.0, "Seconds the upstream may take to its first token (then 504)."
    )
    token_timeout: float = setting(
        60.0, "Seconds of upstream silence mid-stream before the run fails."
    )
    connect_timeout: float = setting(10.0, "Seconds to connect to the upstream (then 502).")
    save_timeout: float = setting(5.0, "Deadline of a run's shielded save.")
    coalesce: bool = setting(
        True, "Merge queued deltas into one event when the client falls behind."
    )
    event_interval_ms: float = setting(
        0.0,
        "Milliseconds after each event during which arriving deltas are held and "
        "merged into the next event (0: send each as it comes).",
    )
    window: int = setting(64, "Deltas an attached run may read ahead of its slowest writer.")
    body_timeout: float = setting(
        30.0,
        "Seconds a client may take to send its whole request body; "
        "past it 408 and the connection closes.",
    )
    # Cluster mode (docs/api.md section 7).
    workers: int = setting(
        1, "Worker processes on one listening socket (more than 1 needs --redis)."
    )
    redis: str | None = setting(
        None, "redis://host:port/db: shared state for cluster mode (none: in-process)."
    )
    node_lease: float = setting(10.0, "Seconds after which a silent node's runs are taken over.")
    # Per-key limits (docs/api.md section 2.11).
    limits_redis: str | None = setting(
        None, "redis://host:port/db for the per-key limits alone (default: --redis)."
    )
    limits_on_outage: str = setting(
        "closed",
        "With --redis unreachable, requests of limited keys are refused (closed: 503) "
        "or admitted unchecked (open).",
        choices=OUTAGE,
    )
    # Traces (docs/api.md section 10): OpenTelemetry, configured by the OTEL_* variables.
    otel: bool = setting(
        False,
        "Export OpenTelemetry traces over OTLP/HTTP (needs the 'otel' extra; configured by "
        "the OTEL_* environment variables).",
    )
    # The configuration file (docs/api.md section 1.3).
    config: str | None = setting(
        None,
        'A TOML file: [[upstream]] members, [group."<model>"] options, [[key]] client keys '
        "with their limits (SIGHUP reloads them) and a [serve] table of these options (the "
        "command line and the environment win over it).",
    )
    # No command-line option: only the file's [[upstream]] and [group] tables (or
    # an embedder) set it; None is the shorthand of --upstream/--upstream-url.
    upstreams: Upstreams | None = dataclasses.field(default=None, metadata={"file": True})

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def members(self) -> Upstreams:
        """The upstream members: the file's, or the one of the shorthand."""
        if self.upstreams is not None:
            return self.upstreams
        return shorthand(self.upstream, self.upstream_url, self.upstream_api_key)

    def validate(self) -> Settings:
        """Raise :class:`ConfigError` naming every invalid option; return self."""
        problems = list(self._problems())
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def _problems(self) -> list[str]:
        p: list[str] = []
        if not 0 <= self.port <= 65535:
            p.append("--port must be 0-65535")
        if self.upstream not in UPSTREAMS:
            p.append(f"--upstream must be one of {', '.join(UPSTREAMS)}")
        if self.upstream != "mock" and not self.upstream_url and self.upstreams is None:
            p.append(f"--upstream {self.upstream} needs --upstream-url")
        if self.upstream_url and not self.upstream_url.startswith(("http://", "https://")):
            p.append("--upstream-url must start with http:// or https://")
        if not self.api_keys and not self.config and not is_loopback(self.host):
            p.append(
                f"refusing to serve {self.host} without an API key: "
                "pass --api-key or bind a loopback address"
            )
        if any(not k or k != k.strip() for k in self.api_keys):
            p.append("--api-key values must be non-empty, without surrounding spaces")
        if bool(self.certfile) != bool(self.keyfile):
            p.append("--certfile and --keyfile go together")
        if self.limits_on_outage not in OUTAGE:
            p.append("--limits-on-outage must be closed or open")
        if self.log_format not in LOG_FORMATS:
            p.append("--log-format must be text or json")
        for name in (
            "supersede_timeout", "stall_timeout", "ping_interval", "graceful_timeout",
            "run_ttl", "first_token_timeout", "token_timeout", "connect_timeout", "save_timeout",
            "body_timeout", "node_lease",
        ):  # fmt: skip
            if not getattr(self, name) > 0:
                p.append(f"--{name.replace('_', '-')} must be > 0")
        if self.otel and not otel_installed():
            p.append("--otel needs the OpenTelemetry SDK: pip install 'trio-stream[otel]'")
        if self.workers < 1:
            p.append("--workers must be >= 1")
        if self.workers > 1 and not self.redis:
            p.append(
                f"--workers {self.workers} needs --redis: workers share sessions, runs, "
                "stop and resume only through it"
            )
        if self.redis and not self.redis.startswith(("redis://", "rediss://", "unix://")):
            p.append("--redis must be a redis://, rediss:// or unix:// URL")
        if self.limits_redis and not self.limits_redis.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            p.append("--limits-redis must be a redis://, rediss:// or unix:// URL")
        if self.mock_delay_ms < 0:
            p.append("--mock-delay-ms must be >= 0")
        if not self.event_interval_ms >= 0:  # also refuses NaN
            p.append("--event-interval-ms must be >= 0")
        if self.max_streams < 1 or self.max_body_bytes < 1 or self.window < 1:
            p.append("--max-streams, --max-body-bytes and --window must be >= 1")
        if self.upstreams is not None:
            if self.upstream != "mock" or self.upstream_url or self.upstream_api_key:
                p.append(
                    "--upstream, --upstream-url and --upstream-api-key are the one-upstream "
                    "shorthand: with [[upstream]] tables leave them unset"
                )
            where = f"{self.config}: " if self.config else ""
            p.extend(f"{where}{key}: {message}" for key, message in member_problems(self.upstreams))
        return p
