"""Operations: ``/healthz``, ``/metrics``, the lifecycle log lines, ``: ping``.

The names checked here are the contract of docs/api.md sections 2 and 4:
operators' dashboards and log queries depend on them.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RawClient, loopback_client, memory_app, running_server
from tests.memasgi import start_request
from trio_stream import EventLogger, Settings, open_service, serve_service
from trio_stream.metrics import Metrics

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "log me"}]


def chat(max_tokens: int) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": max_tokens}


async def stream_and_leave(port: int, after: int, headers: tuple[tuple[str, str], ...] = ()) -> str:
    """Open a stream, read ``after`` events, close the socket; returns the run id."""
    client = await RawClient.post(port, CHAT, chat(500), headers)
    try:
        for _ in range(after):
            assert await client.next_event() is not None
    finally:
        await client.aclose()
    return client.headers["x-run-id"]


async def stream_to_the_end(port: int) -> str:
    client = await RawClient.post(port, CHAT, chat(5))
    try:
        assert (await client.read_all())[-1].data == "[DONE]"
    finally:
        await client.aclose()
    return client.headers["x-run-id"]


async def test_healthz_needs_no_key(settings: Settings) -> None:
    """``GET /healthz`` answers ``{"status": "ok"}`` even when keys are required."""
    async with (
        running_server(settings.replace(api_keys=("k1",))) as server,
        loopback_client(server) as http,
    ):
        r = await http.get("/healthz")
        models = await http.get("/v1/models")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    assert models.status_code == 401  # the key check is really on


async def test_metrics_expose_every_name_of_the_contract(settings: Settings) -> None:
    """``GET /metrics`` (no key needed) has every metric name of docs/api.md
    section 2, with values that follow one completed and one cancelled stream;
    ``trio_stream_tasks_living`` is a real number."""
    with trio.fail_after(10):
        async with running_server(settings.replace(api_keys=("k1",), mock_delay_ms=5)) as server:
            auth = (("authorization", "Bearer k1"),)
            await stream_and_leave(server.port, 1, auth)
            client = await RawClient.post(server.port, CHAT, chat(5), auth)
            try:
                assert (await client.read_all())[-1].data == "[DONE]"
            finally:
                await client.aclose()
            await server.service.wait_streams_closed()
            async with loopback_client(server) as http:
                r = await http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    names = {name for name, _ in samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("trio_stream_active_streams") == 0
    assert value("trio_stream_active_runs") == 0
    tasks = value("trio_stream_tasks_living")
    assert math.isfinite(tasks)
    assert tasks >= 1
    assert value("trio_stream_runs_total", outcome="completed") == 1
    assert value("trio_stream_runs_total", outcome="cancelled") == 1
    assert value("trio_stream_cancellations_total", reason="client_disconnect") == 1
    assert value("trio_stream_tokens_total") >= 6  # 5 + at least 1
    for histogram in ("trio_stream_ttft_seconds", "trio_stream_cancel_seconds"):
        assert {f"{histogram}_bucket", f"{histogram}_count", f"{histogram}_sum"} <= names
    assert value("trio_stream_ttft_seconds_count") == 2
    assert value("trio_stream_cancel_seconds_count") == 1
    assert value("process_resident_memory_bytes") > 0


@pytest.mark.skipif(
    os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES") is not None,
    reason="the environment already decides prometheus_client's *_created series",
)
def test_metrics_change_nothing_global_in_prometheus_client() -> None:
    """trio_stream's scrape leaves out the *_created series, without changing
    prometheus_client for the rest of the process: after trio_stream is
    imported and its metrics are built and rendered, an embedder's own
    counter still exports its *_created series."""
    ours = Metrics()
    ours.runs.labels("completed").inc()
    scrape = ours.render().decode()
    theirs = CollectorRegistry()
    Counter("embedder_requests", "An embedder's own counter.", registry=theirs).inc()
    assert "trio_stream_runs_total" in scrape
    assert "_created" not in scrape
    assert "embedder_requests_created" in generate_latest(theirs).decode()


# -- log lines -------------------------------------------------------------

_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ ]+)')


def parse_text_line(line: str) -> dict[str, Any]:
    """``event key=value ...`` (values with spaces are JSON-quoted)."""
    event, _, rest = line.partition(" ")
    pairs = _PAIR.findall(rest)
    assert " ".join(f"{k}={v}" for k, v in pairs) == rest, f"unparsable: {line!r}"
    fields = {k: orjson.loads(v) if v.startswith('"') else v for k, v in pairs}
    return {"event": event, **fields}


def parse_lines(fmt: str, text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    if fmt == "json":
        return [orjson.loads(line) for line in lines]
    return [parse_text_line(line) for line in lines]


@asynccontextmanager
async def server_logging_to(settings: Settings, out: io.StringIO) -> AsyncIterator[int]:
    """The server with an EventLogger writing ``settings.log_format`` to ``out``."""
    logger = EventLogger(settings.log_format, stream=out)
    async with open_service(settings, logger=logger) as service, trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_service, service, shutdown=trio.Event()))
        try:
            yield port
        finally:
            await service.wait_streams_closed()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_lifecycle_log_lines(settings: Settings, fmt: str) -> None:
    """A stream left by its client logs stream_start (trace, session, detached),
    stream_cancelled (trace, reason=client_disconnect) and stream_end (trace,
    status, tokens, duration_ms), in that order, one line each, in both the
    text and the JSON format; a completed stream logs start and end."""
    out = io.StringIO()
    s = settings.replace(log_format=fmt, mock_delay_ms=5)
    with trio.fail_after(10):
        async with server_logging_to(s, out) as port:
            left = await stream_and_leave(port, 2, (("x-session-id", "log-session"),))
            done = await stream_to_the_end(port)
    records = parse_lines(fmt, out.getvalue())
    assert all(r["event"] for r in records)

    mine = [r for r in records if r.get("trace") == left]
    assert [r["event"] for r in mine] == ["stream_start", "stream_cancelled", "stream_end"]
    start, cancelled, end = mine
    assert {"trace", "session", "detached"} <= start.keys()
    assert {"trace", "reason"} <= cancelled.keys()
    assert {"trace", "status", "tokens", "duration_ms"} <= end.keys()
    assert start["session"] == "log-session"
    assert cancelled["reason"] == "client_disconnect"
    if fmt == "json":
        assert start["detached"] is False
        assert end["status"] == "cancelled"
        assert isinstance(end["tokens"], int)
        assert end["tokens"] >= 2
        assert isinstance(end["duration_ms"], int | float)
    else:
        assert start["detached"] == "false"
        assert end["status"] == "cancelled"
        assert int(end["tokens"]) >= 2
        assert float(end["duration_ms"]) > 0

    completed = [r for r in records if r.get("trace") == done]
    assert [r["event"] for r in completed] == ["stream_start", "stream_end"]
    assert completed[0]["session"] in (None, "-")
    assert completed[1]["status"] == "completed"
    assert str(completed[1]["tokens"]) == "5"


# -- pings -----------------------------------------------------------------


def frames(body: bytes) -> list[str]:
    """Name each part of ``body``: ``ping`` (a comment line), ``id N``,
    ``finish`` or ``[DONE]`` (events, each ended by a blank line)."""
    names = []
    for block in body.split(b"\n\n")[:-1]:
        while block.startswith(b": ping\n"):
            names.append("ping")
            block = block.removeprefix(b": ping\n")
        if block == b"data: [DONE]":
            names.append("[DONE]")
        elif b'"finish_reason":null' in block:
            names.append(block.split(b"\n")[0].decode().replace(":", ""))
        else:
            names.append("finish")
    return names


async def test_pings_fill_every_silence(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """With 1 s between tokens and --ping-interval 0.3, the client gets exactly
    three ``: ping`` comments in each silence (the first one also sends the
    headers), and none once data flows."""
    s = settings.replace(mock_delay_ms=1000, ping_interval=0.3)
    with trio.fail_after(30):
        async with memory_app(s) as (_, app), trio.open_nursery() as nursery:
            client = start_request(nursery, app, "POST", CHAT, json=chat(2))
            await client.wait_until(lambda c: b": ping" in c.body)
            assert client.status == 200
            assert client.headers["content-type"] == "text/event-stream"
            await client.finished.wait()
    assert frames(bytes(client.body)) == [
        "ping", "ping", "ping", "id 1", "ping", "ping", "ping", "id 2", "finish", "[DONE]",
    ]  # fmt: skip


def test_processes_sharing_stderr_never_mix_their_lines() -> None:
    """Two processes logging to one stderr (the workers of --workers) each
    write whole lines: no line ever holds parts of two events, so the log
    stays parseable (with PrintLogger's separate newline write, thousands of
    lines ran into each other)."""
    import subprocess
    import sys

    child = (
        "from trio_stream.logs import EventLogger\n"
        "log = EventLogger('json')\n"
        "for i in range(20000):\n"
        "    log.event('listening', url='http://127.0.0.1:43023', port=43023, n=i)\n"
    )
    read_end, write_end = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", child], stderr=write_end) for _ in range(2)]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    lines = data.splitlines()
    assert len(lines) == 40000
    assert all(orjson.loads(line)["event"] == "listening" for line in lines)


class _CountingStream(io.StringIO):
    """A stream that counts its ``write`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_are_those_of_the_structlog_pipeline(fmt: str) -> None:
    """EventLogger renders its lines itself (no BoundLogger chain, for speed):
    every line is byte for byte what structlog's BoundLogger with our two
    processors wrote -- the fields in call order, ``event`` last in JSON,
    the text escapes of docs/api.md section 4 -- each in one ``write``, and
    the sink gets the same record, a copy of its own."""
    import structlog

    from trio_stream import logs

    calls: list[tuple[str, dict[str, Any]]] = [
        ("stream_start", {"trace": "run_x", "session": None, "detached": False}),
        ("stream_end", {"trace": "run_x", "status": "completed", "tokens": 10, "ms": 12.345}),
        ("save_failed", {"trace": "run_y", "error": "a b=c", "empty": ""}),
        ("odd", {"obj": object.__name__, "flag": True, "n": 1.5, "d": {"k": [1, None]}}),
    ]
    renderer = logs._render_json if fmt == "json" else logs._render_text
    expected = io.StringIO()
    reference = structlog.wrap_logger(structlog.WriteLogger(expected), processors=[renderer])
    for name, fields in calls:
        reference.info(name, **fields)

    out = _CountingStream()
    records: list[dict[str, Any]] = []
    logger = EventLogger(fmt, stream=out, sink=records.append)
    for name, fields in calls:
        logger.event(name, **fields)

    assert out.getvalue() == expected.getvalue()
    assert out.writes == len(calls)
    assert records == [{**fields, "event": name} for name, fields in calls]
    assert [list(r) for r in records] == [[*fields, "event"] for _, fields in calls]
