"""Supersede-and-await-with-deadline, in virtual time (memory driver + autojump).

The incident replayed with its literal timings ("B 100 ms after A", "stopped
after 2 s", "50 ms apart"), which ``autojump_clock`` makes exact, and the
deadline path: a predecessor whose cleanup is stuck (a shielded 5 s save, or
an upstream call that ignores cancellation for 5 s) makes the new run wait
exactly ``--supersede-timeout``, is then fenced, and can neither emit an
event, nor remove its successor's session entry, nor save over it.

The upstream is the built-in mock wrapped in
:class:`~tests.conftest.RecordingUpstream`, which records when each request
opens and closes its upstream stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.conftest import RecordingUpstream, SlowStore, memory_app, tasks_living
from tests.memasgi import MemoryClient, start_request
from trio_stream import RecordingSink, Service, Settings, TrioStreamApp
from trio_stream.runs import Run
from trio_stream.store import Message
from trio_stream.upstream import mocktext
from trio_stream.upstream.mock import MockUpstream
from trio_stream.wire.request import ChatRequest

PROMPT_A = [{"role": "user", "content": "prompt A"}]
PROMPT_B = [{"role": "user", "content": "prompt B"}]
PROMPT_C = [{"role": "user", "content": "prompt C"}]
TENANT = "public"  # no API keys configured
STUCK = 5.0  # how long the predecessor's cleanup is stuck


def chat(
    nursery: trio.Nursery, app: TrioStreamApp, messages: list[dict[str, str]], max_tokens: int,
    session: str | None = None,
) -> MemoryClient:  # fmt: skip
    body = {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens}
    headers = {"X-Session-Id": session} if session else {}
    return start_request(nursery, app, "POST", "/v1/chat/completions", json=body, headers=headers)


def chunks(client: MemoryClient) -> int:
    return sum(1 for e in client.events() if '"choices"' in e.data)


def error_code(client: MemoryClient) -> str | None:
    errors = [orjson.loads(e.data)["error"] for e in client.events() if '"error"' in e.data]
    return errors[-1]["code"] if errors else None


def done(client: MemoryClient) -> bool:
    events = client.events()
    return bool(events) and events[-1].data == "[DONE]"


def lifecycle(logs: RecordingSink, *traces: str) -> list[tuple[str, str, str | None]]:
    names = ("stream_start", "stream_cancelled", "prev_stream_finished_cleanly",
             "prev_stream_timeout_on_cancel", "stream_end")  # fmt: skip
    return [
        (r["event"], r["trace"], r.get("reason"))
        for r in logs.records
        if r["event"] in names and r.get("trace") in traces
    ]


def _current_run(service: Service, key: tuple[str, str]) -> Run:
    run_id = service.runs.sessions.current(key)
    assert run_id is not None
    return service.runs.runs[run_id]


def request_of(upstream: RecordingUpstream, messages: list[dict[str, str]]) -> ChatRequest:
    return next(r for _, r in upstream.opened if r.messages == messages)


@asynccontextmanager
async def mock_app(
    settings: Settings, delay_ms: float, **service_kw: Any
) -> AsyncIterator[tuple[Service, TrioStreamApp, RecordingUpstream, RecordingSink]]:
    """A memory app on the mock upstream (``delay_ms`` per token), recorded."""
    upstream = service_kw.pop("upstream", None) or RecordingUpstream(MockUpstream(delay_ms / 1000))
    async with memory_app(settings, upstream=upstream, **service_kw) as (service, app):
        yield service, app, upstream, app.logs


# -- the incident's timeline, literally ----------------------------------------


async def test_b_100ms_after_a_supersedes_before_first_token(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """Scenario 3 with its real timings: A at 0 s, B in the same session at
    0.1 s, before A's first token (0.2 s).  A's upstream call ignores the
    cancel for 0.5 s (within the 2 s deadline): B's upstream opens exactly
    when A's has closed, B finishes exactly 10 tokens later, A's client gets
    only the superseded error event, and the log reads A start, B start, A
    cancelled, A finished cleanly, A end, B end."""

    def stuck_close(request: ChatRequest) -> float:
        return 0.5 if request.messages == PROMPT_A else 0.0

    upstream = RecordingUpstream(MockUpstream(0.2), stuck_close=stuck_close)
    with trio.fail_after(60):
        async with (
            mock_app(settings, 200, upstream=upstream) as (service, app, _, logs),
            trio.open_nursery() as nursery,
        ):
            t0 = trio.current_time()
            a = chat(nursery, app, PROMPT_A, 10, "S")
            await trio.sleep(0.1)
            b = chat(nursery, app, PROMPT_B, 10, "S")
            await b.finished.wait()
            b_finished = trio.current_time()
    req_a, req_b = request_of(upstream, PROMPT_A), request_of(upstream, PROMPT_B)
    assert upstream.history == [("open", req_a), ("close", req_a), ("open", req_b),
                                ("close", req_b)]  # fmt: skip
    assert upstream.closed_at(req_a) == pytest.approx(t0 + 0.1 + 0.5)
    assert upstream.opened_at(req_b) == pytest.approx(t0 + 0.1 + 0.5)
    assert b_finished == pytest.approx(t0 + 0.1 + 0.5 + 10 * 0.2)
    assert (a.status, chunks(a), error_code(a), done(a)) == (200, 0, "superseded", False)
    assert done(b)
    assert b.text() == mocktext.expected_text(PROMPT_B, 10)
    run_a, run_b = a.headers["x-run-id"], b.headers["x-run-id"]
    assert lifecycle(logs, run_a, run_b) == [
        ("stream_start", run_a, None),
        ("stream_start", run_b, None),
        ("stream_cancelled", run_a, "superseded"),
        ("prev_stream_finished_cleanly", run_a, None),
        ("stream_end", run_a, None),
        ("stream_end", run_b, None),
    ]
    assert len(service.runs.sessions) == 0


async def test_user_stops_stream_after_2s(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """Scenario 2 with its real timing: a client that goes away 2 s into a
    30 ms/token stream cancels the run at once (client_disconnect): exactly
    the 66 tokens produced by then are saved, as partial."""
    with trio.fail_after(60):
        async with mock_app(settings, 30) as (service, app, _, logs):
            async with trio.open_nursery() as nursery:
                a = chat(nursery, app, PROMPT_A, 1000, "S")
                await trio.sleep(2.0)
                await a.disconnect()
            saved = await service.store.get(TENANT, a.headers["x-run-id"])
    run = a.headers["x-run-id"]
    assert lifecycle(logs, run) == [
        ("stream_start", run, None),
        ("stream_cancelled", run, "client_disconnect"),
        ("stream_end", run, None),
    ]
    assert logs.events("stream_end")[0]["duration_ms"] == pytest.approx(2000)
    assert saved is not None
    assert (saved.status, saved.reason, saved.events) == ("partial", "client_disconnect", 66)
    assert saved.content == "".join(list(mocktext.tokens(PROMPT_A, 1000))[:66])
    assert a.text() == saved.content


async def test_five_requests_50ms_apart_all_complete(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """Scenario 4 with its real timing: five session-less requests 50 ms apart
    (each 0.2 s long, so they overlap) all take exactly 0.2 s and give their
    exact text: no request delays or cancels another."""
    prompts = [[{"role": "user", "content": f"request {i}"}] for i in range(5)]
    with trio.fail_after(60):
        async with mock_app(settings, 20) as (_, app, _, logs), trio.open_nursery() as nursery:
            clients = []
            for prompt in prompts:
                clients.append(chat(nursery, app, prompt, 10))
                await trio.sleep(0.05)
    for prompt, client in zip(prompts, clients, strict=True):
        assert done(client)
        assert client.text() == mocktext.expected_text(prompt, 10)
    durations = {r["trace"]: r["duration_ms"] for r in logs.events("stream_end")}
    assert [durations[c.headers["x-run-id"]] for c in clients] == pytest.approx([200] * 5)
    assert logs.events("stream_cancelled") == []


async def test_two_sessions_rapid_requests_do_not_disturb_each_other(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """Scenario 5 with real timings: X and Y alternate new prompts every 50 ms
    (X at 0, 0.1, 0.2; Y at 0.05, 0.15, 0.25).  Each new prompt supersedes
    only its own session's run, 0.1 s after it started; X3 and Y3 run their
    full 0.2 s; each prev_stream_finished_cleanly names its own session."""
    plan = [("X", 0.0), ("Y", 0.05), ("X", 0.1), ("Y", 0.15), ("X", 0.2), ("Y", 0.25)]
    with trio.fail_after(60):
        async with (
            mock_app(settings, 20) as (service, app, _, logs),
            trio.open_nursery() as nursery,
        ):
            t0 = trio.current_time()
            clients: list[tuple[str, MemoryClient]] = []
            for n, (session, at) in enumerate(plan):
                await trio.sleep_until(t0 + at)
                prompt = [{"role": "user", "content": f"{session} {n}"}]
                clients.append((session, chat(nursery, app, prompt, 10, session)))
    runs = [c.headers["x-run-id"] for _, c in clients]
    durations = {r["trace"]: r["duration_ms"] for r in logs.events("stream_end")}
    assert [durations[r] for r in runs] == pytest.approx([100, 100, 100, 100, 200, 200])
    assert [error_code(c) for _, c in clients[:4]] == ["superseded"] * 4
    assert done(clients[4][1])
    assert done(clients[5][1])
    session_of = {c.headers["x-run-id"]: s for s, c in clients}
    cleanly = logs.events("prev_stream_finished_cleanly")
    assert sorted(r["trace"] for r in cleanly) == sorted(runs[:4])
    assert all(r["session"] == session_of[r["trace"]] for r in cleanly)
    assert len(service.runs.sessions) == 0


# -- the deadline path -----------------------------------------------------------


def stuck_where(where: str, slow_runs: set[str]) -> dict[str, Any]:
    """Service arguments that make prompt A's cleanup take ``STUCK`` seconds."""

    if where == "store":

        def delay(m: Message) -> float:
            return STUCK if m.run_id in slow_runs else 0.0

        return {"store": SlowStore(":memory:", delay)}

    def stuck_close(request: ChatRequest) -> float:
        return STUCK if request.messages == PROMPT_A else 0.0

    return {"upstream": RecordingUpstream(MockUpstream(0.1), stuck_close=stuck_close)}


