"""Resuming detached runs: ``GET /v1/runs/{id}/events`` (issue 4).

The event log of a run numbers its events (the SSE ``id:``).  A subscriber
that reconnects with ``Last-Event-ID: k`` (or ``?after=k``) gets exactly the
events after ``k`` and then follows the run live to its end: no gap, no
duplicate, for any number of subscribers at once.  A finished run replays
whole until ``--run-ttl`` after it ended; then it is forgotten (404).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h11
import orjson
import pytest
import trio
import trio.testing

from tests.conftest import memory_app, running_server, until_seq
from tests.memasgi import MemoryClient, start_request
from trio_stream import Settings
from trio_stream.http.service import Service
from trio_stream.runs import Run
from trio_stream.upstream import mocktext
from trio_stream.wire.sse import SSEDecoder, SSEEvent

MESSAGES = [{"role": "user", "content": "resume me"}]
TOKENS = 40
FULL = mocktext.expected_text(MESSAGES, TOKENS)


def detached_body(max_tokens: int = TOKENS) -> dict[str, Any]:
    return {"messages": MESSAGES, "stream": True, "max_tokens": max_tokens, "detach": True}


def mem_settings(settings: Settings, tmp_path: Path, **changes: Any) -> Settings:
    return settings.replace(db=str(tmp_path / "mem.db"), mock_delay_ms=20, **changes)


def is_delta(event: SSEEvent) -> bool:
    """A chunk carrying a delta: not the finish chunk, [DONE] or an error event.

    (Those come without an ``id:`` line, but SSE keeps the last id, so the
    decoder reports the previous one for them.)"""
    if not event.data.startswith("{"):
        return False
    choices = orjson.loads(event.data).get("choices")
    return bool(choices) and choices[0]["finish_reason"] is None


def ids(events: list[SSEEvent]) -> list[int]:
    return [int(e.id) for e in delta_events(events) if e.id is not None]


def delta_events(events: list[SSEEvent]) -> list[SSEEvent]:
    return [e for e in events if is_delta(e)]


async def start_detached(service: Service, app: Any, nursery: trio.Nursery) -> MemoryClient:
    client = start_request(nursery, app, "POST", "/v1/chat/completions", json=detached_body())
    await client.wait_until(lambda c: c.status is not None)
    return client


def run_of(service: Service, client: MemoryClient) -> Run:
    return service.runs.runs[client.headers["x-run-id"]]


@pytest.mark.parametrize("k", [1, 7, 23])
@pytest.mark.parametrize("cursor", ["header", "query"])
async def test_reconnect_after_k_events_gives_exact_text(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock, k: int, cursor: str
) -> None:
    """Disconnect a detached stream after k events, reconnect with
    ``Last-Event-ID: k`` (or ``?after=k``): the second stream starts at event
    k + 1, and the two texts concatenated are exactly the full reply."""
    with trio.fail_after(30):
        async with memory_app(mem_settings(settings, tmp_path)) as (service, app):
            async with trio.open_nursery() as nursery:
                first = await start_detached(service, app, nursery)
                await first.wait_until(lambda c: len(c.events()) >= k)
                await first.disconnect()
                await first.finished.wait()
                seen = ids(first.events())
                assert seen == list(range(1, k + 1))  # one token per event at 20 ms/token
                run = run_of(service, first)
                assert run.log.outcome is None  # still running: the resume follows it live
                path, headers = f"/v1/runs/{run.id}/events", {}
                if cursor == "header":
                    headers["last-event-id"] = str(k)
                else:
                    path += f"?after={k}"
                second = start_request(nursery, app, "GET", path, headers=headers)
                await second.finished.wait()
            assert second.status == 200
            assert ids(second.events())[0] == k + 1
            assert first.text() + second.text() == FULL
            assert second.events()[-1].data == "[DONE]"


@pytest.mark.parametrize("coalesce", [False, True])
async def test_concurrent_subscribers_see_the_same_sequence(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock, coalesce: bool
) -> None:
    """Three subscribers of one live run, joining at different moments from
    cursor 0, each get the whole reply once, in order, ending with [DONE].
    Without coalescing their event streams are identical; with it, events
    may carry several tokens but their ids still increase and end at the
    run's last sequence number, and the texts are identical."""
    with trio.fail_after(30):
        async with memory_app(mem_settings(settings, tmp_path, coalesce=coalesce)) as (
            service,
            app,
        ):
            async with trio.open_nursery() as nursery:
                owner = await start_detached(service, app, nursery)
                run = run_of(service, owner)
                subscribers = []
                for join_at in (1, 10, 25):
                    await until_seq(run, join_at)
                    subscribers.append(
                        start_request(nursery, app, "GET", f"/v1/runs/{run.id}/events")
                    )
                for sub in (owner, *subscribers):
                    await sub.finished.wait()
            for sub in (owner, *subscribers):
                assert sub.status == 200
                assert sub.text() == FULL
                assert sub.events()[-1].data == "[DONE]"
                seq = ids(sub.events())
                assert seq == sorted(set(seq))
                assert seq[-1] == TOKENS
            if not coalesce:
                reference = delta_events(owner.events())
                for sub in subscribers:
                    assert delta_events(sub.events()) == reference


