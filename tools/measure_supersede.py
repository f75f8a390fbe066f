"""Measure how long a supersede takes, and what it costs the new prompt.

Runs an in-process trio-stream server (mock upstream) on 127.0.0.1 and, for
each try:

1. sends prompt A in a fresh session and reads it until its first token, so
   A is mid-stream;
2. sends prompt B in the same session, which supersedes A;
3. sends prompt C in another fresh session (no predecessor), for comparison.

It reports:

* **supersede latency**: from B's arrival at the server (its ``stream_start``
  log line) to A's cleanup finished (A's ``prev_stream_finished_cleanly``
  line), both stamped with the server's trio clock by a wrapping log sink;
* **time to first token** of B and of C, from sending the request to
  receiving its first content event, on the client.

Usage::

    .venv/bin/python tools/measure_supersede.py --tries 200
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import orjson
import trio

from trio_stream import EventLogger, Settings, open_service, serve_service
from trio_stream.wire.sse import SSEDecoder


@dataclass
class TimedSink:
    """Keeps every log record with the trio time it was written."""

    records: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, record: dict[str, Any]) -> None:
        self.records.append((trio.current_time(), record))

    def time_of(self, event: str, trace: str) -> float:
        for at, record in self.records:
            if record["event"] == event and record.get("trace") == trace:
                return at
        raise LookupError(f"no {event} line for {trace}")

    def count(self, event: str) -> int:
        return sum(1 for _, r in self.records if r["event"] == event)


@dataclass
class Stream:
    """One streaming request, read to its end; ``first_token`` is set on the
    first content event, ``superseded_at`` when its superseded error arrives."""

    sent: float = 0.0
    first_token_at: float = 0.0
    superseded_at: float = 0.0
    run_id: str = ""
    first_token: trio.Event = field(default_factory=trio.Event)


async def stream(
    client: httpx.AsyncClient, prompt: str, session: str, max_tokens: int, out: Stream
) -> None:
    body = {
        "model": "m", "stream": True, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }  # fmt: skip
    out.sent = trio.current_time()
    headers = {"x-session-id": session}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        out.run_id = r.headers["x-run-id"]
        decoder = SSEDecoder()
        async for raw in r.aiter_bytes():
            for event in decoder.feed(raw):
                if not out.first_token.is_set() and '"content"' in event.data:
                    out.first_token_at = trio.current_time()
                    out.first_token.set()
                if '"superseded"' in event.data and not out.superseded_at:
                    out.superseded_at = trio.current_time()


@dataclass
class Results:
    latency: list[float] = field(default_factory=list)
    ttft_successor: list[float] = field(default_factory=list)
    ttft_fresh: list[float] = field(default_factory=list)


A_TOKENS = 1000  # A is long: it is always still running when B arrives


async def one_try(
    client: httpx.AsyncClient, sink: TimedSink, n: int, tokens: int, results: Results
) -> None:
    a, b, c = Stream(), Stream(), Stream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream, client, f"A {n}", f"measure-{n}", A_TOKENS, a)
        await a.first_token.wait()  # A is mid-stream
        await stream(client, f"B {n}", f"measure-{n}", tokens, b)
    await stream(client, f"C {n}", f"fresh-{n}", tokens, c)
    arrived = sink.time_of("stream_start", b.run_id)
    results.latency.append(sink.time_of("prev_stream_finished_cleanly", a.run_id) - arrived)
    results.ttft_successor.append(b.first_token_at - b.sent)
    results.ttft_fresh.append(c.first_token_at - c.sent)


async def measure(settings: Settings, tries: int, tokens: int) -> tuple[Results, TimedSink]:
    sink = TimedSink()
    logger = EventLogger("text", sink=sink, stream=io.StringIO())
    results = Results()
    async with open_service(settings, logger=logger) as service, trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_service, service))
        limits = httpx.Limits(max_keepalive_connections=4)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits
        ) as client:
            for n in range(tries):
                await one_try(client, sink, n, tokens, results)
        nursery.cancel_scope.cancel()
    return results, sink


def ms(values: list[float], how: str) -> str:
    value = statistics.median(values) if how == "median" else max(values)
    return f"{value * 1000:8.3f} ms"


def report(results: Results, sink: TimedSink, args: argparse.Namespace) -> dict[str, Any]:
    rows = [
        ("supersede latency (B arrives -> A cleaned up)", results.latency),
        ("TTFT of B (superseded a running A)", results.ttft_successor),
        ("TTFT of C (no predecessor)", results.ttft_fresh),
    ]
    print(f"{args.tries} tries, mock delay {args.mock_delay_ms} ms/token, "
          f"--supersede-timeout {args.supersede_timeout} s")  # fmt: skip
    print(f"{'':48} {'median':>11} {'max':>11}")
    for label, values in rows:
        print(f"{label:48} {ms(values, 'median')} {ms(values, 'max')}")
    extra = statistics.median(results.ttft_successor) - statistics.median(results.ttft_fresh)
    print(f"B's median TTFT minus C's: {extra * 1000:.3f} ms")
    timeouts = sink.count("prev_stream_timeout_on_cancel")
    print(f"prev_stream_finished_cleanly: {sink.count('prev_stream_finished_cleanly')}, "
          f"prev_stream_timeout_on_cancel: {timeouts}")  # fmt: skip
    return {
        "tries": args.tries,
        "mock_delay_ms": args.mock_delay_ms,
        "latency_s": results.latency,
        "ttft_successor_s": results.ttft_successor,
        "ttft_fresh_s": results.ttft_fresh,
        "timeouts": timeouts,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tries", type=int, default=200, help="A/B pairs to measure")
    parser.add_argument("--mock-delay-ms", type=float, default=20.0, help="mock gap per token")
    parser.add_argument("--max-tokens", type=int, default=4, help="length of B and C")
    parser.add_argument("--supersede-timeout", type=float, default=2.0)
    parser.add_argument("--json", dest="json_path", help="also write the raw figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        port=0, db=":memory:", mock_delay_ms=args.mock_delay_ms,
        supersede_timeout=args.supersede_timeout,
    )  # fmt: skip
    results, sink = trio.run(measure, settings, args.tries, args.max_tokens)
    figures = report(results, sink, args)
    if args.json_path:
        with open(args.json_path, "wb") as f:
            f.write(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 1 if figures["timeouts"] else 0


if __name__ == "__main__":
    sys.exit(main())