@pytest.mark.parametrize("where", ["store", "upstream"])
async def test_stuck_predecessor_is_fenced_after_exactly_the_deadline(
    settings: Settings, autojump_clock: trio.testing.MockClock, where: str
) -> None:
    """A predecessor whose cleanup is stuck for 5 s (a shielded save, or an
    upstream close that ignores cancellation) makes B wait exactly
    --supersede-timeout (2 s): B's upstream opens at B's arrival + 2.0 s, and
    prev_stream_timeout_on_cancel names A.  From then on A is fenced: it
    emits nothing more (its client gets no further byte and no terminal
    frame), and when its cleanup finally ends it removes only its own session
    entry, so B stays the session's run (and can be interrupted), and each run
    is saved once, with its own content."""
    cfg = settings.replace(save_timeout=10.0)  # A's 5 s save must complete
    slow_runs: set[str] = set()
    timeout = cfg.supersede_timeout
    with trio.fail_after(60):
        async with mock_app(cfg, 100, **stuck_where(where, slow_runs)) as (
            service, app, upstream, logs,
        ):  # fmt: skip
            baseline = await tasks_living()
            key = (TENANT, "S")
            async with trio.open_nursery() as nursery:
                a = chat(nursery, app, PROMPT_A, 50, "S")
                await a.wait_until(lambda c: chunks(c) >= 3)
                run_a = _current_run(service, key)
                slow_runs.add(run_a.id)
                t_b = trio.current_time()
                b = chat(nursery, app, PROMPT_B, 100, "S")

                # Just before the deadline: B still waits, A is not fenced.
                await trio.sleep_until(t_b + timeout - 0.001)
                run_b = _current_run(service, key)
                assert run_b.request.messages == PROMPT_B
                assert service.runs.sessions.live(key) == {run_a.id: False, run_b.id: False}
                assert not upstream.holds(run_b.request)
                assert logs.events("prev_stream_timeout_on_cancel") == []

                # At the deadline: A is fenced and B's upstream opens.
                await trio.sleep_until(t_b + timeout)
                await trio.testing.wait_all_tasks_blocked()
                assert run_a.log.fenced
                assert service.runs.sessions.live(key) == {run_a.id: True, run_b.id: False}
                assert upstream.opened_at(run_b.request) == pytest.approx(t_b + timeout)
                a_body = bytes(a.body)
                assert not run_a.append("an intruder")  # a fenced run cannot emit
                assert run_a.log.last_seq == chunks(a)

                # A's cleanup ends 5 s after its cancel, B still running.
                await run_a.done.wait()
                assert trio.current_time() == pytest.approx(t_b + STUCK)
                await trio.testing.wait_all_tasks_blocked()
                assert service.runs.sessions.current(key) == run_b.id
                assert service.runs.sessions.live(key) == {run_b.id: False}
                assert bytes(a.body) == a_body
                assert (a.finished.is_set(), a.complete) == (True, False)
                assert b.text() == mocktext.expected_text(PROMPT_B, 100)[: len(b.text())]

                interrupt = start_request(nursery, app, "POST", "/v1/sessions/S/interrupt")
                await interrupt.finished.wait()
                assert interrupt.json() == {"interrupted": True, "run_id": run_b.id}
            saved = {m.run_id: m for m in await service.store.session_messages(TENANT, "S")}
            assert await tasks_living() == baseline
    assert error_code(b) == "interrupted"
    assert [r["trace"] for r in logs.events("prev_stream_timeout_on_cancel")] == [run_a.id]
    assert logs.events("prev_stream_timeout_on_cancel")[0]["session"] == "S"
    assert logs.events("prev_stream_finished_cleanly") == []
    assert set(saved) == {run_a.id, run_b.id}
    assert (saved[run_a.id].reason, saved[run_a.id].content) == ("superseded", run_a.log.content)
    assert (saved[run_b.id].reason, saved[run_b.id].content) == ("interrupted", run_b.log.content)
    assert mocktext.expected_text(PROMPT_A, 50).startswith(run_a.log.content)
    assert mocktext.expected_text(PROMPT_B, 100).startswith(run_b.log.content)
    assert b.text() == run_b.log.content
    assert len(service.runs.sessions) == 0
    assert service.runs.live == 0


