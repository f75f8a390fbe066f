"""``trio-stream load``: the load generator's command line (docs/api.md section 1.2).

A thin wrapper: options -> :class:`~trio_stream.load.plan.LoadConfig` ->
:func:`~trio_stream.load.runner.run_load` -> a rich table (stdout) and, with
``--json PATH``, the same report as JSON.  Exit status 1 when the integrity
check found a lost, duplicated, reordered or foreign token.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import click
import orjson
import trio
from rich.console import Console
from rich.live import Live

from .display import Progress, report_table
from .plan import SCENARIOS, LoadConfig
from .runner import run_load


@click.command()
@click.option(
    "--url",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="The server: http://host:port (h2c with --http2) or https://host:port.",
)
@click.option("--api-key", default=None, help="Sent as 'Authorization: Bearer'.")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Units of work in flight at once.",
)
@click.option(
    "--requests",
    "-n",
    type=click.IntRange(min=1),
    default=None,
    help="Requests to make (default 100 unless --duration is given).",
)
@click.option(
    "--duration",
    "-d",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds during which new requests start.",
)
@click.option("--scenario", type=click.Choice(SCENARIOS), default="steady", show_default=True)
@click.option(
    "--http2", is_flag=True, help="HTTP/2: h2c prior knowledge, or TLS+ALPN h2 with an https URL."
)
@click.option("--insecure", is_flag=True, help="Do not verify the server's TLS certificate.")
@click.option("--max-tokens", type=click.IntRange(1, 1_000_000), default=64, show_default=True)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report as JSON to this file.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seeds every random choice (disconnect points, the mix).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds one unit of work may take.",
)
@click.option(
    "--quiet", "-q", is_flag=True, help="No live display (also off when stderr is not a terminal)."
)
def load(json_path: Path | None, quiet: bool, **options: Any) -> None:
    """Load a trio-stream (or any OpenAI-compatible SSE) server and report."""  # fmt: skip
    try:
        config = LoadConfig(**options).validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    live_on = not quiet and sys.stderr.isatty()
    err = Console(stderr=True)
    live = Live(console=err, auto_refresh=False, transient=True)
    progress = Progress(live, config.request_limit, config.duration) if live_on else None
    try:
        with live if live_on else nullcontext():
            report = trio.run(partial(run_load, config, on_progress=progress))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    Console().print(report_table(report))
    if json_path is not None:
        json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    i = report["integrity"]
    if i["lost"] or i["duplicated"] or i["reordered"] or i["foreign"]:
        sys.exit(1)
