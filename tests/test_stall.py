"""Stalled clients (docs/api.md section 3.6), over real sockets, on HTTP/1.1, h2c and
h2 by ALPN over TLS (``tests/protocols.py``).

A client that stops reading is cut after ``--stall-timeout`` (reason
``client_stalled``) and its upstream connection is closed; and neither a
supersede, nor an interrupt, nor a graceful shutdown waits on such a client.

How a client stalls here:

* HTTP/1.1: a raw socket with a tiny ``SO_RCVBUF`` sends its request and never
  reads, so the server's socket buffers fill and hypercorn's (shielded)
  ``send_all`` blocks; :class:`~trio_stream.http.transport.GuardedStream` bounds it.
* HTTP/2: :mod:`trio_stream.load.h2` acknowledges data only when a stream is
  read, so a stream that is never read exhausts its flow-control window and
  the app's ``send`` waits for credit.

The upstream is a :class:`~tools.fakes.FakeUpstream` that streams 1 KB tokens
as fast as it can (20,000 of them), so only backpressure stops it, and whose
connection records show when the server closed it.  These tests wait in real
time, because a stall *is* real time on a real socket; every wait is bounded.
Each test also holds the invariants every guarantee shares: the run is saved
exactly once (the store records its calls), and ``tasks_living`` returns to
its baseline once the client is gone (no connection is left open).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, StreamBuffer
from hypercorn.trio.worker_context import EventWrapper

from tests.conftest import RecordingStore, Server, WaitableSink, tasks_living, waitable_server
from tests.protocols import PROTOCOLS, Exchange, open_client, serving
from tools.fakes import FakeUpstream, Plan, Step, mock_plan, openai_chunk
from trio_stream import Settings
from trio_stream.load.h2 import open_h2_connection
from trio_stream.runs import Run
from trio_stream.server import hypercorn_fixes
from trio_stream.upstream import mocktext

PROMPT_A = [{"role": "user", "content": "a long answer nobody reads"}]
PROMPT_B = [{"role": "user", "content": "prompt B"}]
BIG_TOKEN = "x" * 1000
TOKENS = 20_000
MAX_BUFFERED_TOKENS = 1_000  # 1 MB: what a stalled client may make us hold, generously
CHAT = "/v1/chat/completions"


def flood_unless_b(body: dict[str, Any]) -> Plan:
    """Prompt B is answered like the mock; anything else is a 20 MB flood."""
    if body["messages"] == PROMPT_B:
        return mock_plan("openai")(body)
    steps = [Step(openai_chunk(BIG_TOKEN)) for _ in range(TOKENS)]
    steps += [Step(openai_chunk(finish="stop")), Step(b"data: [DONE]\n\n")]
    return Plan(steps=steps)


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeUpstream:
    upstream = FakeUpstream("openai", plan=flood_unless_b)
    await nursery.start(upstream.serve)
    return upstream


def on(settings: Settings, fake: FakeUpstream, **changes: Any) -> Settings:
    return settings.replace(upstream="openai", upstream_url=fake.url, **changes)


def chat_body(messages: list[dict[str, str]], max_tokens: int | None = None) -> dict[str, Any]:
    return {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens}


@asynccontextmanager
async def stalled_client(
    server: Server, proto: str, session: str | None = None
) -> AsyncIterator[None]:
    """Open one streaming request of PROMPT_A that is never read, over ``proto``
    (one of :data:`~tests.protocols.PROTOCOLS`); leaving the block closes its connection."""
    headers = (("x-session-id", session),) if session else ()
    async with open_client(server.port, proto, rcvbuf=4096) as client:
        await client.post(CHAT, chat_body(PROMPT_A), headers)
        yield  # never read: the socket buffers fill (HTTP/1.1), the window runs out (HTTP/2)


async def stuck_run(server: Server, logs: WaitableSink) -> Run:
    """The stalled request's run, once its writer has stopped advancing.

    The run may be at most ``window`` entries ahead of its writer; when it is,
    and the writer's cursor does not move for 0.2 s, the client is stalled.
    """
    record = await logs.wait_for("stream_start")
    run = server.service.runs.runs[record["trace"]]
    window = run.window
    assert window is not None
    while True:
        while run.log.last_seq - run.writer_cursor < window:
            await run.wait_changed()
        cursor = run.writer_cursor
        await trio.sleep(0.2)  # real time: that is what a stall is
        if run.writer_cursor == cursor:
            return run


async def cut(server: Server, logs: WaitableSink, fake: FakeUpstream) -> dict[str, Any]:
    """Wait for the stall cut: logged, the run cleaned up, its upstream closed."""
    record = await logs.wait_for("stream_cancelled", reason="client_stalled")
    await server.service.runs.wait_idle()
    await fake.wait_for(lambda: fake.open_connections == 0)
    return record


async def test_h2_stream_buffer_holds_writer_while_nothing_drains() -> None:
    """hypercorn's HTTP/2 stream buffer, as fixed by trio_stream.server.hypercorn_fixes,
    keeps a writer paused while the peer's window is 0 (every pop takes 0
    bytes) and resumes it once the buffer drains below its low-water mark.
    hypercorn 0.18's own pop resumed the writer on any 0-byte pop, so a
    stalled HTTP/2 client was never noticed and the buffer grew without bound."""
    hypercorn_fixes.apply()
    assert hypercorn_fixes.applied()
    buffer = StreamBuffer(EventWrapper)
    pushed = trio.Event()

    async def writer() -> None:
        await buffer.push(b"x" * BUFFER_HIGH_WATER)
        pushed.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(3):
                assert await buffer.pop(0) == b""  # the peer's window is 0
            await trio.testing.wait_all_tasks_blocked()
            assert not pushed.is_set()
            await buffer.pop(BUFFER_HIGH_WATER // 2 + 1)  # now below the low-water mark
    assert pushed.is_set()


def stall_server(
    cfg: Settings,
) -> tuple[AbstractAsyncContextManager[tuple[Server, WaitableSink]], RecordingStore]:
    """:func:`waitable_server` for ``cfg``, and its store, which records every save."""
    store = RecordingStore(cfg.db)
    return waitable_server(cfg, store=store), store


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_stalled_client_is_cut_within_stall_timeout(
    settings: Settings, fake: FakeUpstream, proto: str, tmp_path: Path
) -> None:
    """A client that never reads is cut no sooner than --stall-timeout and
    within --stall-timeout + 1 s of its request (reason client_stalled); its
    run ends and its upstream connection closes in that time; meanwhile it
    held back the upstream (a bounded number of tokens was read), and the
    partial answer is saved once; no task is left."""
    cfg = on(serving(settings, proto, tmp_path), fake, stall_timeout=1.0)
    served, store = stall_server(cfg)
    async with served as (server, logs):
        baseline = await tasks_living()
        t0 = trio.current_time()
        async with stalled_client(server, proto):
            with trio.fail_after(cfg.stall_timeout + 1):
                record = await cut(server, logs, fake)
            elapsed = trio.current_time() - t0
            end = await logs.wait_for("stream_end", trace=record["trace"])
        await server.service.wait_streams_closed()
        assert await tasks_living() == baseline
    assert cfg.stall_timeout <= elapsed < cfg.stall_timeout + 1
    assert end["status"] == "cancelled"
    assert 0 < end["tokens"] < MAX_BUFFERED_TOKENS
    (saved,) = store.saves_of(record["trace"])
    assert (saved.status, saved.reason, saved.events) == (
        "partial",
        "client_stalled",
        end["tokens"],
    )
    assert len(fake.connections) == 1


async def answer(exchange: Exchange) -> tuple[int, bytes]:
    """The status and whole body of ``exchange``."""
    status = await exchange.start()
    await exchange.read_all()
    return status, bytes(exchange.body)


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_supersede_does_not_wait_for_a_stalled_client(
    settings: Settings, fake: FakeUpstream, proto: str, tmp_path: Path
) -> None:
    """A new prompt in the session of a run whose client is stalled completes
    at once: the old run's cleanup does not wait for its writer (stuck in a
    send), so prev_stream_finished_cleanly is logged, never the timeout, and
    B answers fully long before the stall cut; the stalled writer is cut
    later, each run is saved once, and everything ends."""
    cfg = on(serving(settings, proto, tmp_path), fake, stall_timeout=2.0)
    served, store = stall_server(cfg)
    async with served as (server, logs):
        baseline = await tasks_living()
        async with (
            stalled_client(server, proto, session="S"),
            open_client(server.port, proto) as client,
        ):
            with trio.fail_after(5):
                run_a = await stuck_run(server, logs)
            t_b = trio.current_time()
            with trio.fail_after(1):
                b = await client.post(CHAT, chat_body(PROMPT_B, 8), (("x-session-id", "S"),))
                status, b_body = await answer(b)
            b_took = trio.current_time() - t_b
            with trio.fail_after(cfg.stall_timeout + 1):
                await logs.wait_for("stream_end", trace=run_a.id)
                await server.service.runs.wait_idle()
        await server.service.wait_streams_closed()
        # B's upstream connection may stay pooled: one task of the fake.
        assert await tasks_living() == baseline + fake.open_connections
    assert b_took < 1
    assert status == 200
    assert b_body.endswith(b"data: [DONE]\n\n")
    text = "".join(
        orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in b_body.split(b"\n")
        if line.startswith(b"data: {")
    )
    assert text == mocktext.expected_text(PROMPT_B, 8)
    assert [r["trace"] for r in logs.events("prev_stream_finished_cleanly")] == [run_a.id]
    assert logs.events("prev_stream_timeout_on_cancel") == []
    assert logs.events("stream_cancelled", trace=run_a.id)[0]["reason"] == "superseded"
    (saved_a,) = store.saves_of(run_a.id)
    assert (saved_a.status, saved_a.reason) == ("partial", "superseded")
    (saved_b,) = store.saves_of(b.headers["x-run-id"])
    assert (saved_b.status, saved_b.content) == ("complete", text)
    assert len(server.service.runs.sessions) == 0
    assert fake.open_connections <= 1  # at most B's idle keep-alive connection


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_interrupt_does_not_wait_for_a_stalled_client(
    settings: Settings, fake: FakeUpstream, proto: str, tmp_path: Path
) -> None:
    """POST /v1/sessions/{id}/interrupt on a run whose client is stalled
    cancels it (reason interrupted), and the run's cleanup -- upstream closed,
    partial answer saved once -- finishes at once, not after the stall cut;
    no task is left."""
    cfg = on(serving(settings, proto, tmp_path), fake, stall_timeout=2.0)
    served, store = stall_server(cfg)
    async with served as (server, logs):
        baseline = await tasks_living()
        async with (
            stalled_client(server, proto, session="S"),
            open_client(server.port, proto) as client,
        ):
            with trio.fail_after(5):
                run_a = await stuck_run(server, logs)
            with trio.fail_after(1):
                status, body = await answer(await client.post("/v1/sessions/S/interrupt", {}))
                await run_a.done.wait()
                await fake.wait_for(lambda: fake.open_connections == 0)
            assert len(store.saves_of(run_a.id)) == 1
            with trio.fail_after(cfg.stall_timeout + 1):
                await logs.wait_for("stream_end", trace=run_a.id)
        await server.service.wait_streams_closed()
        assert await tasks_living() == baseline
    assert (status, orjson.loads(body)) == (200, {"interrupted": True, "run_id": run_a.id})
    assert logs.events("stream_cancelled", trace=run_a.id)[0]["reason"] == "interrupted"
    (saved,) = store.saves_of(run_a.id)
    assert (saved.status, saved.reason) == ("partial", "interrupted")


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_graceful_shutdown_does_not_hang_on_a_stalled_client(
    settings: Settings, fake: FakeUpstream, proto: str, tmp_path: Path
) -> None:
    """With a stalled client and a 30 s --stall-timeout, a graceful shutdown
    still completes within --graceful-timeout + 2 s: the run is cancelled
    (reason shutdown), saved once, its upstream closed, the stuck write cut,
    and no task is left."""
    cfg = on(serving(settings, proto, tmp_path), fake, stall_timeout=30.0, graceful_timeout=1.0)
    served, store = stall_server(cfg)
    baseline = await tasks_living()
    async with served as (server, logs), stalled_client(server, proto):
        with trio.fail_after(5):
            run_a = await stuck_run(server, logs)
        t0 = trio.current_time()
        server.shutdown.set()
        with trio.fail_after(cfg.graceful_timeout + 2):
            await logs.wait_for("shutdown_complete")
        took = trio.current_time() - t0
        await fake.wait_for(lambda: fake.open_connections == 0)
    assert await tasks_living() == baseline
    assert took < cfg.graceful_timeout + 2
    assert logs.events("stream_cancelled", trace=run_a.id)[0]["reason"] == "shutdown"
    (saved,) = store.saves_of(run_a.id)
    assert (saved.status, saved.reason) == ("partial", "shutdown")
    assert server.service.runs.live == 0


async def test_h2_json_answer_to_a_client_that_never_reads_is_cut(settings: Settings) -> None:
    """stream: false over HTTP/2: an answer larger than the client's window,
    to a client that never reads, is cut within --stall-timeout + 1 s of the
    run's end; the stream slot is freed (it does not wait for shutdown)."""
    cfg = settings.replace(stall_timeout=1.0, mock_delay_ms=0)
    body = {"model": "m", "messages": PROMPT_A, "stream": False, "max_tokens": 20000}
    async with (
        waitable_server(cfg) as (server, logs),
        open_h2_connection("127.0.0.1", server.port) as conn,
    ):
        head = [("content-type", "application/json")]
        await conn.request("POST", "/v1/chat/completions", head, orjson.dumps(body))
        record = await logs.wait_for("stream_start")
        run = server.service.runs.runs[record["trace"]]
        await run.done.wait()
        ended = trio.current_time()
        with trio.fail_after(cfg.stall_timeout + 1):
            await server.service.wait_streams_closed()
        # Cut by the stall deadline, which started when the writer (woken by
        # the same run end, maybe before this task) began its send.
        assert trio.current_time() - ended >= cfg.stall_timeout - 0.1
