"""The Postgres store in a running server: shared by nodes, surviving restarts.

A real Postgres (``tests/postgres_server.py``) behind real servers on
127.0.0.1.  The invariants: two nodes given the same ``--db`` URL show one
history; a database that crashes and comes back while streams run costs no
save twice and loses none silently -- each run with content is saved exactly
once, or (past ``--save-timeout``) logged ``save_failed`` and counted in
``trio_stream_save_failures_total`` -- while ``/healthz`` keeps answering and
no request hangs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import trio

from tests.conftest import Server, until_seq, waitable_server
from tests.postgres_server import PostgresServer
from trio_stream import Settings
from trio_stream.store.postgres import PostgresStore
from trio_stream.upstream import mocktext


def chat(content: str, *, max_tokens: int, detach: bool = False) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": max_tokens, "detach": detach}  # fmt: skip


@contextmanager
def postgres_rows(url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(url)
    try:
        yield store
    finally:
        store.close()


async def test_two_nodes_sharing_one_postgres_see_one_history(
    settings: Settings, pg_url: str
) -> None:
    """Runs of one session served by two nodes with the same --db URL are
    listed, oldest first and once each, by both nodes; either node answers
    GET /v1/runs/{id} for the other's finished run; the messages API shows
    the same fields as with SQLite."""
    cfg = settings.replace(db=pg_url)
    session = {"x-session-id": "shared"}
    with trio.fail_after(30):
        async with (
            waitable_server(cfg) as (one, _),
            waitable_server(cfg) as (two, _),
            one.client() as c1,
            two.client() as c2,
        ):
            first = await c1.post("/v1/chat/completions", json=chat("on one", max_tokens=4),
                                  headers=session)  # fmt: skip
            second = await c2.post("/v1/chat/completions", json=chat("on two", max_tokens=6),
                                   headers=session)  # fmt: skip
            ids = [first.headers["x-run-id"], second.headers["x-run-id"]]
            listings = [(await c.get("/v1/sessions/shared/messages")).json() for c in (c1, c2)]
            crossed = [(await c2.get(f"/v1/runs/{ids[0]}")).json(),
                       (await c1.get(f"/v1/runs/{ids[1]}")).json()]  # fmt: skip
    assert listings[0] == listings[1]
    rows = listings[0]["data"]
    assert [r["run_id"] for r in rows] == ids
    fields = {"run_id", "content", "status", "reason", "created", "usage", "served_by"}
    assert [set(r) for r in rows] == [fields] * 2
    assert [(r["status"], r["content"]) for r in rows] == [
        ("complete", mocktext.expected_text([{"role": "user", "content": "on one"}], 4)),
        ("complete", mocktext.expected_text([{"role": "user", "content": "on two"}], 6)),
    ]
    assert [c["id"] for c in crossed] == ids
    assert [c["content"] for c in crossed] == [r["content"] for r in rows]


async def _read_to_end(client: httpx.AsyncClient, body: dict[str, Any], out: list[str]) -> None:
    """POST a streamed completion and keep its whole body (to ``[DONE]``)."""
    response = await client.post("/v1/chat/completions", json=body)
    out.append(response.text)


async def _poll_health(server: Server, answers: list[int], stop: trio.Event) -> None:
    """GET /healthz until ``stop``; each must answer within 1 s."""
    async with server.client() as client:
        while not stop.is_set():
            with trio.fail_after(1):
                answers.append((await client.get("/healthz")).status_code)
            with trio.move_on_after(0.05):  # sampling, not ordering
                await stop.wait()


async def _start_detached(client: httpx.AsyncClient, i: int) -> str:
    """Start a long detached run and leave it (its subscriber goes); its id."""
    body = chat(f"detached {i}", max_tokens=1000, detach=True)
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        return response.headers["x-run-id"]


async def test_postgres_restart_while_streams_run_saves_each_run_once(
    settings: Settings, own_postgres: PostgresServer
) -> None:
    """Postgres crashes (pg_ctl stop -m immediate) with runs in flight, and
    runs end while it is down -- clients leave, detached runs are stopped,
    short runs complete.  Their saves are retried; once Postgres is back each
    run is saved exactly once (or logged save_failed past --save-timeout, and
    counted); /healthz answered 200 throughout; every request ended."""
    url = own_postgres.new_database()
    cfg = settings.replace(db=url, mock_delay_ms=50, save_timeout=20.0)
    health: list[int] = []
    stop_polling = trio.Event()
    with trio.fail_after(60):
        async with waitable_server(cfg) as (server, logs), server.client() as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_poll_health, server, health, stop_polling)
                # In flight before the crash: attached streams and detached runs.
                attached: list[tuple[trio.CancelScope, str]] = []
                for i in range(6):
                    scope = trio.CancelScope()
                    rid = await nursery.start(_stream_until_cancelled, client, scope, i)
                    attached.append((scope, rid))
                detached = [await _start_detached(client, i) for i in range(6)]
                for rid in [*(a[1] for a in attached), *detached]:
                    await until_seq(server.service.runs.runs[rid], 2)

                await trio.to_thread.run_sync(own_postgres.stop, "immediate")

                for scope, _ in attached:
                    scope.cancel()  # the client leaves: partial, client_disconnect
                for rid in detached:
                    assert (await client.post(f"/v1/runs/{rid}/cancel")).status_code == 200
                short: list[str] = []
                for i in range(6):  # these complete while the database is down
                    nursery.start_soon(_read_to_end, client,
                                       chat(f"short {i}", max_tokens=3), short)  # fmt: skip
                await logs.wait_until(lambda: len(logs.events("stream_start")) == 18)
                all_ids = [r["trace"] for r in logs.events("stream_start")]
                for rid in all_ids:
                    run = server.service.runs.runs.get(rid)
                    while run is not None and run.log.outcome is None:
                        await run.wait_changed()
                await logs.wait_until(lambda: len(logs.events("save_retry")) > 0)

                await trio.to_thread.run_sync(own_postgres.start)

                await server.service.runs.wait_idle()
                await logs.wait_until(lambda: len(short) == 6)
                stop_polling.set()
            metrics = (await client.get("/metrics")).text
    failed = {r["trace"] for r in logs.events("save_failed")}
    with postgres_rows(url) as rows:
        counts = {rid: await rows.count(rid) for rid in all_ids}
    for rid in all_ids:
        assert counts[rid] == 1 or (rid in failed and counts[rid] == 0), rid
    assert not logs.events("save_duplicate_refused")
    assert {r["trace"] for r in logs.events("save_retry")} - failed, "no retried save landed"
    assert f"trio_stream_save_failures_total {float(len(failed))}" in metrics
    assert all(text.endswith("data: [DONE]\n\n") for text in short)
    assert health
    assert set(health) == {200}


async def _stream_until_cancelled(
    client: httpx.AsyncClient,
    scope: trio.CancelScope,
    i: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Stream a long run, reporting its id once the headers are in, until
    ``scope`` is cancelled (the client leaving)."""
    with scope:
        body = chat(f"attached {i}", max_tokens=1000)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            task_status.started(response.headers["x-run-id"])
            async for _ in response.aiter_bytes():
                pass


