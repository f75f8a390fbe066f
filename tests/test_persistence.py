"""Saved exactly once (issue 4, docs/api.md section 3.4).

Every run that produced content is saved exactly once, however it ends:
``complete``, ``partial`` with the cancel reason, or ``failed``.  The save
happens in the run's one shielded cleanup, with a deadline, so it survives
the cancellation that caused it.  A run that produced nothing is not saved
(a documented choice).

"Exactly once" is checked two ways: the rows (``Store.count``) and the calls
(:class:`~tests.conftest.RecordingStore`): the schema would refuse a second
row, so only the calls show whether the code path tried twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.conftest import RecordingStore, memory_app, running_server, until_seq
from tests.memasgi import start_request
from tools.fakes import FakeUpstream, Plan, Step, openai_chunk
from trio_stream import Settings
from trio_stream.http.service import Service
from trio_stream.runs import Run
from trio_stream.store import Message, SQLiteStore
from trio_stream.upstream import mocktext

MESSAGES = [{"role": "user", "content": "save me"}]


def body(*, stream: bool = True, detach: bool = False, max_tokens: int = 5) -> dict[str, Any]:
    return {"messages": MESSAGES, "stream": stream, "detach": detach, "max_tokens": max_tokens}


# -- the completion path -------------------------------------------------------


@pytest.mark.parametrize("detach", [False, True], ids=["attached", "detached"])
@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
async def test_completion_saves_once_through_the_completion_path(
    settings: Settings,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    stream: bool,
    detach: bool,
) -> None:
    """A run that completes is saved by exactly one save call, as complete with
    the upstream's finish_reason -- never as partial -- and the session's
    messages list it once."""
    store = RecordingStore(str(tmp_path / "mem.db"), threaded=False)
    session = {"x-session-id": "s-done"}
    with trio.fail_after(30):
        async with memory_app(settings, store=store) as (service, app):
            async with trio.open_nursery() as nursery:
                client = start_request(
                    nursery, app, "POST", "/v1/chat/completions",
                    json=body(stream=stream, detach=detach), headers=session,
                )  # fmt: skip
                await client.finished.wait()
                run_id = client.headers["x-run-id"]
                run = service.runs.runs.get(run_id)
                if run is not None:  # detached: the client may return first
                    await run.done.wait()
                state = start_request(nursery, app, "GET", f"/v1/runs/{run_id}")
                listing = start_request(nursery, app, "GET", "/v1/sessions/s-done/messages")
                await state.finished.wait()
                await listing.finished.wait()
            assert client.status == 200
            expected = mocktext.expected_text(MESSAGES, 5)
            assert store.saves == [
                Message(
                    run_id, "public", "s-done", expected, None, "complete", "length", 5, detach,
                    store.saves[0].created,
                    # the mock reports no usage: counted (docs/api.md section 2.10)
                    {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7,
                     "source": "counted", "model": "mock"},
                    served_by="mock",  # the --upstream shorthand's one member
                )
            ]  # fmt: skip
            assert await store.count(run_id) == 1
            assert (state.status, state.json()["status"]) == (200, "completed")
            [listed] = listing.json()["data"]
            assert (listed["run_id"], listed["status"], listed["content"]) == (
                run_id, "complete", expected,
            )  # fmt: skip


# -- attached runs cancelled mid-await (real sockets) ---------------------------

CHAT_STEPS = [openai_chunk("Hel"), openai_chunk("lo,"), openai_chunk(" wor")]
TOOL_STEPS = [
    openai_chunk(
        tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                     "function": {"name": "f", "arguments": '{"a":'}}]
    ),
    openai_chunk(tool_calls=[{"index": 0, "function": {"arguments": "1}"}}]),
    openai_chunk(
        tool_calls=[{"index": 1, "id": "call_2", "type": "function",
                     "function": {"name": "g", "arguments": "{}"}}]
    ),
]  # fmt: skip
SHAPES: dict[str, tuple[list[bytes], str, list[dict[str, Any]] | None]] = {
    "chat": (CHAT_STEPS, "Hello, wor", None),
    "tool": (
        TOOL_STEPS,
        "",
        [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ],
    ),
}


def hanging(chunks: list[bytes]) -> Plan:
    """Send ``chunks``, then hang waiting for the next one, for ever."""
    return Plan(steps=[*(Step(c) for c in chunks), Step(hang=True)])


async def only_run(service: Service, fake: FakeUpstream) -> Run:
    """The one run in flight, once its upstream request has arrived."""
    await fake.wait_for(lambda: len(fake.requests) == 1)
    [run] = service.runs.runs.values()
    return run


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
@pytest.mark.parametrize("shape", ["chat", "tool"])
async def test_attached_cancel_mid_await_saves_partial_once(
    settings: Settings, tmp_path: Path, fake_openai: FakeUpstream, shape: str, stream: bool
) -> None:
    """A client that leaves while the run waits for its next upstream chunk
    cancels the run; the upstream connection closes; the partial -- exactly
    the chunks received, tool calls merged by index -- is saved exactly once
    with reason client_disconnect."""
    chunks, content, tool_calls = SHAPES[shape]
    fake_openai.plan = lambda _: hanging(chunks)
    store = RecordingStore(str(tmp_path / "real.db"))
    cfg = settings.replace(upstream="openai", upstream_url=fake_openai.url, db=store.path)
    with trio.fail_after(10):
        async with (
            running_server(cfg, store=store) as server,
            server.client() as client,
            trio.open_nursery() as nursery,
        ):
            request = trio.CancelScope()

            async def ask() -> None:
                with request:
                    await client.post("/v1/chat/completions", json=body(stream=stream))

            nursery.start_soon(ask)
            run = await only_run(server.service, fake_openai)
            await until_seq(run, len(chunks))
            request.cancel()  # the client goes away mid-await
            await run.done.wait()
            [conn] = fake_openai.connections
            await fake_openai.wait_for(lambda: conn.closed is not None)
            count = await store.count(run.id)
    assert count == 1
    [saved] = store.saves_of(run.id)
    assert (saved.status, saved.reason) == ("partial", "client_disconnect")
    assert (saved.content, saved.tool_calls, saved.events) == (content, tool_calls, len(chunks))
    assert store.saves == [saved]


async def test_upstream_failure_mid_stream_saves_failed_once(
    settings: Settings, tmp_path: Path, fake_openai: FakeUpstream
) -> None:
    """An upstream that drops the connection after some chunks fails the run:
    the client gets one upstream_error event, and the run is saved once as
    failed (reason upstream_error) with the chunks it did receive."""
    fake_openai.plan = lambda _: Plan(steps=[Step(c) for c in CHAT_STEPS] + [Step(drop=True)])
    store = RecordingStore(str(tmp_path / "real.db"))
    cfg = settings.replace(upstream="openai", upstream_url=fake_openai.url, db=store.path)
    with trio.fail_after(10):
        async with running_server(cfg, store=store) as server, server.client() as client:
            response = await client.post("/v1/chat/completions", json=body())
            run_id = response.headers["x-run-id"]
            count = await store.count(run_id)
    last = response.text.strip().split("\n\n")[-1]
    assert orjson.loads(last.removeprefix("data: "))["error"]["type"] == "upstream_error"
    assert count == 1
    [saved] = store.saves
    assert (saved.run_id, saved.status, saved.reason) == (run_id, "failed", "upstream_error")
    assert saved.content == "Hello, wor"


async def test_run_without_content_is_not_saved(
    settings: Settings, tmp_path: Path, fake_openai: FakeUpstream
) -> None:
    """A client that leaves before the first token cancels the run and closes
    its upstream connection; a run that produced nothing writes no row (the
    documented choice), and GET /v1/runs/{id} then answers 404."""
    fake_openai.plan = lambda _: hanging([])
    store = RecordingStore(str(tmp_path / "real.db"))
    cfg = settings.replace(upstream="openai", upstream_url=fake_openai.url, db=store.path)
    with trio.fail_after(10):
        async with (
            running_server(cfg, store=store) as server,
            server.client() as client,
            trio.open_nursery() as nursery,
        ):
            request = trio.CancelScope()

            async def ask() -> None:
                with request:
                    await client.post("/v1/chat/completions", json=body())

            nursery.start_soon(ask)
            run = await only_run(server.service, fake_openai)
            request.cancel()
            await run.done.wait()
            [conn] = fake_openai.connections
            await fake_openai.wait_for(lambda: conn.closed is not None)
            state = await client.get(f"/v1/runs/{run.id}")
            count = await store.count(run.id)
    assert run.log.outcome is not None
    assert run.log.outcome.reason == "client_disconnect"
    assert (store.saves, count) == ([], 0)
    assert (state.status_code, state.json()["error"]["type"]) == (404, "not_found_error")


# -- the save survives its cancellation, within a deadline ----------------------


class DelayedSaveStore(RecordingStore):
    """Every save takes ``delay`` seconds (virtual time) before it writes."""

    delay = 1.0

    async def save(self, m: Message) -> None:
        await trio.sleep(self.delay)
        await super().save(m)


class WedgedStore(RecordingStore):
    """A save that never returns (a wedged disk)."""

    async def save(self, m: Message) -> None:
        self.saves.append(m)
        await trio.sleep_forever()


async def test_save_survives_the_shutdown_that_caused_it(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Closing the service cancels a detached run mid-stream (reason shutdown);
    its save still runs to the end under that cancellation -- even a slow one --
    and the row is on disk after the service is gone."""
    path = str(tmp_path / "mem.db")
    store = DelayedSaveStore(path, threaded=False)
    with trio.fail_after(60):
        async with (
            memory_app(settings.replace(mock_delay_ms=1000), store=store) as (service, app),
            trio.open_nursery() as nursery,
        ):
            client = start_request(
                nursery, app, "POST", "/v1/chat/completions", json=body(detach=True)
            )
            await client.wait_until(lambda c: c.status is not None)
            run = service.runs.runs[client.headers["x-run-id"]]
            await until_seq(run, 3)
            nursery.cancel_scope.cancel()  # the subscriber goes with the service
        # memory_app has exited: the manager nursery was cancelled, the db closed.
    assert run.done.is_set()
    reopened = SQLiteStore(path, threaded=False)
    saved = await reopened.get("public", run.id)
    count = await reopened.count(run.id)
    reopened.close()
    assert count == 1
    assert saved is not None
    assert (saved.status, saved.reason, saved.events) == ("partial", "shutdown", 3)
    assert saved.content == "".join(list(mocktext.tokens(MESSAGES, 5))[:3])
    assert len(store.saves) == 1


