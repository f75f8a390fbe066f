"""``--event-interval-ms``: deltas that arrive within the interval after an
event are merged into the next event (docs/api.md sections 1 and 2.4).

Every test runs in memory (:mod:`tests.memasgi`) on the mock upstream at
10 ms per token (100 tokens/s) under ``autojump_clock``, so times are exact:
each body write is stamped with the virtual time at which the app made it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.conftest import RecordingUpstream, memory_app, tasks_living
from tests.memasgi import MemoryClient, Write, stamp_writes, start_request
from trio_stream import Settings
from trio_stream.errors import ConfigError
from trio_stream.http.service import Service
from trio_stream.runs import Run
from trio_stream.upstream import mocktext
from trio_stream.upstream.mock import MockUpstream
from trio_stream.wire.request import ChatRequest
from trio_stream.wire.sse import SSEEvent

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hold my tokens"}]
TOKENS = 100
FULL = mocktext.expected_text(MESSAGES, TOKENS)
TOKEN_GAP = 0.010  # the mock's gap: 100 tokens/s
INTERVAL_MS = 50.0


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "mock", "messages": MESSAGES, "stream": True, "max_tokens": TOKENS, **extra}


@asynccontextmanager
async def app_at(
    settings: Settings, interval_ms: float, **changes: Any
) -> AsyncIterator[tuple[Service, Any, RecordingUpstream]]:
    upstream = RecordingUpstream(MockUpstream(TOKEN_GAP))
    s = settings.replace(event_interval_ms=interval_ms, **changes)
    async with memory_app(s, upstream=upstream) as (service, app):
        yield service, app, upstream


def is_delta(event: SSEEvent) -> bool:
    if not event.data.startswith("{"):
        return False
    choices = orjson.loads(event.data).get("choices")
    return bool(choices) and choices[0]["finish_reason"] is None


def deltas(writes: list[Write]) -> list[tuple[float, SSEEvent]]:
    """Every delta event with the time it was written."""
    return [(t, e) for t, events in writes for e in events if is_delta(e)]


def content(event: SSEEvent) -> str:
    return str(orjson.loads(event.data)["choices"][0]["delta"].get("content") or "")


def request_of(upstream: RecordingUpstream) -> ChatRequest:
    (request,) = [r for _, r in upstream.opened]
    return request


async def the_run(service: Service, client: MemoryClient) -> Run:
    await client.wait_until(lambda c: c.status is not None)
    return service.runs.runs[client.headers["x-run-id"]]


async def test_fifth_of_the_events_exact_text_no_added_latency(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """At 100 tokens/s and a 50 ms interval, 100 tokens go out in about a
    fifth as many events (20-22), with exactly the reply's text and ids that
    increase to 100.  The interval adds no latency at either end: the first
    event is written at the first token's time, and the last delta event and
    the terminal frame at the run's end, not up to an interval later."""
    with trio.fail_after(30):
        async with app_at(settings, INTERVAL_MS) as (service, app, upstream):
            async with trio.open_nursery() as nursery:
                client = start_request(nursery, app, "POST", CHAT, json=body())
                writes = stamp_writes(client)
                run = await the_run(service, client)
                await client.finished.wait()
            timed = deltas(writes)
            assert 20 <= len(timed) <= 22
            assert "".join(content(e) for _, e in timed) == FULL
            ids = [int(e.id or 0) for _, e in timed]
            assert ids == sorted(set(ids))
            assert ids[-1] == TOKENS
            assert run.first_token_at is not None
            assert timed[0][0] == run.first_token_at  # time to first token unchanged
            assert ids[0] == 1
            ended_at = upstream.closed_at(request_of(upstream))
            assert timed[-1][0] == pytest.approx(ended_at)
            last_time, last_events = writes[-1]
            assert last_events[-1].data == "[DONE]"
            assert last_time == pytest.approx(ended_at)
            # Between two events: the interval, at least, while the run lasts.
            times = [t for t, _ in timed]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(g >= INTERVAL_MS / 1000 - 1e-9 for g in gaps[:-1])
            assert client.text() == FULL


