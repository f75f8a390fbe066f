"""Detached runs, Stop, supersession and interrupt (issue 4).

The detached path and the disconnect path are kept apart: a subscriber that
leaves a detached run drops only itself, while a client that leaves an
attached run cancels it.  Stop (``POST /v1/runs/{id}/cancel``) stops exactly
one run, at once, even while its upstream hangs between chunks.

Virtual-time tests use the in-memory driver with ``autojump_clock``; the
connection-level claims (the upstream connection closes) use a real server and
a real :class:`~tools.fakes.FakeUpstream`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

from tests.conftest import RecordingStore, memory_app, running_server, tasks_living, until_seq
from tests.memasgi import MemoryClient, start_request
from tools.fakes import FakeUpstream, Plan, token_plan
from trio_stream import Settings
from trio_stream.http.service import Service
from trio_stream.runs import Run
from trio_stream.upstream import mocktext
from trio_stream.wire.sse import SSEDecoder, SSEEvent

MESSAGES = [{"role": "user", "content": "keep going"}]
OTHER = [{"role": "user", "content": "the other one"}]


def chat(
    messages: list[dict[str, str]] = MESSAGES, *, detach: bool, max_tokens: int = 40
) -> dict[str, Any]:
    return {"messages": messages, "stream": True, "max_tokens": max_tokens, "detach": detach}


def memory_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.replace(db=str(tmp_path / "mem.db"), mock_delay_ms=20)


async def started_run(service: Service, client: MemoryClient) -> Run:
    """The run behind a streaming request, once its headers have arrived."""
    await client.wait_until(lambda c: c.status is not None)
    return service.runs.runs[client.headers["x-run-id"]]


async def test_detached_run_outlives_its_subscriber(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A detached run keeps going when its only subscriber disconnects,
    completes with the full text, and is saved once, as complete."""
    store = RecordingStore(str(tmp_path / "mem.db"), threaded=False)
    with trio.fail_after(30):
        async with memory_app(memory_settings(settings, tmp_path), store=store) as (service, app):
            async with trio.open_nursery() as nursery:
                client = start_request(
                    nursery, app, "POST", "/v1/chat/completions", json=chat(detach=True)
                )
                run = await started_run(service, client)
                await client.wait_until(lambda c: len(c.events()) >= 3)
                await client.disconnect()
                await client.finished.wait()
                assert run.log.status.value == "running"  # the subscriber left, the run did not
                await run.done.wait()
            assert not client.complete  # the subscriber got a prefix, no [DONE]
            assert run.log.status.value == "completed"
            assert run.log.content == mocktext.expected_text(MESSAGES, 40)
            [saved] = store.saves_of(run.id)
            assert (saved.status, saved.reason) == ("complete", "length")
            assert saved.content == mocktext.expected_text(MESSAGES, 40)
            assert await store.count(run.id) == 1
            assert not app.logs.events("stream_cancelled", trace=run.id)


