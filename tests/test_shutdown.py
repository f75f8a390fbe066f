"""Graceful shutdown of a real ``trio-stream serve`` process (issue 6, docs/api.md section 3.7),
and of the in-process server over HTTP/1.1, h2c and TLS+h2 (at the end).

On SIGTERM/SIGINT new streams get 503, running ones get ``--graceful-timeout``,
the rest are cancelled with reason ``shutdown`` and saved, and the process
exits 0 within ``--graceful-timeout`` + 2 s -- stalled clients or not.

The big test runs 50 client streams against one server process: 45 readers
over HTTP/1.1 and 5 raw sockets that stop reading after the response head,
plus 2 detached runs without a subscriber.  Its upstream is a real
:class:`~tools.fakes.FakeUpstream` in this process, because the two kinds of
stream need different upstreams (``--mock-delay-ms`` is one per server): the
readers' runs get a token every 50 ms (long-running, and light enough for a
loaded CI machine), the stalled ones get 1 KB tokens as fast as the server
takes them.  The stalled sockets also shrink their receive buffer and MSS
before connecting: on loopback the server's send buffer is sized from the
peer's MSS (64 KiB segments give ~4 MB, 536-byte ones ~70 KB), so their
streams block the server's writes within a fraction of a second.  Times are
real: this is a real process.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import orjson
import pytest
import trio

from tests.conftest import (
    RecordingStore,
    ServeProcess,
    serve_process,
    tasks_living,
    waitable_server,
)
from tests.protocols import PROTOCOLS, Exchange, open_client, serving
from tools.fakes import FakeUpstream, Plan, token_plan
from trio_stream import Settings
from trio_stream.upstream import mocktext
from trio_stream.wire.sse import SSEDecoder, SSEEvent

CHAT = "/v1/chat/completions"
GRACE = 1.0  # --graceful-timeout of the big test
LONG = 2000  # tokens of a reader's or detached run: 100 s at one per 50 ms
GAP = 0.05
NORMAL, STALLED, DETACHED = 45, 5, 2
WINDOW = Settings().window  # the backpressure window of an attached stream


def planned_tokens(name: str) -> list[str]:
    """What the fake upstream streams for the client ``name``."""
    if name.startswith("stalled"):
        return [f"<{name} {i:04d}>" + "x" * 1000 for i in range(LONG)]
    return list(mocktext.tokens(messages(name), LONG))


def shutdown_plan(body: dict[str, Any]) -> Plan:
    name = body["messages"][0]["content"].removeprefix("shutdown test ")
    return token_plan(planned_tokens(name), delay=0 if name.startswith("stalled") else GAP)


def messages(name: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"shutdown test {name}"}]


def chat(name: str, max_tokens: int = LONG, **extra: Any) -> dict[str, Any]:
    return {"messages": messages(name), "stream": True, "max_tokens": max_tokens, **extra}


def http(proc: ServeProcess) -> httpx.AsyncClient:
    # Plain HTTP to 127.0.0.1: verify=False only skips loading the CA bundle.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    url = f"http://127.0.0.1:{proc.port}"
    return httpx.AsyncClient(base_url=url, timeout=30, verify=False, limits=limits)


def content_of(events: list[SSEEvent]) -> str:
    chunks = [orjson.loads(e.data) for e in events if e.data.startswith('{"id"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def shutdown_error(event: SSEEvent) -> bool:
    if not event.data.startswith('{"error"'):
        return False
    error = orjson.loads(event.data)["error"]
    return bool(error["type"] == "stream_cancelled" and error["code"] == "shutdown")


@dataclass
class Reader:
    """A client that reads its stream to the end."""

    name: str
    run_id: str = ""
    events: list[SSEEvent] = field(default_factory=list)
    cut: bool = False


async def read_stream(
    client: httpx.AsyncClient, reader: Reader, body: dict[str, Any], started: Callable[[], None]
) -> None:
    headers = {"x-session-id": reader.name}
    async with client.stream("POST", CHAT, json=body, headers=headers) as r:
        assert r.status_code == 200
        reader.run_id = r.headers["x-run-id"]
        started()
        decoder = SSEDecoder()
        try:
            async for chunk in r.aiter_raw():
                reader.events.extend(decoder.feed(chunk))
        except httpx.RemoteProtocolError:
            reader.cut = True


class StalledClient:
    """A raw socket that sends a request, reads the response head, and then
    stops reading (tiny receive buffer and MSS: see the module docstring)."""

    def __init__(self, name: str, sock: trio.socket.SocketType) -> None:
        self.name = name
        self.sock = sock
        self.received = bytearray()
        self.run_id = ""

    @classmethod
    async def open(cls, port: int, name: str) -> StalledClient:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        client = cls(name, sock)
        await sock.connect(("127.0.0.1", port))
        body = orjson.dumps(chat(name))
        await sock.send(
            b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"x-session-id: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (CHAT.encode(), name.encode(), len(body), body)
        )
        while b"\r\n\r\n" not in client.received:  # the head only, in small reads
            data = await sock.recv(256)
            assert data, "the server closed the connection"
            client.received += data
        head = bytes(client.received).split(b"\r\n\r\n")[0].decode()
        assert head.startswith("HTTP/1.1 200"), head
        headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
        client.run_id = {k.lower(): v for k, v in headers.items()}["x-run-id"]
        return client

    async def read_rest(self) -> list[SSEEvent]:
        """After the server is gone: everything that reached us, as SSE events."""
        while True:
            try:
                data = await self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            self.received += data
        self.sock.close()
        h = h11.Connection(h11.CLIENT)
        h.send(h11.Request(method="POST", target=CHAT, headers=[("host", "x")]))
        h.receive_data(bytes(self.received))
        h.receive_data(b"")
        decoder, events = SSEDecoder(), []
        try:
            while (event := h.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if isinstance(event, h11.Data):
                    events.extend(decoder.feed(bytes(event.data)))
                if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError:
            pass  # the body was cut, as expected
        return events


async def run_events(client: httpx.AsyncClient, run_id: str) -> int:
    """The run's event count, from ``GET /v1/runs/{id}``."""
    r = await client.get(f"/v1/runs/{run_id}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running"
    return int(r.json()["events"])


async def wait_until_blocked(client: httpx.AsyncClient, run_ids: list[str]) -> dict[str, int]:
    """Wait until each run is a full backpressure window (64 entries, here
    64 KB) ahead of its writer: the writer is stuck in a send.  Returns each
    run's event count then; the test checks it never grew until the cancel."""
    counts = {}
    for run_id in run_ids:
        while True:
            counts[run_id] = await run_events(client, run_id)
            if counts[run_id] >= WINDOW:
                break
            await trio.sleep(0.05)  # real time: the buffers fill in another process
    return counts


def saved_rows(db: str) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM messages").fetchall()
    return {row["session_id"]: dict(row) for row in rows}


async def test_sigterm_with_50_streams_5_stalled_exits_0_in_time_and_saves_all(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """SIGTERM with 45 reading streams, 5 stalled readers and 2 detached runs:
    a new stream gets 503; the running ones get the full grace period; then
    every run is cancelled with reason shutdown and saved once as partial;
    the readers get the shutdown error event right after exactly the saved
    text; the stalled readers never get it (their writes were cut); and the
    process exits 0 within --graceful-timeout + 2 s."""
    fake = FakeUpstream("openai", shutdown_plan)
    await nursery.start(fake.serve)
    db = str(tmp_path / "shutdown.db")
    args = ("--port", "0", "--db", db, "--graceful-timeout", str(GRACE), "--stall-timeout", "30",
            "--upstream", "openai", "--upstream-url", fake.url, "--log-format", "json")  # fmt: skip
    readers = [Reader(f"normal-{i}") for i in range(NORMAL)]
    with trio.fail_after(40):
        async with serve_process(*args) as proc, http(proc) as client:
            stalled = [await StalledClient.open(proc.port, f"stalled-{i}") for i in range(STALLED)]
            detached = []
            for i in range(DETACHED):
                body = chat(f"detached-{i}", detach=True)
                headers = {"x-session-id": f"detached-{i}"}
                async with client.stream("POST", CHAT, json=body, headers=headers) as r:
                    detached.append(r.headers["x-run-id"])  # then the subscriber leaves

            async with trio.open_nursery() as nursery:
                all_started = trio.Event()

                def started() -> None:
                    if all(r.run_id for r in readers):
                        all_started.set()

                for reader in readers:
                    nursery.start_soon(read_stream, client, reader, chat(reader.name), started)
                await all_started.wait()
                blocked = await wait_until_blocked(client, [s.run_id for s in stalled])

                t_signal = trio.current_time()
                proc.process.send_signal(signal.SIGTERM)
                await proc.wait_for_line(lambda line: '"shutdown_start"' in line)
                late = await client.post(CHAT, json=chat("late"))
                assert late.status_code == 503
                assert late.json()["error"]["type"] == "unavailable_error"
                assert await proc.wait_exit() == 0
                elapsed = trio.current_time() - t_signal
            stalled_events = [await s.read_rest() for s in stalled]

    print(f"\nshutdown: exit {elapsed:.2f} s after SIGTERM (grace {GRACE} s)")
    assert GRACE <= elapsed < GRACE + 2
    (start,) = proc.records("shutdown_start")
    assert (start["runs"], start["streams"]) == (NORMAL + STALLED + DETACHED, NORMAL + STALLED)
    assert len(proc.records("stream_cancelled")) == NORMAL + STALLED + DETACHED
    assert {r["reason"] for r in proc.records("stream_cancelled")} == {"shutdown"}
    for bad in ("save_failed", "save_timeout", "save_duplicate_refused", "run_crashed"):
        assert not proc.records(bad)
    assert proc.records("shutdown_complete")

    rows = await trio.to_thread.run_sync(saved_rows, db)
    names = [r.name for r in readers] + [s.name for s in stalled]
    assert sorted(rows) == sorted([*names, *(f"detached-{i}" for i in range(DETACHED))])
    for name, row in rows.items():
        assert (row["status"], row["reason"]) == ("partial", "shutdown"), name
        assert row["content"]
        assert "".join(planned_tokens(name)).startswith(row["content"])
    assert {rows[f"detached-{i}"]["run_id"] for i in range(DETACHED)} == set(detached)
    for reader in readers:
        assert shutdown_error(reader.events[-1]), reader.events[-1]
        assert "[DONE]" not in {e.data for e in reader.events}
        assert content_of(reader.events) == rows[reader.name]["content"]
        assert rows[reader.name]["run_id"] == reader.run_id
    for client_, events, count in zip(stalled, stalled_events, blocked.values(), strict=True):
        row = rows[client_.name]
        assert row["run_id"] == client_.run_id
        assert row["events"] == count  # no progress from the stall to the cancel
        assert not any(shutdown_error(e) for e in events)
        assert row["content"].startswith(content_of(events))
        assert len(content_of(events)) < len(row["content"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_run_that_ends_within_the_grace_period_completes(
    signum: signal.Signals, tmp_path: Path
) -> None:
    """A stream still running at SIGTERM/SIGINT, which ends within
    --graceful-timeout, completes normally ([DONE], saved complete), and the
    process exits 0 as soon as it has, before the grace period is over."""
    db = str(tmp_path / "grace.db")
    grace = 3.0
    args = ("--port", "0", "--db", db, "--graceful-timeout", str(grace), "--mock-delay-ms",
            "20", "--log-format", "json")  # fmt: skip
    with trio.fail_after(30):
        async with serve_process(*args) as proc, http(proc) as client:
            body = chat("grace", max_tokens=40)  # 0.8 s of tokens
            async with client.stream("POST", CHAT, json=body) as r:
                decoder, events = SSEDecoder(), list[SSEEvent]()
                chunks = r.aiter_raw()
                while not events:
                    events.extend(decoder.feed(await anext(chunks)))
                t_signal = trio.current_time()
                proc.process.send_signal(signum)
                async for chunk in chunks:
                    events.extend(decoder.feed(chunk))
            assert await proc.wait_exit() == 0
            elapsed = trio.current_time() - t_signal
    assert events[-1].data == "[DONE]"
    assert content_of(events) == mocktext.expected_text(messages("grace"), 40)
    (start,) = proc.records("shutdown_start")
    assert start["runs"] == 1  # it was still running when the shutdown began
    assert elapsed < grace
    (row,) = (await trio.to_thread.run_sync(saved_rows, db)).values()
    assert (row["status"], row["content"]) == ("complete", content_of(events))


# -- in process, over each protocol ------------------------------------------------------


async def body_of(exchange: Exchange) -> tuple[int, list[SSEEvent]]:
    """The status and every remaining SSE event of ``exchange``."""
    return await exchange.start(), await exchange.read_all()


LONGS = 5  # streams cut by the shutdown: on HTTP/2 the last of them to end closes the connection


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_graceful_shutdown_over_each_protocol(
    settings: Settings, proto: str, tmp_path: Path
) -> None:
    """A graceful shutdown (in process, over HTTP/1.1, h2c and TLS+h2) with six
    streams under way (on HTTP/2 all on one connection): a stream asked for
    once it has begun gets 503; the stream that ends within
    --graceful-timeout completes ([DONE], saved once as complete); each of
    the five that do not gets exactly the text that is saved -- once,
    partial, reason shutdown -- then the shutdown error event, and no [DONE];
    the server is done within --graceful-timeout + 2 s, closes every client
    connection itself, and leaves no task behind."""
    s = serving(settings, proto, tmp_path).replace(mock_delay_ms=10, graceful_timeout=1.0)
    store = RecordingStore(s.db)
    baseline = await tasks_living()
    with trio.fail_after(15):
        async with (
            waitable_server(s, store=store) as (server, logs),
            open_client(server.port, proto) as client,
        ):
            longs = [await client.post(CHAT, chat(f"long {i}", 5000)) for i in range(LONGS)]
            short = await client.post(CHAT, chat("short", 40))  # 0.4 s
            for exchange in [*longs, short]:
                assert await exchange.next_event() is not None  # under way
            t0 = trio.current_time()
            server.shutdown.set()
            await logs.wait_for("shutdown_start")
            late_status, _ = await body_of(await client.post(CHAT, chat("late", 5)))
            answers = [await body_of(exchange) for exchange in [short, *longs]]
            await logs.wait_for("shutdown_complete")
            took = trio.current_time() - t0
            await client.wait_closed()
    assert await tasks_living() == baseline
    assert (late_status, [status for status, _ in answers]) == (503, [200] * (1 + LONGS))
    assert took < s.graceful_timeout + 2
    (start,) = logs.events("shutdown_start")
    assert (start["runs"], start["streams"]) == (1 + LONGS, 1 + LONGS)

    events = short.events
    (saved,) = store.saves_of(short.headers["x-run-id"])
    assert events[-1].data == "[DONE]"
    assert content_of(events) == mocktext.expected_text(messages("short"), 40)
    assert (saved.status, saved.content) == ("complete", content_of(events))

    for long in longs:
        events = long.events
        (saved,) = store.saves_of(long.headers["x-run-id"])
        assert shutdown_error(events[-1]), events[-1]
        assert "[DONE]" not in {e.data for e in events}
        assert (saved.status, saved.reason) == ("partial", "shutdown")
        assert saved.content == content_of(events)
    cancelled = {r["trace"] for r in logs.events("stream_cancelled")}
    assert cancelled == {long.headers["x-run-id"] for long in longs}
