"""The ``trio-stream`` command line (API.md section 1)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import trio

from .config import LOG_FORMATS, UPSTREAMS, Settings
from .errors import ConfigError


def _env(name: str) -> str:
    return "TRIO_STREAM_" + name.upper().replace("-", "_")


F = TypeVar("F", bound=Callable[..., Any])


def _option(name: str, type_: Any, default: Any, help_: str, **kw: Any) -> Callable[[F], F]:
    return click.option(
        f"--{name}", type=type_, default=default, envvar=_env(name), show_default=True,
        help=help_, **kw,
    )  # fmt: skip


@click.group()
@click.version_option(package_name="trio-stream")
def main() -> None:
    """trio-stream: leak-free OpenAI-compatible SSE streaming on Trio."""


@main.command()
@_option("host", str, "127.0.0.1", "Bind address.")
@_option("port", int, 8000, "Bind port (0 picks a free port and logs it).")
@_option("upstream", click.Choice(UPSTREAMS), "mock", "Where completions come from.")
@_option(
    "upstream-url", str, None, "Base URL: http://host:port/v1 (openai), http://host:11434 (ollama)."
)
@_option("upstream-api-key", str, None, "Sent as 'Authorization: Bearer' to an openai upstream.")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="Accepted client key (repeatable; env TRIO_STREAM_API_KEYS=k1,k2).",
)
@_option("db", str, "trio-stream.db", "SQLite file for saved messages (':memory:' allowed).")
@_option("certfile", str, None, "TLS certificate; HTTP/2 is then offered by ALPN.")
@_option("keyfile", str, None, "TLS private key.")
@_option(
    "supersede-timeout", float, 2.0, "Seconds a new request waits for the previous run's cleanup."
)
@_option("stall-timeout", float, 30.0, "Seconds a client may refuse data before it is cut.")
@_option("ping-interval", float, 15.0, "Seconds of silence before ': ping'.")
@_option("graceful-timeout", float, 10.0, "Seconds running streams get after SIGTERM/SIGINT.")
@_option("run-ttl", float, 300.0, "Seconds a finished detached run stays resumable.")
@_option("max-streams", int, 10000, "Concurrent client streams; beyond it 429.")
@_option("max-body-bytes", int, 1_048_576, "Request bodies beyond it get 413.")
@_option("mock-delay-ms", float, 20.0, "The mock upstream's gap between tokens.")
@_option("log-format", click.Choice(LOG_FORMATS), "text", "text or json, on stderr.")
@_option(
    "first-token-timeout",
    float,
    60.0,
    "Seconds the upstream may take to its first token (then 504).",
)
@_option(
    "token-timeout", float, 60.0, "Seconds of upstream silence mid-stream before the run fails."
)
@_option("connect-timeout", float, 10.0, "Seconds to connect to the upstream (then 502).")
@_option("save-timeout", float, 5.0, "Deadline of a run's shielded save.")
@_option("window", int, 64, "Deltas an attached run may read ahead of its slowest writer.")
@click.option(
    "--coalesce/--no-coalesce",
    default=True,
    envvar=_env("coalesce"),
    show_default=True,
    help="Merge queued deltas into one event when the client falls behind.",
)
def serve(**options: Any) -> None:
    """Run the server (hypercorn trio worker, quart-trio app)."""
    keys = tuple(options.pop("api_keys") or ())
    env_keys = os.environ.get("TRIO_STREAM_API_KEYS", "")
    keys += tuple(k.strip() for k in env_keys.split(",") if k.strip())
    try:
        settings = Settings(api_keys=keys, **options).validate()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    trio.run(_serve_until_signal, settings)


async def _serve_until_signal(settings: Settings) -> None:
    from .server import serve as serve_

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    shutdown.set()

        nursery.start_soon(on_signal)
        await serve_(settings, shutdown=shutdown)
        nursery.cancel_scope.cancel()


def _register_load() -> None:
    try:
        from .load.cli import load
    except ImportError:  # pragma: no cover - the load generator is optional
        return
    main.add_command(load)


_register_load()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