async def test_supersede_while_waiting_for_a_stuck_predecessor(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A chain: A is stuck in its upstream close; B (at 0.1 s) waits for it;
    C (at 1.0 s) supersedes B while B still waits.  B ends cleanly without
    ever opening the upstream; C waits for both and fences A at exactly its
    own arrival + 2 s.  At every upstream open, at most one unfenced run of
    the session holds the upstream."""
    runs_ref: list[Service] = []
    holders_at_open: list[int] = []

    def check(request: ChatRequest) -> None:  # recorded: an assert here would crash the run
        service = runs_ref[0]
        live = service.runs.sessions.live((TENANT, "S"))
        holders = [
            run_id for run_id, fenced in live.items()
            if not fenced and upstream.holds(service.runs.runs[run_id].request)
        ]  # fmt: skip
        holders_at_open.append(len(holders))

    def stuck_close(request: ChatRequest) -> float:
        return STUCK if request.messages == PROMPT_A else 0.0

    upstream = RecordingUpstream(MockUpstream(0.1), stuck_close=stuck_close, on_open=check)
    with trio.fail_after(60):
        async with mock_app(settings, 100, upstream=upstream) as (service, app, _, logs):
            runs_ref.append(service)
            async with trio.open_nursery() as nursery:
                t0 = trio.current_time()
                a = chat(nursery, app, PROMPT_A, 50, "S")
                await trio.sleep(0.1)
                b = chat(nursery, app, PROMPT_B, 10, "S")
                await trio.sleep(0.9)
                c = chat(nursery, app, PROMPT_C, 10, "S")
                await c.finished.wait()
    run_a, run_b = a.headers["x-run-id"], b.headers["x-run-id"]
    req_c = request_of(upstream, PROMPT_C)
    assert [r.messages for _, r in upstream.opened] == [PROMPT_A, PROMPT_C]  # B never opened
    assert holders_at_open == [1, 1]  # at C's open, A (still holding) was already fenced
    assert logs.events("run_crashed") == []
    assert upstream.opened_at(req_c) == pytest.approx(t0 + 1.0 + settings.supersede_timeout)
    assert (error_code(a), error_code(b), done(c)) == (None, "superseded", True)
    assert c.text() == mocktext.expected_text(PROMPT_C, 10)
    assert [r["trace"] for r in logs.events("prev_stream_finished_cleanly")] == [run_b]
    assert [r["trace"] for r in logs.events("prev_stream_timeout_on_cancel")] == [run_a]
    assert logs.events("stream_cancelled", trace=run_a)[0]["reason"] == "superseded"
    assert len(service.runs.sessions) == 0
