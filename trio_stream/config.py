"""Settings: every option of ``trio-stream serve`` (API.md section 1), validated.

:class:`Settings` is what embedders build (``Settings(port=0, ...)``) and what
the command line produces.  It is frozen: nothing changes it after start.

This module never imports trio.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass

from .errors import ConfigError

UPSTREAMS = ("mock", "openai", "ollama")
LOG_FORMATS = ("text", "json")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    upstream: str = "mock"
    upstream_url: str | None = None
    upstream_api_key: str | None = None
    api_keys: tuple[str, ...] = ()
    db: str = "trio-stream.db"
    certfile: str | None = None
    keyfile: str | None = None
    supersede_timeout: float = 2.0
    stall_timeout: float = 30.0
    ping_interval: float = 15.0
    graceful_timeout: float = 10.0
    run_ttl: float = 300.0
    max_streams: int = 10000
    max_body_bytes: int = 1_048_576
    mock_delay_ms: float = 20.0
    log_format: str = "text"
    # Options beyond API.md section 1 (documented in README and docs/design.md).
    first_token_timeout: float = 60.0
    token_timeout: float = 60.0
    connect_timeout: float = 10.0
    save_timeout: float = 5.0
    coalesce: bool = True
    window: int = 64

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

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
        if self.upstream != "mock" and not self.upstream_url:
            p.append(f"--upstream {self.upstream} needs --upstream-url")
        if self.upstream_url and not self.upstream_url.startswith(("http://", "https://")):
            p.append("--upstream-url must start with http:// or https://")
        if not self.api_keys and not is_loopback(self.host):
            p.append(
                f"refusing to serve {self.host} without an API key: "
                "pass --api-key or bind a loopback address"
            )
        if any(not k or k != k.strip() for k in self.api_keys):
            p.append("--api-key values must be non-empty, without surrounding spaces")
        if bool(self.certfile) != bool(self.keyfile):
            p.append("--certfile and --keyfile go together")
        if self.log_format not in LOG_FORMATS:
            p.append("--log-format must be text or json")
        for name in (
            "supersede_timeout", "stall_timeout", "ping_interval", "graceful_timeout",
            "run_ttl", "first_token_timeout", "token_timeout", "connect_timeout", "save_timeout",
        ):  # fmt: skip
            if not getattr(self, name) > 0:
                p.append(f"--{name.replace('_', '-')} must be > 0")
        if self.mock_delay_ms < 0:
            p.append("--mock-delay-ms must be >= 0")
        if self.max_streams < 1 or self.max_body_bytes < 1 or self.window < 1:
            p.append("--max-streams, --max-body-bytes and --window must be >= 1")
        return p
