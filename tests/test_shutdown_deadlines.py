"""Shutdown's save deadlines, in virtual time (memory driver + autojump).

``server._drain`` gives a run that ends during the grace period its full
``--save-timeout`` to save; only the runs it cancels once the grace period is
over get the short ``SHUTDOWN_CLEANUP`` deadline, which keeps the exit within
``--graceful-timeout`` + 2 s (docs/design.md section 10).  The store is a
:class:`~tests.conftest.SlowStore`, whose save takes 2 s: more than
``SHUTDOWN_CLEANUP``, less than ``--save-timeout``.  The real-process
shutdown is tested in ``tests/test_shutdown.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.trio.worker_context import WorkerContext

from tests.conftest import SlowStore, memory_app
from tests.memasgi import MemoryClient, start_request
from trio_stream import Settings
from trio_stream.http.service import Service
from trio_stream.runs import Run
from trio_stream.server.serve import SHUTDOWN_CLEANUP, SHUTDOWN_FLUSH, _drain
from trio_stream.store import Message
from trio_stream.upstream import mocktext

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "save me while we shut down"}]
SAVE_TAKES = 2.0


def chat(max_tokens: int) -> dict[str, Any]:
    return {"messages": MESSAGES, "stream": True, "max_tokens": max_tokens}


def slow_store() -> SlowStore:
    def delay(_: Message) -> float:
        return SAVE_TAKES

    return SlowStore(":memory:", delay)


async def started_run(service: Service, client: MemoryClient) -> Run:
    """The run behind a streaming request, once its first event has arrived."""
    await client.wait_until(lambda c: c.events())
    return service.runs.runs[client.headers["x-run-id"]]


async def test_run_ending_in_the_grace_period_gets_the_full_save_timeout(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A run that completes during the grace period, and whose save takes 2 s
    (more than SHUTDOWN_CLEANUP, less than --save-timeout), is saved as
    complete: the short shutdown deadline does not apply to it.  Its client
    gets the whole reply and [DONE], and the drain ends once the save is done,
    long before the grace period is over."""
    s = settings.replace(graceful_timeout=10.0, save_timeout=5.0, mock_delay_ms=20)
    assert SHUTDOWN_CLEANUP < SAVE_TAKES < s.save_timeout
    with trio.fail_after(60):
        async with memory_app(s, store=slow_store()) as (service, app):
            async with trio.open_nursery() as nursery:
                client = start_request(nursery, app, "POST", CHAT, json=chat(10))
                run = await started_run(service, client)
                t0 = trio.current_time()
                await _drain(service, WorkerContext(None), lambda: None)
                drained = trio.current_time() - t0
            saved = await service.store.get(run.tenant, run.id)
    assert saved is not None
    assert (saved.status, saved.content) == ("complete", mocktext.expected_text(MESSAGES, 10))
    assert client.text() == saved.content
    assert client.events()[-1].data == "[DONE]"
    assert not app.logs.events("save_timeout")
    assert not app.logs.events("stream_cancelled")
    assert SAVE_TAKES <= drained < s.graceful_timeout


async def test_run_cancelled_after_the_grace_period_gets_the_short_deadline(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A run still going when the grace period ends is cancelled (shutdown),
    new connections stop being accepted only then, and its save gets
    SHUTDOWN_CLEANUP, not --save-timeout: a 2 s save is cut (save_timeout)
    and the drain ends within --graceful-timeout + SHUTDOWN_CLEANUP +
    SHUTDOWN_FLUSH."""
    s = settings.replace(graceful_timeout=1.0, save_timeout=5.0, mock_delay_ms=20)
    stopped_accepting: list[float] = []
    with trio.fail_after(60):
        async with memory_app(s, store=slow_store()) as (service, app):
            async with trio.open_nursery() as nursery:
                client = start_request(nursery, app, "POST", CHAT, json=chat(1000))  # 20 s
                run = await started_run(service, client)
                t0 = trio.current_time()
                await _drain(
                    service, WorkerContext(None),
                    lambda: stopped_accepting.append(trio.current_time() - t0),
                )  # fmt: skip
                drained = trio.current_time() - t0
            saved = await service.store.get(run.tenant, run.id)
    assert stopped_accepting == [pytest.approx(s.graceful_timeout)]
    assert run.log.outcome is not None
    assert run.log.outcome.reason == "shutdown"
    assert [r["trace"] for r in app.logs.events("save_timeout")] == [run.id]
    assert saved is None
    assert s.graceful_timeout + SHUTDOWN_CLEANUP <= drained
    assert drained <= s.graceful_timeout + SHUTDOWN_CLEANUP + SHUTDOWN_FLUSH


async def test_a_save_under_way_when_the_grace_period_ends_is_cut_short(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A save that started inside the grace period but would outlast it by far
    (5 s, with --save-timeout 10 s) is cut SHUTDOWN_CLEANUP after the grace
    period ends: the exit stays within --graceful-timeout + 2 s even with a
    stuck database (save_timeout is logged, nothing is saved twice)."""
    s = settings.replace(graceful_timeout=1.0, save_timeout=10.0, mock_delay_ms=20)

    def delay(_: Message) -> float:
        return 5.0

    store = SlowStore(":memory:", delay)
    with trio.fail_after(60):
        async with memory_app(s, store=store) as (service, app), trio.open_nursery() as nursery:
            client = start_request(nursery, app, "POST", CHAT, json=chat(20))  # ~0.4 s
            run = await started_run(service, client)
            t0 = trio.current_time()
            await _drain(service, WorkerContext(None), lambda: None)
            await run.done.wait()
            ended = trio.current_time() - t0
    assert run.log.outcome is not None
    assert run.log.outcome.reason == "length"  # it completed inside the grace period
    assert [r["trace"] for r in app.logs.events("save_timeout")] == [run.id]
    assert ended <= s.graceful_timeout + SHUTDOWN_CLEANUP + 0.01
