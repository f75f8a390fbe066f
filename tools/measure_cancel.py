"""Measure what a client disconnect costs: latency to the upstream, and leaks.

Everything runs in one process under ``trio.run``: a real
:class:`~tools.fakes.FakeUpstream` (OpenAI wire format, a slow token plan) on
127.0.0.1, and the server (``--upstream openai`` pointing at it) on
127.0.0.1, talked to by raw HTTP/1.1 sockets.

Latency mode (default)::

    .venv/bin/python -m tools.measure_cancel --streams 100

opens a stream, reads 2 events, closes the client socket and records
``t_close``; the upstream records when it saw its connection close.  Both are
``trio.current_time()`` in the same process, so the difference is exactly
"client gone -> upstream connection closed".  Streams run one at a time.

Leak mode::

    .venv/bin/python -m tools.measure_cancel --leak 1000

compares trio's ``tasks_living`` (after ``wait_all_tasks_blocked``) before
and after that many streams cancelled mid-stream by their clients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also as a plain script

from tools.fakes import FakeUpstream, mock_plan
from tools.harness import RawClient, Server, running_server, tasks_living
from trio_stream import Settings

CHAT = "/v1/chat/completions"
TOKEN_DELAY = 0.01  # the slow upstream: one token every 10 ms
TOKENS = 1000  # 10 s per stream if nothing cancelled it


def _body(i: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"measure {i}"}]
    return {"model": "m", "messages": messages, "stream": True, "max_tokens": TOKENS}


@asynccontextmanager
async def _setup(db: str) -> AsyncIterator[tuple[Server, FakeUpstream]]:
    fake = FakeUpstream("openai", plan=mock_plan("openai", TOKEN_DELAY))
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        settings = Settings(port=0, db=db, upstream="openai", upstream_url=fake.url)
        async with running_server(settings) as server:
            yield server, fake
        nursery.cancel_scope.cancel()


async def _cancel_one(server: Server, i: int, events: int) -> float:
    """One stream: read ``events`` events, close the socket; returns ``t_close``."""
    client = await RawClient.post(server.port, CHAT, _body(i))
    try:
        for _ in range(events):
            if await client.next_event() is None:
                raise RuntimeError(f"stream {i} ended early (status {client.status})")
    finally:
        t_close = trio.current_time()
        await client.aclose()
    return t_close


def _upstream_closed_at(fake: FakeUpstream, i: int) -> float | None:
    content = f"measure {i}"
    for conn in fake.connections:
        if any(r["messages"][0]["content"] == content for r in conn.requests):
            return conn.closed
    return None


async def _settle(server: Server, fake: FakeUpstream) -> None:
    await fake.wait_for(lambda: fake.open_connections == 0)
    await server.service.runs.wait_idle()
    await server.service.wait_streams_closed()


async def measure_latency(streams: int, db: str) -> list[float]:
    """Seconds from each client's close to its upstream connection's close."""
    latencies: list[float] = []
    async with _setup(db) as (server, fake):
        for i in range(streams):
            t_close = await _cancel_one(server, i, events=2)
            with trio.fail_after(5):
                await fake.wait_for(lambda: _upstream_closed_at(fake, i) is not None)  # noqa: B023
                await _settle(server, fake)
            closed = _upstream_closed_at(fake, i)
            assert closed is not None
            latencies.append(closed - t_close)
    return latencies


async def measure_leak(streams: int, concurrency: int, db: str) -> tuple[int, int, int]:
    """``(tasks_living before, after, open upstream connections after)``."""
    async with _setup(db) as (server, fake):
        before = await tasks_living()
        limit = trio.CapacityLimiter(concurrency)

        async def one(i: int) -> None:
            async with limit:
                await _cancel_one(server, i, events=1 + i % 3)

        async with trio.open_nursery() as nursery:
            for i in range(streams):
                nursery.start_soon(one, i)
        with trio.fail_after(30):
            await _settle(server, fake)
        after = await tasks_living()
        return before, after, fake.open_connections


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100, help="latency samples (default 100)")
    parser.add_argument(
        "--leak", type=int, nargs="?", const=1000, default=None, metavar="N",
        help="leak mode: N cancelled streams (default 1000)",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=10, help="leak mode: streams at once")
    parser.add_argument("--db", default=":memory:", help="SQLite file (default :memory:)")
    args = parser.parse_args(argv)

    if args.leak is not None:
        before, after, open_conns = trio.run(measure_leak, args.leak, args.concurrency, args.db)
        print(f"cancelled streams: {args.leak} (concurrency {args.concurrency})")
        print(f"tasks_living before: {before}  after: {after}  leaked: {after - before}")
        print(f"open upstream connections after: {open_conns}")
        return 0 if after == before and open_conns == 0 else 1

    latencies = trio.run(measure_latency, args.streams, args.db)
    print(f"client close -> upstream connection closed, {len(latencies)} streams:")
    print(f"  median {_ms(statistics.median(latencies))}  max {_ms(max(latencies))}")
    print(f"  min {_ms(min(latencies))}  p90 {_ms(statistics.quantiles(latencies, n=10)[-1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