async def test_attached_disconnect_never_cancels_a_detached_run(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Both clients of an attached and a detached run leave at the same moment:
    only the attached run is cancelled (client_disconnect); the detached one
    completes.  (A peer's 'stop on disconnect' fix killed background jobs.)"""
    store = RecordingStore(str(tmp_path / "mem.db"), threaded=False)
    with trio.fail_after(30):
        async with memory_app(memory_settings(settings, tmp_path), store=store) as (service, app):
            async with trio.open_nursery() as nursery:
                path = "/v1/chat/completions"
                attached = start_request(nursery, app, "POST", path, json=chat(detach=False))
                detached = start_request(nursery, app, "POST", path, json=chat(OTHER, detach=True))
                a_run = await started_run(service, attached)
                d_run = await started_run(service, detached)
                await until_seq(a_run, 5)
                await until_seq(d_run, 5)
                await attached.disconnect()
                await detached.disconnect()
                await a_run.done.wait()
                await d_run.done.wait()
            assert a_run.log.outcome is not None
            assert a_run.log.outcome.reason == "client_disconnect"
            assert d_run.log.status.value == "completed"
            assert [m.status for m in store.saves_of(a_run.id)] == ["partial"]
            assert [m.status for m in store.saves_of(d_run.id)] == ["complete"]
            assert [r["trace"] for r in app.logs.events("stream_cancelled")] == [a_run.id]


async def test_cancel_is_idempotent_and_saves_once(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Two Stops of one detached run both answer 200 with status cancelled,
    reason stopped; the run is cancelled once and saved once, as partial."""
    store = RecordingStore(str(tmp_path / "mem.db"), threaded=False)
    with trio.fail_after(30):
        async with memory_app(memory_settings(settings, tmp_path), store=store) as (service, app):
            async with trio.open_nursery() as nursery:
                sub = start_request(
                    nursery, app, "POST", "/v1/chat/completions", json=chat(detach=True)
                )
                run = await started_run(service, sub)
                await until_seq(run, 4)
                answers = []
                for _ in range(2):
                    stop = start_request(nursery, app, "POST", f"/v1/runs/{run.id}/cancel")
                    await stop.finished.wait()
                    answers.append((stop.status, stop.json()))
                await run.done.wait()
                await sub.finished.wait()
            for status, body in answers:
                assert status == 200
                assert (body["id"], body["status"], body["reason"]) == (
                    run.id, "cancelled", "stopped",
                )  # fmt: skip
            assert len(app.logs.events("stream_cancelled", trace=run.id)) == 1
            [saved] = store.saves_of(run.id)
            assert (saved.status, saved.reason, saved.events) == ("partial", "stopped", 4)
            error = orjson.loads(sub.events()[-1].data)["error"]
            assert (error["type"], error["code"]) == ("stream_cancelled", "stopped")


@pytest.mark.parametrize("how", ["supersede", "interrupt"])
async def test_supersede_and_interrupt_cancel_detached_runs(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    """A newer request of the session, or an interrupt, cancels a detached run
    (reason superseded / interrupted) with no subscriber attached; the run is
    saved once as partial with that reason, and its session entry is released."""
    store = RecordingStore(str(tmp_path / "mem.db"), threaded=False)
    session = {"x-session-id": "s-1"}
    with trio.fail_after(30):
        async with memory_app(memory_settings(settings, tmp_path), store=store) as (service, app):
            async with trio.open_nursery() as nursery:
                path = "/v1/chat/completions"
                sub = start_request(nursery, app, "POST", path, json=chat(detach=True),
                                    headers=session)  # fmt: skip
                run = await started_run(service, sub)
                await until_seq(run, 3)
                await sub.disconnect()  # nobody watches it any more
                await sub.finished.wait()
                if how == "supersede":
                    newer = start_request(nursery, app, "POST", path,
                                          json=chat(OTHER, detach=False, max_tokens=5),
                                          headers=session)  # fmt: skip
                    await newer.finished.wait()
                    assert newer.text() == mocktext.expected_text(OTHER, 5)
                else:
                    stop = start_request(nursery, app, "POST", "/v1/sessions/s-1/interrupt",
                                         headers=session)  # fmt: skip
                    await stop.finished.wait()
                    assert stop.json() == {"interrupted": True, "run_id": run.id}
                await run.done.wait()
            reason = "superseded" if how == "supersede" else "interrupted"
            [saved] = store.saves_of(run.id)
            assert (saved.status, saved.reason) == ("partial", reason)
            assert saved.content == run.log.content
            assert service.runs.sessions.live(("public", "s-1")) == {}


# -- Stop over real sockets ------------------------------------------------------

TOKENS_A = ["Stop", " me", " here"]  # then the upstream hangs
TOKENS_B = ["Keep", " me"]  # then the upstream hangs
BODY_A = [{"role": "user", "content": "A"}]
BODY_B = [{"role": "user", "content": "B"}]


def two_hanging_plans(body: dict[str, Any]) -> Plan:
    if body["messages"] == BODY_A:
        return token_plan([*TOKENS_A, " never"], hang_after=len(TOKENS_A))
    return token_plan([*TOKENS_B, " never"], hang_after=len(TOKENS_B))


async def read_events(response: httpx.Response) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return [e async for chunk in response.aiter_bytes() for e in decoder.feed(chunk)]


def content_of(events: list[SSEEvent]) -> str:
    parts = []
    for e in events:
        chunk = orjson.loads(e.data) if e.data.startswith("{") else {}
        if "choices" in chunk:
            parts.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(parts)


async def stop_a_then_b(
    service: Service, client: httpx.AsyncClient, fake: FakeUpstream, detach: bool
) -> tuple[dict[str, Run], float, list[SSEEvent], list[SSEEvent]]:
    """Start A and B, wait for both to hang, Stop A, check B, then Stop B."""
    runs: dict[str, Run] = {}
    async with (
        client.stream("POST", "/v1/chat/completions", json=chat(BODY_A, detach=detach)) as ra,
        client.stream("POST", "/v1/chat/completions", json=chat(BODY_B, detach=detach)) as rb,
    ):
        for name, r in (("A", ra), ("B", rb)):
            runs[name] = service.runs.runs[r.headers["x-run-id"]]
        await until_seq(runs["A"], len(TOKENS_A))
        await until_seq(runs["B"], len(TOKENS_B))
        conn_a, conn_b = (
            next(c for c in fake.connections if c.requests[0]["messages"] == m)
            for m in (BODY_A, BODY_B)
        )
        stopped_at = trio.current_time()
        stop = await client.post(f"/v1/runs/{runs['A'].id}/cancel")
        assert (stop.status_code, stop.json()["reason"]) == (200, "stopped")
        with trio.fail_after(1):
            await fake.wait_for(lambda: conn_a.closed is not None)
            await runs["A"].done.wait()
        assert conn_a.closed is not None
        close_delay = conn_a.closed - stopped_at
        events_a = await read_events(ra)
        # B is untouched: its upstream connection is open and the run goes on.
        assert conn_b.closed is None
        assert runs["B"].log.status.value == "running"
        stop_b = await client.post(f"/v1/runs/{runs['B'].id}/cancel")
        assert stop_b.status_code == 200
        events_b = await read_events(rb)
    await runs["B"].done.wait()
    return runs, close_delay, events_a, events_b


@pytest.mark.parametrize("detach", [False, True], ids=["attached", "detached"])
async def test_stop_while_upstream_hangs_stops_only_that_run(
    settings: Settings, tmp_path: Path, fake_openai: FakeUpstream, detach: bool
) -> None:
    """Two answers side by side, both upstreams hanging for their next chunk.
    Stop on A closes A's upstream connection at once, ends A's stream with a
    ``stopped`` error event, and saves A once as partial with exactly the
    chunks received before the hang; B's upstream stays open and B keeps running."""
    fake = fake_openai
    fake.plan = two_hanging_plans
    store = RecordingStore(str(tmp_path / "real.db"))
    cfg = settings.replace(upstream="openai", upstream_url=fake.url, db=store.path)
    with trio.fail_after(10):
        async with running_server(cfg, store=store) as server:
            baseline = await tasks_living()
            async with server.client() as client:
                runs, close_delay, events_a, events_b = await stop_a_then_b(
                    server.service, client, fake, detach
                )
            await fake.wait_for(lambda: fake.open_connections == 0)
            assert await tasks_living() == baseline
            counts = [await store.count(runs[name].id) for name in "AB"]
    assert counts == [1, 1]
    assert close_delay < 0.5
    assert content_of(events_a) == "".join(TOKENS_A)
    assert orjson.loads(events_a[-1].data)["error"]["code"] == "stopped"
    assert content_of(events_b) == "".join(TOKENS_B)
    for name, tokens in (("A", TOKENS_A), ("B", TOKENS_B)):
        [saved] = store.saves_of(runs[name].id)
        assert (saved.status, saved.reason) == ("partial", "stopped")
        assert (saved.content, saved.events) == ("".join(tokens), len(tokens))