async def test_interval_zero_is_one_event_per_token(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """The default (0) keeps today's behaviour: at 100 tokens/s a writer that
    keeps up sends each token as its own event, id k for token k, at the
    token's time."""
    assert Settings().event_interval_ms == 0
    with trio.fail_after(30):
        async with app_at(settings, 0) as (_service, app, _upstream):
            async with trio.open_nursery() as nursery:
                client = start_request(nursery, app, "POST", CHAT, json=body())
                writes = stamp_writes(client)
                await client.finished.wait()
            timed = deltas(writes)
            assert [int(e.id or 0) for _, e in timed] == list(range(1, TOKENS + 1))
            assert "".join(content(e) for _, e in timed) == FULL
            times = [t for t, _ in timed]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(g == pytest.approx(TOKEN_GAP) for g in gaps)


async def test_no_coalesce_keeps_one_event_per_delta_in_one_write_per_interval(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """With --no-coalesce every delta stays its own event (ids 1..100, one
    token each), but the deltas held during an interval go out together in
    one write: about a fifth as many writes as events."""
    with trio.fail_after(30):
        async with app_at(settings, INTERVAL_MS, coalesce=False) as (_service, app, _upstream):
            async with trio.open_nursery() as nursery:
                client = start_request(nursery, app, "POST", CHAT, json=body())
                writes = stamp_writes(client)
                await client.finished.wait()
            timed = deltas(writes)
            assert [int(e.id or 0) for _, e in timed] == list(range(1, TOKENS + 1))
            assert "".join(content(e) for _, e in timed) == FULL
            with_deltas = [w for w in writes if any(is_delta(e) for e in w[1])]
            assert 20 <= len(with_deltas) <= 22


async def test_disconnect_during_the_wait_cancels_the_run_at_once(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that leaves while the writer holds tokens back for the
    interval (a long one here: 1 s) still cancels its run at that instant:
    the upstream is closed at the disconnect's time, the run ends
    client_disconnect, the held tokens are never sent, and trio's task count
    is back at its baseline."""
    with trio.fail_after(30):
        async with app_at(settings, 1000.0) as (service, app, upstream):
            baseline = await tasks_living()
            async with trio.open_nursery() as nursery:
                client = start_request(nursery, app, "POST", CHAT, json=body())
                writes = stamp_writes(client)
                run = await the_run(service, client)
                await trio.sleep(0.035)  # 3 more tokens arrive: held, not sent
                assert run.log.last_seq - run.writer_cursor == 3
                assert run.log.outcome is None
                gone_at = trio.current_time()
                await client.disconnect()
                await client.finished.wait()
            request = request_of(upstream)
            assert not upstream.holds(request)
            assert upstream.closed_at(request) == gone_at
            assert run.log.outcome is not None
            assert run.log.outcome.reason == "client_disconnect"
            assert app.logs.events("stream_cancelled", trace=run.id, reason="client_disconnect")
            assert [int(e.id or 0) for _, e in deltas(writes)] == [1]
            assert service.runs.live == 0
            assert service.streams == 0
            assert await tasks_living() == baseline


async def test_stream_false_is_unaffected(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """stream: false ignores the interval: one JSON object with the whole
    text, written at the run's end."""
    with trio.fail_after(30):
        async with app_at(settings, INTERVAL_MS) as (_service, app, upstream):
            async with trio.open_nursery() as nursery:
                client = start_request(nursery, app, "POST", CHAT, json=body(stream=False))
                writes = stamp_writes(client)
                await client.finished.wait()
            assert client.status == 200
            answer = client.json()
            assert answer["choices"][0]["message"]["content"] == FULL
            assert answer["choices"][0]["finish_reason"] == "length"
            (write,) = writes
            assert write[0] == pytest.approx(upstream.closed_at(request_of(upstream)))


async def test_resume_after_a_merged_event_replays_exactly_the_rest(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A detached run's stream is left after two events, the second of which
    merged several tokens (its id skips).  GET /events with Last-Event-ID set
    to that id replays exactly the tokens after it, then follows the run to
    [DONE]: the two texts concatenated are the reply, nothing twice."""
    with trio.fail_after(30):
        async with app_at(settings, INTERVAL_MS) as (service, app, _upstream):
            async with trio.open_nursery() as nursery:
                first = start_request(nursery, app, "POST", CHAT, json=body(detach=True))
                first_writes = stamp_writes(first)
                run = await the_run(service, first)
                await first.wait_until(lambda c: sum(map(is_delta, c.events())) >= 2)
                await first.disconnect()
                await first.finished.wait()
                got = [e for _, e in deltas(first_writes)]
                assert len(got) == 2
                last_id = int(got[-1].id or 0)
                assert last_id > 2  # merged: tokens 2..last_id in one event
                assert content(got[-1]) == "".join(
                    list(mocktext.tokens(MESSAGES, TOKENS))[1:last_id]
                )
                assert run.log.outcome is None  # the resume follows it live
                path = f"/v1/runs/{run.id}/events"
                second = start_request(
                    nursery, app, "GET", path, headers={"last-event-id": str(last_id)}
                )
                second_writes = stamp_writes(second)
                await second.finished.wait()
            assert second.status == 200
            rest = [e for _, e in deltas(second_writes)]
            assert int(rest[0].id or 0) > last_id
            assert first.text() + second.text() == FULL
            assert second.events()[-1].data == "[DONE]"


async def test_a_full_window_ends_the_wait(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """Backpressure is unchanged and the interval never throttles the
    upstream: with --window 2, an attached run that fills its window wakes
    the holding writer at once, so 100 tokens still end at the upstream's
    pace (about 1 s) instead of 2 tokens per 50 ms (2.5 s)."""
    with trio.fail_after(30):
        async with app_at(settings, INTERVAL_MS, window=2) as (service, app, upstream):
            async with trio.open_nursery() as nursery:
                client = start_request(nursery, app, "POST", CHAT, json=body())
                writes = stamp_writes(client)
                run = await the_run(service, client)
                await client.finished.wait()
            request = request_of(upstream)
            took = upstream.closed_at(request) - upstream.opened_at(request)
            assert took < (TOKENS + 5) * TOKEN_GAP
            assert run.log.last_seq - run.writer_cursor == 0
            assert client.text() == FULL
            assert len(deltas(writes)) < TOKENS


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_negative_or_nan_interval_is_refused(bad: float) -> None:
    """--event-interval-ms below 0 (or NaN) is a configuration error."""
    with pytest.raises(ConfigError, match="--event-interval-ms must be >= 0"):
        Settings(event_interval_ms=bad).validate()
    assert Settings(event_interval_ms=0.0).validate()
