"""A burst of tokens: the writer waits it out without waking per token
(``BurstWatch``, docs/design.md section 7), and never holds back a burst
that has stopped."""

from __future__ import annotations

import collections
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
import trio.testing

from tests.conftest import memory_app, tasks_living
from tests.memasgi import stamp_writes, start_request
from trio_stream import Settings
from trio_stream.http.service import Service
from trio_stream.upstream import Item, mocktext
from trio_stream.upstream.base import Finish
from trio_stream.upstream.mock import MockUpstream
from trio_stream.wire.request import ChatRequest
from trio_stream.wire.sse import SSEEvent

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "a burst"}]


def body(tokens: int) -> dict[str, Any]:
    return {"model": "mock", "messages": MESSAGES, "stream": True, "max_tokens": tokens}


class Steps(trio.abc.Instrument):
    """Task steps, by task name."""

    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1


class Pausing(MockUpstream):
    """The mock's tokens with a checkpoint before each (as ``--mock-delay-ms
    0``), in bursts of ``burst`` tokens separated by ``pause`` seconds."""

    def __init__(self, burst: int, pause: float) -> None:
        super().__init__(0)
        self.burst, self.pause = burst, pause

    async def _items(self, request: ChatRequest) -> AsyncGenerator[Item, None]:
        tokens = list(mocktext.tokens(request.messages, request.max_tokens))
        for i, token in enumerate(tokens):
            if i and i % self.burst == 0:
                await trio.sleep(self.pause)
            else:
                await trio.lowlevel.checkpoint()
            yield token
        yield Finish(mocktext.reply_length(request.max_tokens)[1])


@asynccontextmanager
async def app_with(
    settings: Settings, upstream: MockUpstream
) -> AsyncIterator[tuple[Service, Any]]:
    async with memory_app(settings, upstream=upstream) as (service, app):
        yield service, app


def delta_ids(events: list[SSEEvent]) -> list[int]:
    out = []
    for e in events:
        if e.data.startswith("{"):
            choice = orjson.loads(e.data)["choices"][0]
            if choice["finish_reason"] is None:
                out.append(int(e.id or 0))
    return out


async def test_fast_answers_cost_about_one_task_step_per_token(settings: Settings) -> None:
    """16 answers of 300 tokens at once, a checkpoint before each token (the
    mock at 0 ms): each reader steps once per token, and the writers do not
    -- they park until their burst stops or fills the window, watched by one
    task for all -- so all tasks together take fewer than 1.25 steps per
    token (over 2 when each writer yielded per token), and every answer is
    exact: its whole text, ids increasing to 300."""
    streams, tokens = 16, 300
    steps = Steps()
    with trio.fail_after(30):
        async with app_with(settings, MockUpstream(0)) as (_service, app):
            baseline = await tasks_living()
            async with trio.open_nursery() as nursery:
                trio.lowlevel.add_instrument(steps)
                try:
                    clients = []
                    for _ in range(streams):
                        client = start_request(nursery, app, "POST", CHAT, json=body(tokens))
                        clients.append((client, stamp_writes(client)))
                    for client, _ in clients:
                        await client.finished.wait()
                finally:
                    trio.lowlevel.remove_instrument(steps)
            assert await tasks_living() == baseline
    for client, writes in clients:
        assert client.text() == mocktext.expected_text(MESSAGES, tokens)
        ids = [i for _, events in writes for i in delta_ids(events)]
        assert ids == sorted(set(ids))
        assert ids[-1] == tokens
    assert sum(steps.steps.values()) < 1.25 * streams * tokens, steps.steps


async def test_a_burst_that_stops_goes_out_at_once(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """Bursts of 10 tokens, 1 s apart: each burst is written before the
    pause that follows it (at the burst's own time), never held until the
    next token arrives -- the writer parked for the burst is woken when its
    backlog stops growing."""
    tokens, burst = 50, 10
    with trio.fail_after(30):
        async with (
            app_with(settings, Pausing(burst, 1.0)) as (_service, app),
            trio.open_nursery() as nursery,
        ):
            start = trio.current_time()
            client = start_request(nursery, app, "POST", CHAT, json=body(tokens))
            writes = stamp_writes(client)
            await client.finished.wait()
    assert client.text() == mocktext.expected_text(MESSAGES, tokens)
    for k in range(tokens // burst):
        # Every token of burst k is written within its second.
        written = [
            t for t, events in writes for i in delta_ids(events) if k * burst < i <= (k + 1) * burst
        ]
        assert written
        assert all(start + k <= t < start + k + 0.5 for t in written), (k, written)
        before_pause = [i for t, events in writes if t < start + k + 0.5 for i in delta_ids(events)]
        assert max(before_pause) == (k + 1) * burst
