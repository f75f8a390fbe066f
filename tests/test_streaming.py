"""Cancellation of attached streams over real HTTP/1.1 sockets (issue 2).

Each test runs the server in-process on 127.0.0.1 with ``--upstream openai``
pointing at a real :class:`~tools.fakes.FakeUpstream`, so that "the upstream
connection closes" is observed by the upstream itself, and "every task of the
run exits" is trio's ``tasks_living`` back at the baseline taken in the same
test (tolerance 0).  The client is a raw socket (:class:`tests.conftest.RawClient`):
closing it is a TCP close.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
import trio.testing

from tests.conftest import RawClient, Server, memory_app, running_server, tasks_living
from tests.memasgi import start_request
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


def chat(content: str = "cancel me", max_tokens: int = 200) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens}


def delta_text(events: list[SSEEvent]) -> str:
    chunks = [orjson.loads(e.data) for e in events if e.data.startswith('{"id"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


@asynccontextmanager
async def upstream_server(
    settings: Settings, fake_openai: FakeUpstream, plan: Any
) -> AsyncIterator[Server]:
    """The server, streaming from ``fake_openai`` answering with ``plan``."""
    fake_openai.plan = plan
    s = settings.replace(upstream="openai", upstream_url=fake_openai.url)
    async with running_server(s) as server:
        yield server


async def settled(server: Server, fake: FakeUpstream) -> None:
    """Block until no upstream connection, no live run and no client stream is left."""
    await fake.wait_for(lambda: fake.open_connections == 0)
    await server.service.runs.wait_idle()
    await server.service.wait_streams_closed()


async def test_cancel_after_two_chunks_closes_upstream_and_ends_every_task(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """A client that leaves after 2 chunks cancels its run at once: the upstream
    connection closes within milliseconds, the partial text is saved (what the
    client got is a prefix of it), and every task of the run has exited."""
    with trio.fail_after(10):
        async with upstream_server(settings, fake_openai, mock_plan("openai", 0.01)) as server:
            baseline = await tasks_living()
            client = await RawClient.post(server.port, CHAT, chat())
            got = [await client.next_event(), await client.next_event()]
            assert all(e is not None for e in got)
            closed_at = trio.current_time()
            await client.aclose()
            await settled(server, fake_openai)

            (conn,) = fake_openai.connections
            assert conn.closed is not None
            assert conn.closed - closed_at < CLOSE_BOUND
            run_id = client.headers["x-run-id"]
            assert server.logs.events("stream_cancelled", trace=run_id) == [
                {"event": "stream_cancelled", "trace": run_id, "reason": "client_disconnect"}
            ]
            saved = await server.service.store.get(PUBLIC_TENANT, run_id)
            assert saved is not None
            assert (saved.status, saved.reason) == ("partial", "client_disconnect")
            received = delta_text([e for e in got if e is not None])
            assert received
            assert saved.content.startswith(received)
            assert len(saved.content) < len(mocktext.expected_text(chat()["messages"], 200))
            assert server.service.runs.runs == {}
            assert await tasks_living() == baseline


async def test_ten_abandoned_streams_leak_no_task_and_no_upstream_connection(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """10 streams dropped by rapid cancellations -- before the first token, after
    one chunk, after two -- leave tasks_living at exactly its baseline and no
    upstream connection open, and every run that started was cancelled."""
    with trio.fail_after(10):
        async with upstream_server(settings, fake_openai, mock_plan("openai", 0.01)) as server:
            baseline = await tasks_living()

            async def abandon(i: int) -> None:
                client = await RawClient.post(server.port, CHAT, chat(f"abandon {i}"))
                try:
                    for _ in range(i % 3):
                        assert await client.next_event() is not None
                finally:
                    await client.aclose()

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
            assert fake_openai.open_connections == 0
            assert server.service.runs.runs == {}
            assert server.service.streams == 0
            assert await tasks_living() == baseline


async def test_twenty_create_then_cancel_cycles_over_sockets(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """20 cycles of "send the request, close the socket at once" never deadlock:
    every run, client stream, upstream connection and task is gone afterwards."""
    with trio.fail_after(10):
        async with upstream_server(settings, fake_openai, mock_plan("openai", 0.01)) as server:
            baseline = await tasks_living()
            for i in range(20):
                client = await RawClient.post(server.port, CHAT, chat(f"cycle {i}"))
                await client.aclose()
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


async def test_disconnect_before_first_token_closes_upstream(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """A client that leaves while the upstream has not sent its first token
    cancels the run at once (LiteLLM #31499, Open WebUI #14384): the upstream
    connection closes, nothing is saved, no task is left."""
    plan = token_plan(["never"], hang_after=0)
    with trio.fail_after(10):
        async with upstream_server(settings, fake_openai, lambda _: plan) as server:
            baseline = await tasks_living()
            client = await RawClient.post(server.port, CHAT, chat())
            await fake_openai.wait_for(lambda: len(fake_openai.requests) == 1)
            (run,) = server.service.runs.runs.values()
            await trio.testing.wait_all_tasks_blocked()
            assert run.log.last_seq == 0
            closed_at = trio.current_time()
            await client.aclose()
            await settled(server, fake_openai)

            (conn,) = fake_openai.connections
            assert conn.closed is not None
            assert conn.closed - closed_at < CLOSE_BOUND
            assert server.logs.events("stream_cancelled", trace=run.id, reason="client_disconnect")
            assert run.log.status.value == "cancelled"
            assert await server.service.store.get(PUBLIC_TENANT, run.id) is None
            assert await tasks_living() == baseline


async def test_disconnect_while_writer_is_blocked_on_a_slow_reader(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """A client that reads nothing blocks the writer in send and, through the
    backpressure window, holds the upstream back; when it then disconnects the
    blocked send ends, the run is cancelled, the upstream closes and the
    partial text (all the server received) is saved."""
    tokens = ["x" * 1000] * 5000  # 5 MB: more than any socket buffer
    plan = token_plan(tokens)
    with trio.fail_after(10):
        async with upstream_server(settings, fake_openai, lambda _: plan) as server:
            baseline = await tasks_living()
            client = await RawClient.post(server.port, CHAT, chat(), rcvbuf=4096)
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
            await client.aclose()
            await settled(server, fake_openai)

            (conn,) = fake_openai.connections
            assert conn.closed is not None
            assert conn.closed - closed_at < CLOSE_BOUND
            assert server.logs.events("stream_cancelled", trace=run.id, reason="client_disconnect")
            saved = await server.service.store.get(PUBLIC_TENANT, run.id)
            assert saved is not None
            assert (saved.status, saved.reason) == ("partial", "client_disconnect")
            assert saved.content == run.log.content
            assert await tasks_living() == baseline