async def test_a_save_past_its_deadline_is_logged_and_counted(
    settings: Settings, own_postgres: PostgresServer
) -> None:
    """With Postgres down for longer than --save-timeout, a finished run's
    save gives up at the deadline: save_failed is logged, the failure counted,
    the client still gets its terminal frame, /healthz answers; once Postgres
    is back the next run saves as usual."""
    url = own_postgres.new_database()
    cfg = settings.replace(db=url, mock_delay_ms=1, save_timeout=1.0)
    with trio.fail_after(30):
        async with waitable_server(cfg) as (server, logs), server.client() as client:
            await trio.to_thread.run_sync(own_postgres.stop, "immediate")
            lost = await client.post("/v1/chat/completions", json=chat("lost", max_tokens=3))
            lost_id = lost.headers["x-run-id"]
            await logs.wait_for("save_failed", trace=lost_id)
            health = await client.get("/healthz")
            metrics = (await client.get("/metrics")).text
            await trio.to_thread.run_sync(own_postgres.start)
            kept = await client.post("/v1/chat/completions", json=chat("kept", max_tokens=3))
            kept_id = kept.headers["x-run-id"]
    assert lost.text.endswith("data: [DONE]\n\n")
    assert logs.events("save_timeout", trace=lost_id)
    assert "trio_stream_save_failures_total 1.0" in metrics
    assert health.status_code == 200
    with postgres_rows(url) as rows:
        assert (await rows.count(lost_id), await rows.count(kept_id)) == (0, 1)
