"""Cancellation of attached streams over real sockets (issue 2), over HTTP/1.1,
h2c and TLS+h2 alike (``tests/protocols.py``).

Each test runs the server in-process on 127.0.0.1 with ``--upstream openai``
pointing at a real :class:`~tools.fakes.FakeUpstream`, so that "the upstream
connection closes" is observed by the upstream itself, and "every task of the
run exits" is trio's ``tasks_living`` back at the baseline taken in the same
test (tolerance 0).  The clients are raw: closing one is a TCP close of its
connection (over TLS after ``close_notify``), and leaving one HTTP/2 stream is
its ``RST_STREAM``.  Every save is recorded (:class:`~tests.conftest.RecordingStore`),
so "saved once" counts the calls, not the rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.conftest import RecordingStore, Server, memory_app, running_server, tasks_living
from tests.memasgi import start_request
from tests.protocols import PROTOCOLS, Exchange, open_client, serving
from tools.fakes import FakeUpstream, mock_plan, token_plan
from trio_stream import Settings
from trio_stream.http.service import PUBLIC_TENANT
from trio_stream.upstream import mocktext
from trio_stream.wire.sse import SSEEvent

CHAT = "/v1/chat/completions"
#: A generous bound on "client closed -> upstream connection closed", which
#: tools/measure_cancel.py measures at a few milliseconds.  It catches "never"
#: and "only when the run would have ended anyway" (2 s for 200 tokens here).
CLOSE_BOUND = 0.5
LONG = 1000  # tokens at 10 ms: only a cancellation ends such a stream in time
SHORT = 30


def chat(content: str = "cancel me", max_tokens: int = 200) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens}


def delta_text(events: list[SSEEvent]) -> str:
    chunks = [orjson.loads(e.data) for e in events if e.data.startswith('{"id"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


@asynccontextmanager
async def upstream_server(
    settings: Settings, proto: str, tmp_path: Path, fake_openai: FakeUpstream, plan: Any
) -> AsyncIterator[tuple[Server, RecordingStore]]:
    """The server for ``proto``, streaming from ``fake_openai`` answering with
    ``plan``, and its store, which records every save."""
    fake_openai.plan = plan
    s = serving(settings, proto, tmp_path).replace(upstream="openai", upstream_url=fake_openai.url)
    store = RecordingStore(s.db)
    async with running_server(s, store=store) as server:
        yield server, store


async def settled(server: Server, fake: FakeUpstream) -> None:
    """Block until no upstream connection, no live run and no client stream is left."""
    await fake.wait_for(lambda: fake.open_connections == 0)
    await server.service.runs.wait_idle()
    await server.service.wait_streams_closed()


def upstream_request_closed(fake: FakeUpstream, content: str) -> bool:
    """Has the upstream connection that carried ``content``'s request closed?"""
    for conn in fake.connections:
        if any(r["messages"][0]["content"] == content for r in conn.requests):
            return conn.closed is not None
    return False


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_cancel_after_two_chunks_closes_upstream_and_ends_every_task(
    settings: Settings, fake_openai: FakeUpstream, proto: str, tmp_path: Path
) -> None:
    """A client that closes its connection after 2 chunks cancels its run at
    once: the upstream connection closes within milliseconds, the partial
    text is saved once (what the client got is a prefix of it), and every
    task of the run and of the connection has exited."""
    plan = mock_plan("openai", 0.01)
    with trio.fail_after(10):
        async with upstream_server(settings, proto, tmp_path, fake_openai, plan) as (server, store):
            baseline = await tasks_living()
            async with open_client(server.port, proto) as client:
                exchange = await client.post(CHAT, chat())
                got = [await exchange.next_event(), await exchange.next_event()]
                assert all(e is not None for e in got)
                closed_at = trio.current_time()
            await settled(server, fake_openai)

            (conn,) = fake_openai.connections
            assert conn.closed is not None
            assert conn.closed - closed_at < CLOSE_BOUND
            run_id = exchange.headers["x-run-id"]
            assert server.logs.events("stream_cancelled", trace=run_id) == [
                {"event": "stream_cancelled", "trace": run_id, "reason": "client_disconnect"}
            ]
            (saved,) = store.saves_of(run_id)
            assert (saved.status, saved.reason) == ("partial", "client_disconnect")
            assert await store.get(PUBLIC_TENANT, run_id) == saved
            received = delta_text([e for e in got if e is not None])
            assert received
            assert saved.content.startswith(received)
            assert len(saved.content) < len(mocktext.expected_text(chat()["messages"], 200))
            assert server.service.runs.runs == {}
            assert await tasks_living() == baseline


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_ten_abandoned_streams_leak_no_task_and_no_upstream_connection(
    settings: Settings, fake_openai: FakeUpstream, proto: str, tmp_path: Path
) -> None:
    """10 streams dropped by rapid cancellations -- before the first token, after
    one chunk, after two -- leave tasks_living at exactly its baseline and no
    upstream connection open, and every run that started was cancelled and
    saved at most once."""
    plan = mock_plan("openai", 0.01)
    with trio.fail_after(10):
        async with upstream_server(settings, proto, tmp_path, fake_openai, plan) as (server, store):
            baseline = await tasks_living()

            async def abandon(i: int) -> None:
                async with open_client(server.port, proto) as client:
                    exchange = await client.post(CHAT, chat(f"abandon {i}"))
                    for _ in range(i % 3):
                        assert await exchange.next_event() is not None

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(abandon, i)
            await settled(server, fake_openai)

            started = {r["trace"] for r in server.logs.events("stream_start")}
            cancelled = {r["trace"] for r in server.logs.events("stream_cancelled")}
            ended = server.logs.events("stream_end", status="cancelled")
            assert len(started) >= 6  # the 6 that read a chunk certainly had a run
            assert cancelled == started == {r["trace"] for r in ended}
            assert {r["reason"] for r in server.logs.events("stream_cancelled")} == {
                "client_disconnect"
            }
            assert all(len(store.saves_of(run_id)) <= 1 for run_id in started)
            assert fake_openai.open_connections == 0
            assert server.service.runs.runs == {}
            assert server.service.streams == 0
            assert await tasks_living() == baseline


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_twenty_create_then_cancel_cycles_over_sockets(
    settings: Settings, fake_openai: FakeUpstream, proto: str, tmp_path: Path
) -> None:
    """20 cycles of "send the request, close the connection at once" never
    deadlock: every run, client stream, upstream connection and task is gone
    afterwards."""
    plan = mock_plan("openai", 0.01)
    with trio.fail_after(10):
        async with upstream_server(settings, proto, tmp_path, fake_openai, plan) as (server, _):
            baseline = await tasks_living()
            for i in range(20):
                async with open_client(server.port, proto) as client:
                    await client.post(CHAT, chat(f"cycle {i}"))
            await settled(server, fake_openai)

            started = {r["trace"] for r in server.logs.events("stream_start")}
            assert started == {r["trace"] for r in server.logs.events("stream_end")}
            assert server.logs.events("stream_end", status="completed") == []
            assert server.service.runs.runs == {}
            assert server.service.streams == 0
            assert await tasks_living() == baseline


