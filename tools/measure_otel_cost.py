"""What tracing (``--otel``) costs per request, without the noise of a whole server.

Runs the tracing calls one proxied request makes -- the server span around
a dispatch that sends a head and two body messages, a run span opened,
made current and ended with its attributes, one attempt span with its
``traceparent``, the subscriber's link, and the run's events (``first_token``,
``save``) -- ``--requests`` times in one trio task, with tracing off (the
no-op seam), and on at the given sampling ratios, exporting OTLP/HTTP to
``tools/otlp_sink.py`` in its own process.  The CPU is this process's, all
threads: ``time.process_time`` from the first request to the end of the
export of the last span (``force_flush``), with a queue that drops nothing.

    .venv/bin/python tools/measure_otel_cost.py --requests 20000

Per token, at ``--tokens`` tokens per request (60: bench.py's ``proxy100``):
the per-request cost divided by them, and set against ``--token-us``, the
server's CPU per proxied token without tracing (bench.py ``proxy100``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import trio

from tools.bench import ROOT, free_port, kill_group
from trio_stream.metrics import Metrics
from trio_stream.tracing import NO_SPAN, NO_TRACING, Span, Tracing
from trio_stream.tracing.otel import OTelTracing

SCOPE: dict[str, Any] = {
    "type": "http", "method": "POST", "path": "/v1/chat/completions", "http_version": "1.1",
    "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
}  # fmt: skip


async def _send(message: dict[str, Any]) -> None:
    return None


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _request(tracing: Tracing) -> Any:
    """One request's tracing calls, guarded as http/ and runs/ guard them
    (attributes are built only with tracing on)."""
    on = tracing.enabled

    async def dispatch(scope: Any, receive: Any, send: Any) -> None:
        run: Span = NO_SPAN
        if on:
            run = tracing.run({"trio_stream.run.id": "run_x", "gen_ai.request.model": "m"})
        tracing.subscribe(run)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        with run.use():
            attempt: Span = NO_SPAN
            if on:
                attempt = tracing.attempt(run, {"gen_ai.request.model": "m", "gen_ai.system": "x"})
            _ = attempt.traceparent
            run.event("first_token", {"trio_stream.upstream.member": "default"})
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
            if on:
                attempt.set({"gen_ai.usage.output_tokens": 60, "trio_stream.attempt.outcome": "s"})
                attempt.end("ok")
            run.event("save", {"trio_stream.save": "saved", "reason": "stop"})
            if on:
                run.set({"trio_stream.run.status": "completed", "gen_ai.usage.output_tokens": 60})
                run.end("ok")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return tracing.serve(SCOPE, _receive, _send, dispatch, "/v1/chat/completions")


async def _measure(tracing: Tracing, requests: int) -> float:
    for _ in range(min(requests, 500)):  # warm up
        await _request(tracing)
    if isinstance(tracing, OTelTracing):
        tracing.processor.force_flush()
    began = time.process_time()
    for _ in range(requests):
        await _request(tracing)
    if isinstance(tracing, OTelTracing):  # the export of these spans is their cost too
        tracing.processor.force_flush()
    return (time.process_time() - began) / requests * 1e6


def _tracing(ratio: float | None, endpoint: str) -> Tracing:
    if ratio is None:
        return NO_TRACING
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
    os.environ["OTEL_TRACES_SAMPLER_ARG"] = f"{ratio:g}"
    # Every span of the window is kept and exported (a server's queue drains
    # between requests; this loop makes them faster than any export).
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(3 * 30000)
    return OTelTracing(Metrics())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000, help="at most 30000")
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--token-us", type=float, default=120.0)
    parser.add_argument("--ratios", default="1,0.01")
    args = parser.parse_args()
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "otlp_sink.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(0.5)
        endpoint = f"http://127.0.0.1:{port}"
        rows: list[tuple[str, float]] = []
        for ratio in [None, *(float(r) for r in args.ratios.split(","))]:
            tracing = _tracing(ratio, endpoint)
            us = trio.run(_measure, tracing, args.requests)
            trio.run(tracing.aclose)
            rows.append(("off" if ratio is None else f"on, sampling {ratio:g}", us))
    finally:
        kill_group(sink, grace=1.0)
    off = rows[0][1]
    print(f"{'tracing':<20} {'µs/request':>11} {'added µs/request':>17} "
          f"{'added µs/token':>15} {'% of ' + str(args.token_us) + ' µs/token':>20}")  # fmt: skip
    for name, us in rows:
        added = us - off
        per_token = added / args.tokens
        print(f"{name:<20} {us:>11.1f} {added:>17.1f} {per_token:>15.2f} "
              f"{100 * per_token / args.token_us:>19.2f}%")  # fmt: skip


if __name__ == "__main__":
    main()
