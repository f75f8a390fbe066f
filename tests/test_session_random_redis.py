"""The random session walk of tests/test_session_random.py, on the Redis backend.

The same harness (requests in 20 sessions, disconnects, interrupts, stuck
upstream closes and slow saves, some past the supersede deadline), but the
session table lives in a real ``redis-server`` (cluster mode with one node).
A real server means real time, so the walk is shorter and its delays are
scaled down with the supersede deadline: the ratios that make some
predecessors outlive it are kept.  And an interrupt names a session whose
run is still running when there is one (``RedisHarness.interrupt_target``).

Invariants, after every step: in every session at most one unfenced run holds
its upstream request (checked at every upstream open too), and the session's
current run in Redis is its newest run while that one is live.  At the end:
every client finished, Redis holds no session, no run is live, tasks_living
is back at its exact baseline, every run was saved at most once, and every
client saw a prefix of what its run saved.
"""

from __future__ import annotations

import random

import trio
import trio.testing

from tests import test_session_random as walk
from tests.conftest import RecordingUpstream, SlowStore, memory_app, task_census, tasks_living
from tests.redis_server import RedisServer
from trio_stream import Settings
from trio_stream.shared.redis import RedisState
from trio_stream.store import Message
from trio_stream.upstream import mocktext
from trio_stream.upstream.mock import MockUpstream
from trio_stream.wire.request import ChatRequest

STEPS = 300
SCALE = 0.1  # of the in-memory walk's delays, with --supersede-timeout 2.0 -> 0.2
STUCK_SCALE = 0.25  # of its stuck closes and saves: 3.0 -> 0.75, well past 0.2


class RedisHarness(walk.Harness):
    """The walk, with the session table read from Redis."""

    def _check(self) -> None:
        """What can be checked without I/O: one unfenced holder per session
        (the runs are all local to this one node)."""
        by_session: dict[str | None, list[str]] = {}
        for run in self.service.runs.runs.values():
            if not run.log.fenced and self.upstream.holds(run.request):
                by_session.setdefault(run.session_id, []).append(run.id)
        for session, holders in by_session.items():
            assert len(holders) <= 1, (session, holders)

    async def check_table(self) -> None:
        """The session table in Redis: its current run is the run of the last
        claim (the session's epoch) while that run is live, else none.  (With
        concurrent claims the order of their ``stream_start`` lines may differ
        from the order of the claims, so the epoch, not the log, says which
        is newest.)"""
        shared = self.service.runs.shared
        assert isinstance(shared, RedisState)
        for session in walk.SESSIONS:
            # One read, so that "live" and "current" are of the same moment.
            fields = await shared.client.hgetall(shared._s((walk.TENANT, session)))
            live = {k[2:] for k in fields if k.startswith("r:")}
            runs = [self.service.runs.runs.get(r) for r in live]
            if not live or any(r is None for r in runs):
                continue  # a run is mid-release: its epoch is no longer known here
            # The last claim's run is current while it is live; once it has
            # left, no run is (an older straggler never becomes current again).
            last = [r.id for r in runs if r is not None and str(r.epoch) == fields["epoch"]]
            assert fields.get("cur") == (last[0] if last else None), (session, fields)

    def interrupt_target(self) -> str:
        """A session whose run is still running, if any (at random among
        them), else any session.  In real time a run lives for its few tokens
        (10 ms each) while a step's Redis checks take their own time, which
        a loaded machine stretches: interrupts aimed at random sessions then
        found no run to interrupt, and the walk never interrupted anything.
        (In the in-memory walk's virtual time only the pauses move time.)"""
        runs = self.service.runs.runs.values()
        live = sorted({r.session_id for r in runs if r.session_id and r.log.outcome is None})
        return self.rng.choice(live or walk.SESSIONS)

    async def step(self, step: int) -> None:
        await super().step(step)
        try:
            await self.check_table()
        except AssertionError as exc:
            self.violations.append(repr(exc))


async def test_random_interleavings_on_redis(settings: Settings, own_redis: RedisServer) -> None:
    """300 random steps over 20 sessions, with the session table in Redis,
    keep every invariant of the in-memory walk (module docstring)."""
    # --node-lease 1: idle Redis connections close after 1 s, so the pool a
    # burst opened is gone again before the task count is compared (the
    # listener's connection is not the pool's: it stays, as at the baseline).
    cfg = settings.replace(redis=own_redis.url, supersede_timeout=2.0 * SCALE, node_lease=1.0)
    stuck: dict[str, tuple[float, float]] = {}
    harness: list[RedisHarness] = []

    def stuck_close(request: ChatRequest) -> float:
        return stuck[request.messages[0]["content"]][0] * STUCK_SCALE

    def save_delay(message: Message) -> float:
        run = harness[0].service.runs.runs[message.run_id]
        return stuck[run.request.messages[0]["content"]][1] * STUCK_SCALE

    upstream = RecordingUpstream(
        MockUpstream(0.01), stuck_close=stuck_close, on_open=lambda _: harness[0].check()
    )
    store = SlowStore(":memory:", save_delay)
    pauses = tuple(p * SCALE for p in walk.PAUSES)
    with trio.fail_after(120):
        async with memory_app(cfg, upstream=upstream, store=store) as (service, app):
            baseline = await tasks_living()
            tasks = task_census()
            async with trio.open_nursery() as nursery:
                h = RedisHarness(random.Random(walk.SEED), nursery, app, service, upstream, stuck)
                harness.append(h)
                rng = random.Random(walk.SEED + 1)
                for step in range(STEPS):
                    await h.step(step)
                    await trio.sleep(rng.choice(pauses))
            await service.runs.wait_idle()
            assert all(r.client.finished.is_set() for r in h.requests)
            for session in walk.SESSIONS:
                assert await service.runs.shared.live((walk.TENANT, session)) == {}
            assert service.runs.live == 0
            with trio.move_on_after(5):
                while await tasks_living() != baseline:  # noqa: ASYNC110
                    await trio.sleep(0.1)  # the walk's idle pool connections close after 1 s
            now = task_census()
            assert await tasks_living() == baseline, f"beyond: {now - tasks}, gone: {tasks - now}"
            saved = {
                m.run_id: m
                for s in walk.SESSIONS
                for m in await store.session_messages(walk.TENANT, s)
            }
    assert h.violations == []
    assert app.logs.events("run_crashed") == [], app.logs.events("run_crashed")
    calls = [m.run_id for m in store.saves]
    assert len(calls) == len(set(calls)), "a run was saved twice"
    assert set(saved) == set(calls)
    for req in h.requests:
        if text := walk.received(req):
            content = saved[req.client.headers["x-run-id"]].content
            assert content.startswith(text)
            assert mocktext.expected_text(req.messages, req.max_tokens).startswith(content)
    reasons = {r["reason"] for r in app.logs.events("stream_cancelled")}
    assert {"superseded", "interrupted"} <= reasons
    assert app.logs.events("prev_stream_timeout_on_cancel")
