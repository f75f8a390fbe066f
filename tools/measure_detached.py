"""Measure two figures of detached runs: memory per buffered token, and resume latency.

Everything runs in one process under ``trio.run``, on the built-in mock
upstream.

Memory (``--runs N --tokens T``)::

    .venv/bin/python -m tools.measure_detached memory --runs 200 --tokens 500

creates N detached runs of T tokens each (``--mock-delay-ms 0``) through the
run manager, lets them finish, and reports the Python heap they still hold
(``tracemalloc``, after ``gc.collect()``) divided by N*T.  A finished run
stays in memory, replayable, until ``--run-ttl``; this is what it costs.  It
measures twice more, with 1 token per run and with T, to split the figure
into a fixed cost per run and a marginal cost per token.  The saved rows live
in SQLite (a temporary file), not on the Python heap, so they are not counted.

Resume latency (``--tries K``)::

    .venv/bin/python -m tools.measure_detached resume --tries 100

serves the app on 127.0.0.1 (a real hypercorn server) and K times opens a
new TCP connection, sends ``GET /v1/runs/{id}/events`` with a random
``Last-Event-ID`` behind the end of the log, and times "connect started" ->
"first replayed event parsed".  Once against a finished run, once against a
live run (the mock sending one token every 20 ms).  It reports the median,
p90 and maximum.
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also as a plain script

from trio_stream import EventLogger, Service, Settings, open_service, serve_service
from trio_stream.runs import Run
from trio_stream.store import SQLiteStore
from trio_stream.wire.request import parse_chat_request
from trio_stream.wire.sse import SSEDecoder

TENANT = "public"  # open access: the tenant of every run when no key is configured


@asynccontextmanager
async def _service(settings: Settings, db: str) -> AsyncIterator[Service]:
    logger = EventLogger(stream=io.StringIO())
    store = SQLiteStore(db, threaded=False)
    async with open_service(settings, logger=logger, store=store) as service:
        yield service


async def _detached_runs(service: Service, count: int, tokens: int, tag: str) -> None:
    """Create ``count`` detached runs of ``tokens`` tokens and wait until all have ended."""
    done = [(await _create(service, tokens, f"{tag} {i}")).done for i in range(count)]
    for event in done:
        await event.wait()


def _heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def _held(service: Service, count: int, tokens: int, tag: str) -> int:
    """Heap bytes still held once ``count`` runs of ``tokens`` tokens have finished."""
    before = _heap()
    await _detached_runs(service, count, tokens, tag)
    return _heap() - before


@dataclass
class MemoryFigures:
    runs: int
    tokens: int
    bytes_per_token: float  # held bytes / (runs * tokens), fixed costs included
    per_run_fixed: float
    per_token_marginal: float
    held_bytes: int


async def measure_memory(runs: int, tokens: int) -> MemoryFigures:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(port=0, db=f"{tmp}/m.db", mock_delay_ms=0, run_ttl=3600)
        async with _service(settings, settings.db) as service:
            await _detached_runs(service, 10, tokens, "warm-up")  # lazy imports, caches
            tracemalloc.start()
            try:
                held = await _held(service, runs, tokens, "long")
                one = await _held(service, runs, 1, "short")
            finally:
                tracemalloc.stop()
    per_token = (held - one) / (runs * (tokens - 1)) if tokens > 1 else float("nan")
    return MemoryFigures(
        runs=runs, tokens=tokens, bytes_per_token=held / (runs * tokens),
        per_run_fixed=one / runs - per_token, per_token_marginal=per_token, held_bytes=held,
    )  # fmt: skip


# -- resume latency ----------------------------------------------------------------


async def _first_replayed_event(port: int, run_id: str, after: int) -> float:
    """Seconds from "connect" to the first replayed event, on a new connection."""
    h = h11.Connection(h11.CLIENT)
    headers = [("host", "127.0.0.1"), ("last-event-id", str(after))]
    start = time.perf_counter()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            h.send(h11.Request(method="GET", target=f"/v1/runs/{run_id}/events", headers=headers))
            + h.send(h11.EndOfMessage())
        )
        decoder = SSEDecoder()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError("the server closed the stream before any event")
                h.receive_data(data)
            elif isinstance(event, h11.Response) and event.status_code != 200:
                raise RuntimeError(f"GET /events answered {event.status_code}")
            elif isinstance(event, h11.Data):
                for sse in decoder.feed(bytes(event.data)):
                    if sse.id is not None and int(sse.id) > after:
                        return time.perf_counter() - start


@dataclass
class LatencyFigures:
    case: str
    tries: int
    median_ms: float
    p90_ms: float
    max_ms: float


def _summary(case: str, samples: list[float]) -> LatencyFigures:
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return LatencyFigures(case, len(ms), statistics.median(ms), p90, ms[-1])


async def _resume_case(case: str, tries: int, tokens: int, rng: random.Random) -> LatencyFigures:
    """``finished``: replay a run of ``tokens`` that has ended (mock delay 0).
    ``live``: replay a run that is still streaming, one token per 20 ms."""
    live = case == "live"
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(port=0, db=f"{tmp}/r.db", mock_delay_ms=20 if live else 0,
                            run_ttl=3600)  # fmt: skip
        async with _service(settings, settings.db) as service, trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_service, service))
            run = await _create(service, 1_000_000 if live else tokens, case)
            if live:
                while run.log.last_seq < 50:
                    await run.wait_changed()
            else:
                await run.done.wait()
            samples = []
            for _ in range(tries):
                after = rng.randrange(0, run.log.last_seq - 1)
                samples.append(await _first_replayed_event(port, run.id, after))
            service.runs.cancel(run, "stopped")
            nursery.cancel_scope.cancel()
    return _summary(f"{case} run", samples)


async def measure_resume(tries: int, tokens: int, seed: int) -> list[LatencyFigures]:
    rng = random.Random(seed)
    return [await _resume_case(case, tries, tokens, rng) for case in ("finished", "live")]


async def _create(service: Service, tokens: int, tag: str) -> Run:
    body = {"messages": [{"role": "user", "content": tag}],
            "max_tokens": tokens, "stream": True, "detach": True}  # fmt: skip
    run = await service.runs.create(TENANT, None, parse_chat_request(orjson.dumps(body)))
    service.runs.start_detached(run)
    return run


# -- command line ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    mem = sub.add_parser("memory", help="bytes per buffered token of finished detached runs")
    mem.add_argument("--runs", type=int, default=200)
    mem.add_argument("--tokens", type=int, default=500)
    res = sub.add_parser("resume", help="reconnect -> first replayed event, real socket")
    res.add_argument("--tries", type=int, default=100)
    res.add_argument("--tokens", type=int, default=1000, help="length of the finished run")
    res.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.what == "memory":
        figures: Any = trio.run(measure_memory, args.runs, args.tokens)
        print(
            f"{figures.runs} finished detached runs x {figures.tokens} tokens: "
            f"{figures.held_bytes} bytes held = {figures.bytes_per_token:.1f} bytes per "
            f"buffered token ({figures.per_token_marginal:.1f} marginal per token, "
            f"{figures.per_run_fixed:.0f} fixed per run)"
        )
        out: Any = figures.__dict__
    else:
        figures = trio.run(measure_resume, args.tries, args.tokens, args.seed)
        for f in figures:
            print(
                f"resume latency, {f.case}: median {f.median_ms:.2f} ms, p90 {f.p90_ms:.2f} ms, "
                f"max {f.max_ms:.2f} ms over {f.tries} reconnects"
            )
        out = [f.__dict__ for f in figures]
    if args.json:
        args.json.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