async def test_finished_run_replays_whole(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A finished detached run replays whole from 0, the rest from any cursor,
    and only its terminal frames from its last sequence number or beyond."""
    with trio.fail_after(30):
        async with memory_app(mem_settings(settings, tmp_path)) as (service, app):
            async with trio.open_nursery() as nursery:
                owner = await start_detached(service, app, nursery)
                run = run_of(service, owner)
                await run.done.wait()
                replays = {}
                for after in (0, 17, TOKENS, TOKENS + 5):
                    replays[after] = start_request(
                        nursery, app, "GET", f"/v1/runs/{run.id}/events?after={after}"
                    )
                    await replays[after].finished.wait()
            assert replays[0].text() == FULL
            assert ids(replays[0].events()) == [TOKENS]  # a backlog coalesces into one event
            assert replays[0].events()[-1].data == "[DONE]"
            tokens = list(mocktext.tokens(MESSAGES, TOKENS))
            assert replays[17].text() == "".join(tokens[17:])
            for after in (TOKENS, TOKENS + 5):
                assert replays[after].text() == ""
                assert [e.data for e in replays[after].events()][-1] == "[DONE]"
            assert all(r.status == 200 for r in replays.values())


async def test_cancelled_run_replays_its_partial_and_the_reason(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A detached run stopped mid-way replays what it produced, then the
    ``stopped`` error event, and no [DONE]."""
    with trio.fail_after(30):
        async with memory_app(mem_settings(settings, tmp_path)) as (service, app):
            async with trio.open_nursery() as nursery:
                owner = await start_detached(service, app, nursery)
                run = run_of(service, owner)
                await until_seq(run, 6)
                stop = start_request(nursery, app, "POST", f"/v1/runs/{run.id}/cancel")
                await run.done.wait()
                replay = start_request(nursery, app, "GET", f"/v1/runs/{run.id}/events")
                await replay.finished.wait()
            assert stop.status == 200
            assert replay.text() == run.log.content == FULL[: len(run.log.content)]
            assert ids(replay.events()) == [6]
            error = orjson.loads(replay.events()[-1].data)["error"]
            assert (error["type"], error["code"]) == ("stream_cancelled", "stopped")


async def test_run_expires_after_run_ttl(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A finished detached run stays replayable for --run-ttl, then leaves
    memory: /events answers 404 not_found_error, while GET /v1/runs/{id}
    falls back to the saved row (the run is still known, as a message)."""
    ttl = 30.0
    with trio.fail_after(ttl * 3):
        async with memory_app(mem_settings(settings, tmp_path, run_ttl=ttl)) as (service, app):
            async with trio.open_nursery() as nursery:
                owner = await start_detached(service, app, nursery)
                run = run_of(service, owner)
                await run.done.wait()
                ended = trio.current_time()
                events = f"/v1/runs/{run.id}/events"
                await trio.sleep_until(ended + ttl - 0.5)  # virtual time: the TTL is under test
                before = start_request(nursery, app, "GET", events)
                await before.finished.wait()
                await trio.sleep_until(ended + ttl + 0.5)
                after = start_request(nursery, app, "GET", events)
                state = start_request(nursery, app, "GET", f"/v1/runs/{run.id}")
                await after.finished.wait()
                await state.finished.wait()
            assert (before.status, before.text()) == (200, FULL)
            assert run.id not in service.runs.runs
            assert after.status == 404
            assert after.json()["error"]["type"] == "not_found_error"
            assert state.status == 200
            assert (state.json()["status"], state.json()["content"]) == ("completed", FULL)


async def test_unknown_run_and_bad_cursor(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """/events of an unknown run is 404; a cursor that is not a non-negative
    integer is 400 invalid_request_error, both with the OpenAI error body."""
    with trio.fail_after(30):
        async with memory_app(mem_settings(settings, tmp_path)) as (service, app):
            async with trio.open_nursery() as nursery:
                owner = await start_detached(service, app, nursery)
                run = run_of(service, owner)
                unknown = start_request(nursery, app, "GET", "/v1/runs/run_nope/events")
                bad = start_request(
                    nursery, app, "GET", f"/v1/runs/{run.id}/events",
                    headers={"last-event-id": "-3"},
                )  # fmt: skip
                await unknown.finished.wait()
                await bad.finished.wait()
                await owner.finished.wait()
            assert (unknown.status, unknown.json()["error"]["type"]) == (404, "not_found_error")
            assert (bad.status, bad.json()["error"]["type"]) == (400, "invalid_request_error")


async def first_k_events(port: int, body: dict[str, Any], k: int) -> tuple[str, list[SSEEvent]]:
    """POST ``body`` over a raw HTTP/1.1 socket, read ``k`` events, then close
    the socket mid-stream (a client that closes its tab)."""
    h = h11.Connection(h11.CLIENT)
    payload = orjson.dumps(body)
    headers = [("host", "127.0.0.1"), ("content-type", "application/json"),
               ("content-length", str(len(payload)))]  # fmt: skip
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            h.send(h11.Request(method="POST", target="/v1/chat/completions", headers=headers))
            + h.send(h11.Data(data=payload))
            + h.send(h11.EndOfMessage())
        )
        decoder, run_id = SSEDecoder(), ""
        events: list[SSEEvent] = []
        while len(events) < k:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                run_id = dict(event.headers)[b"x-run-id"].decode()
            elif isinstance(event, h11.Data):
                events += decoder.feed(bytes(event.data))
    return run_id, events


async def test_resume_over_a_real_socket(settings: Settings) -> None:
    """Over real HTTP/1.1: closing a detached stream after k events drops only
    that subscriber; reconnecting with Last-Event-ID: k yields exactly the rest."""
    k = 5
    with trio.fail_after(10):
        async with (
            running_server(settings.replace(mock_delay_ms=5)) as server,
            server.client() as client,
        ):
            run_id, first = await first_k_events(server.port, detached_body(), k)
            last_id = first[-1].id
            assert last_id is not None
            run = server.service.runs.runs[run_id]
            headers = {"last-event-id": last_id}
            second = await client.get(f"/v1/runs/{run_id}/events", headers=headers)
            await run.done.wait()
    assert second.status_code == 200
    rest = SSEDecoder().feed(second.content)
    assert ids(rest)[0] > int(last_id)  # a backlog may coalesce: the text proves no gap
    assert text_of(first) + text_of(rest) == FULL
    assert run.log.status.value == "completed"


def text_of(events: list[SSEEvent]) -> str:
    return "".join(
        orjson.loads(e.data)["choices"][0]["delta"].get("content") or ""
        for e in events
        if e.data.startswith("{") and '"choices"' in e.data
    )