async def test_twenty_create_then_cancel_cycles_in_memory(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """The same cycles, staged exactly: each request is read, its run created,
    and the disconnect queued behind it cancels that run (reason
    client_disconnect) before its first token -- no deadlock, nothing left."""
    with trio.fail_after(30):
        async with memory_app(settings.replace(mock_delay_ms=50)) as (service, app):
            baseline = await tasks_living()
            for i in range(20):
                async with trio.open_nursery() as nursery:
                    body = chat(f"cycle {i}")
                    client = start_request(nursery, app, "POST", CHAT, json=body)
                    await client.disconnect()
                await client.finished.wait()
                assert client.text() == ""  # cancelled before its first token
            logs = app.logs
            assert len(logs.events("stream_start")) == 20
            assert len(logs.events("stream_cancelled", reason="client_disconnect")) == 20
            assert service.runs.live == 0
            assert service.streams == 0
            assert await tasks_living() == baseline


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_disconnect_before_first_token_closes_upstream(
    settings: Settings, fake_openai: FakeUpstream, proto: str, tmp_path: Path
) -> None:
    """A client that leaves while the upstream has not sent its first token
    cancels the run at once (LiteLLM #31499, Open WebUI #14384): the upstream
    connection closes, nothing is saved, no task is left."""
    plan = token_plan(["never"], hang_after=0)
    with trio.fail_after(10):
        async with upstream_server(
            settings, proto, tmp_path, fake_openai, lambda _: plan
        ) as (server, store):  # fmt: skip
            baseline = await tasks_living()
            async with open_client(server.port, proto) as client:
                await client.post(CHAT, chat())
                await fake_openai.wait_for(lambda: len(fake_openai.requests) == 1)
                (run,) = server.service.runs.runs.values()
                await trio.testing.wait_all_tasks_blocked()
                assert run.log.last_seq == 0
                closed_at = trio.current_time()
            await settled(server, fake_openai)

            (conn,) = fake_openai.connections
            assert conn.closed is not None
            assert conn.closed - closed_at < CLOSE_BOUND
            assert server.logs.events("stream_cancelled", trace=run.id, reason="client_disconnect")
            assert run.log.status.value == "cancelled"
            assert store.saves_of(run.id) == []
            assert await tasks_living() == baseline


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_disconnect_while_writer_is_blocked_on_a_slow_reader(
    settings: Settings, fake_openai: FakeUpstream, proto: str, tmp_path: Path
) -> None:
    """A client that reads nothing blocks the writer in send (HTTP/1.1: the
    socket buffers are full; HTTP/2: the stream's window is spent) and,
    through the backpressure window, holds the upstream back; when it then
    leaves (a TCP close; on HTTP/2 ``RST_STREAM`` of that stream) the blocked
    send ends, the run is cancelled, the upstream closes and the partial text
    (all the server received) is saved once."""
    tokens = ["x" * 1000] * 5000  # 5 MB: more than any socket buffer or window
    plan = token_plan(tokens)
    with trio.fail_after(10):
        async with upstream_server(
            settings, proto, tmp_path, fake_openai, lambda _: plan
        ) as (server, store):  # fmt: skip
            baseline = await tasks_living()
            async with open_client(server.port, proto, rcvbuf=4096) as client:
                exchange = await client.post(CHAT, chat())
                await fake_openai.wait_for(lambda: len(fake_openai.requests) == 1)
                (run,) = server.service.runs.runs.values()
                window = server.service.settings.window
                while run.log.last_seq - run.writer_cursor < window:
                    await run.wait_changed()
                await trio.testing.wait_all_tasks_blocked()
                # Everything is blocked and the writer is a window behind: it is in send.
                assert run.log.last_seq - run.writer_cursor == window
                assert run.log.outcome is None
                assert run.log.last_seq < len(tokens) // 10  # the upstream is held back

                closed_at = trio.current_time()
                await exchange.leave()
                await settled(server, fake_openai)

                (conn,) = fake_openai.connections
                assert conn.closed is not None
                assert conn.closed - closed_at < CLOSE_BOUND
            assert server.logs.events("stream_cancelled", trace=run.id, reason="client_disconnect")
            (saved,) = store.saves_of(run.id)
            assert (saved.status, saved.reason) == ("partial", "client_disconnect")
            assert saved.content == run.log.content
            assert await tasks_living() == baseline


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_leaving_ten_of_twenty_streams_spares_the_others(
    settings: Settings, fake_openai: FakeUpstream, proto: str, tmp_path: Path
) -> None:
    """20 concurrent streams (HTTP/2: on one connection; HTTP/1.1: one
    connection each); 10 are left mid-stream (``RST_STREAM``; HTTP/1.1: their
    connections closed).  Their runs are cancelled (client_disconnect) and
    saved once as partial, their upstream requests close within
    milliseconds; the other 10 complete with the exact text and are saved
    once as complete; the client (on HTTP/2: the same connection) is served a
    new stream; no task and no connection is left."""
    plan = mock_plan("openai", 0.01)
    with trio.fail_after(10):
        async with upstream_server(settings, proto, tmp_path, fake_openai, plan) as (server, store):
            baseline = await tasks_living()
            async with open_client(server.port, proto) as client:
                streams: list[tuple[str, int, Exchange]] = []
                for i in range(20):
                    n = LONG if i % 2 == 0 else SHORT
                    content = f"stream {i}"
                    streams.append((content, n, await client.post(CHAT, chat(content, n))))
                assert [await ex.start() for _, _, ex in streams] == [200] * 20
                firsts: dict[str, SSEEvent] = {}
                for content, _, ex in streams:
                    first = await ex.next_event()
                    assert first is not None  # every stream is mid-stream
                    firsts[content] = first

                left_at = trio.current_time()
                for _, n, ex in streams:
                    if n == LONG:
                        await ex.leave()
                left = [content for content, n, _ in streams if n == LONG]
                await fake_openai.wait_for(
                    lambda: all(upstream_request_closed(fake_openai, c) for c in left)
                )
                assert trio.current_time() - left_at < CLOSE_BOUND

                for content, n, ex in streams:
                    if n == SHORT:
                        rest = await ex.read_all()
                        assert delta_text([firsts[content], *rest]) == mocktext.expected_text(
                            chat(content)["messages"], n
                        )
                        assert rest[-1].data == "[DONE]"

                again = await client.post(CHAT, chat("after", SHORT))
                events = await again.read_all()
                assert delta_text(events) == mocktext.expected_text(
                    chat("after")["messages"], SHORT
                )
                assert events[-1].data == "[DONE]"
            await fake_openai.wait_for(lambda: fake_openai.busy_connections == 0)
            await server.service.runs.wait_idle()
            await server.service.wait_streams_closed()

            left_ids = {ex.headers["x-run-id"] for _, n, ex in streams if n == LONG}
            cancelled = server.logs.events("stream_cancelled")
            assert {r["trace"] for r in cancelled} == left_ids
            assert {r["reason"] for r in cancelled} == {"client_disconnect"}
            for content, n, ex in streams:
                (saved,) = store.saves_of(ex.headers["x-run-id"])
                if n == LONG:
                    assert (saved.status, saved.reason) == ("partial", "client_disconnect")
                    assert saved.content.startswith(delta_text([firsts[content]]))
                else:
                    assert saved.status == "complete"
            assert len(server.logs.events("stream_end", status="completed")) == 11
            # Each idle pooled upstream connection is one handler task of the fake.
            assert await tasks_living() == baseline + fake_openai.open_connections