async def test_a_hanging_save_is_bounded_by_the_save_timeout(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A save that never returns holds the run's cleanup for --save-timeout
    and no longer: then save_timeout is logged, the session entry is released,
    the run is done and the request returns."""
    store = WedgedStore(str(tmp_path / "mem.db"), threaded=False)
    cfg = settings.replace(mock_delay_ms=20, save_timeout=5.0)
    with trio.fail_after(60):
        async with memory_app(cfg, store=store) as (service, app):
            async with trio.open_nursery() as nursery:
                client = start_request(
                    nursery, app, "POST", "/v1/chat/completions",
                    json=body(max_tokens=50), headers={"x-session-id": "s-wedged"},
                )  # fmt: skip
                await client.wait_until(lambda c: c.status is not None)
                run = service.runs.runs[client.headers["x-run-id"]]
                await until_seq(run, 2)
                await client.disconnect()
                gone = trio.current_time()
                await client.finished.wait()
            took = trio.current_time() - gone
            assert run.done.is_set()
            assert app.logs.events("save_timeout", trace=run.id)
            assert service.runs.sessions.live(("public", "s-wedged")) == {}
            assert len(store.saves) == 1
    assert 5.0 <= took < 5.1


async def test_session_messages_oldest_first(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """GET /v1/sessions/{id}/messages lists each run of the session once,
    oldest first: a superseded detached run as partial, its successor as
    complete.  An unknown session is 404."""
    store = RecordingStore(str(tmp_path / "mem.db"), threaded=False)
    session = {"x-session-id": "s-two"}
    with trio.fail_after(30):
        async with (
            memory_app(settings.replace(mock_delay_ms=20), store=store) as (service, app),
            trio.open_nursery() as nursery,
        ):
            first = start_request(
                nursery, app, "POST", "/v1/chat/completions",
                json=body(detach=True, max_tokens=50), headers=session,
            )  # fmt: skip
            await first.wait_until(lambda c: c.status is not None)
            await until_seq(service.runs.runs[first.headers["x-run-id"]], 4)
            second = start_request(
                nursery, app, "POST", "/v1/chat/completions", json=body(), headers=session
            )
            await second.finished.wait()
            await first.finished.wait()
            listing = start_request(nursery, app, "GET", "/v1/sessions/s-two/messages")
            unknown = start_request(nursery, app, "GET", "/v1/sessions/nope/messages")
            await listing.finished.wait()
            await unknown.finished.wait()
    rows = listing.json()["data"]
    assert [(r["run_id"], r["status"], r["reason"]) for r in rows] == [
        (first.headers["x-run-id"], "partial", "superseded"),
        (second.headers["x-run-id"], "complete", "length"),
    ]
    assert rows[1]["content"] == mocktext.expected_text(MESSAGES, 5)
    assert (unknown.status, unknown.json()["error"]["type"]) == (404, "not_found_error")
