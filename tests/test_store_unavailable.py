"""Routes that read saved messages, when the database cannot be reached.

The invariants (docs/api.md sections 2 and 3.5): a read that cannot reach
the database answers 503 ``unavailable_error`` / ``store_unavailable`` with
``Retry-After`` and the OpenAI error body on every route that reads the
store, never 500, and the same routes answer as before once the database is
back; and a read whose pooled Postgres connection died (a restarted server,
an administrator ending the backends) is answered at once -- the dead
connection is replaced and the read done again -- not failed.

Postgres runs for real (``tests/postgres_server.py``); SQLite's reads are
made to fail by a store that raises :class:`StoreUnavailable` while told to,
since a local WAL file cannot be made unreachable to its own connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import httpx
import psycopg
import trio

from tests.conftest import waitable_server
from tests.postgres_server import PostgresServer
from trio_stream import Settings
from trio_stream.store import SQLiteStore, StoreUnavailable
from trio_stream.store.postgres import PostgresStore

SESSION = "stored"


async def saved_run_and_response(client: httpx.AsyncClient, server: Any) -> tuple[str, str]:
    """A finished chat run in session ``SESSION`` and a finished response,
    both saved and gone from memory (so reading them reads the store)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    chat = await client.post("/v1/chat/completions", json=body,
                             headers={"x-session-id": SESSION})  # fmt: skip
    assert chat.status_code == 200, chat.text
    response = await client.post("/v1/responses", json={"model": "m", "input": "hi",
                                                        "max_output_tokens": 3})  # fmt: skip
    assert response.status_code == 200, response.text
    await server.service.runs.wait_idle()
    return chat.headers["x-run-id"], response.json()["id"]


def store_routes(run_id: str, response_id: str) -> list[tuple[str, str]]:
    """Every route that reads the store (for a run no longer in memory)."""
    return [
        ("GET", f"/v1/sessions/{SESSION}/messages"),
        ("POST", f"/v1/sessions/{SESSION}/interrupt"),
        ("GET", f"/v1/runs/{run_id}"),
        ("POST", f"/v1/runs/{run_id}/cancel"),
        ("GET", f"/v1/responses/{response_id}"),
        ("POST", f"/v1/responses/{response_id}/cancel"),
    ]


async def answers(
    client: httpx.AsyncClient, routes: Sequence[tuple[str, str]]
) -> list[tuple[int, Any]]:
    out = []
    for method, path in routes:
        r = await client.request(method, path)
        out.append((r.status_code, r.json()))
    return out


async def assert_unavailable(client: httpx.AsyncClient, routes: Sequence[tuple[str, str]]) -> None:
    for method, path in routes:
        r = await client.request(method, path)
        assert r.status_code == 503, (method, path, r.status_code, r.text)
        assert r.headers["retry-after"] == "1", (method, path)
        assert r.json() == {"error": {
            "message": "The message store is unavailable, retry shortly.",
            "type": "unavailable_error", "param": None, "code": "store_unavailable",
        }}, (method, path)  # fmt: skip


class FailingReads(SQLiteStore):
    """A SQLite store whose reads raise StoreUnavailable while ``down``."""

    down = False

    def _select(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self.down:
            raise StoreUnavailable("test: the database is down")
        return super()._select(sql, args)


async def test_sqlite_reads_that_fail_answer_503_on_every_route(settings: Settings) -> None:
    """With SQLite, a read raising StoreUnavailable answers 503 +
    Retry-After + the OpenAI body on every route that reads the store (it
    was 500), is logged ``store_unavailable``, and the routes answer as
    before once reads work again."""
    store = FailingReads(settings.db)
    with trio.fail_after(30):
        async with waitable_server(settings, store=store) as (server, logs), server.client() as c:
            run_id, response_id = await saved_run_and_response(c, server)
            routes = store_routes(run_id, response_id)
            before = await answers(c, routes)
            store.down = True
            await assert_unavailable(c, routes)
            store.down = False
            after = await answers(c, routes)
    assert [status for status, _ in before] == [200] * len(routes)
    assert after == before
    assert [r["path"] for r in logs.events("store_unavailable")] == [p for _, p in routes]


def _use_at_once(store: PostgresStore, n: int) -> None:
    """Take ``n`` pooled connections at once and give them back: the pool
    then holds ``n`` idle connections (a restart leaves them all dead)."""
    with contextlib.ExitStack() as stack:
        for _ in range(n):
            stack.enter_context(store._pool.connection())


def _terminate_backends(admin_url: str, database: str) -> int:
    """End every connection to ``database`` (waiting until each is gone), as a
    Postgres restart does; how many there were."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (database,),
        ).fetchall()  # fmt: skip
    assert all(ok for (ok,) in rows)
    return len(rows)


async def test_reads_right_after_postgres_ended_every_connection_answer_200(
    settings: Settings, postgres_server: PostgresServer
) -> None:
    """Every pooled connection is ended by the server (as in a restart),
    three of them idle in the pool: the next read on each route that reads
    the store answers 200, as before -- the first read on a dead connection
    is done again on a live one (it answered 500 before)."""
    url = postgres_server.new_database()
    database = url.rsplit("/", 1)[1]
    cfg = settings.replace(db=url)
    with trio.fail_after(60):
        async with waitable_server(cfg) as (server, logs), server.client() as c:
            run_id, response_id = await saved_run_and_response(c, server)
            routes = store_routes(run_id, response_id)
            before = await answers(c, routes)
            store = server.service.store
            assert isinstance(store, PostgresStore)
            await trio.to_thread.run_sync(_use_at_once, store, 3)
            ended = await trio.to_thread.run_sync(_terminate_backends, postgres_server.url(),
                                                  database)  # fmt: skip
            after = await answers(c, routes)
    assert ended >= 3
    assert [status for status, _ in before] == [200] * len(routes)
    assert after == before
    assert not logs.events("store_unavailable")


async def test_postgres_down_answers_503_on_every_route_then_recovers(
    settings: Settings, own_postgres: PostgresServer
) -> None:
    """With Postgres stopped (a crash: ``-m immediate``), every route that
    reads the store answers 503 + Retry-After + the OpenAI body, each within
    a few seconds (it was 500); once Postgres is back each answers as it did
    before."""
    url = own_postgres.new_database()
    with trio.fail_after(60):
        async with waitable_server(settings.replace(db=url)) as (server, _), server.client() as c:
            run_id, response_id = await saved_run_and_response(c, server)
            routes = store_routes(run_id, response_id)
            before = await answers(c, routes)
            await trio.to_thread.run_sync(own_postgres.stop, "immediate")
            start = trio.current_time()
            await assert_unavailable(c, routes)
            took = trio.current_time() - start
            await trio.to_thread.run_sync(own_postgres.start)
            after = await answers(c, routes)
    assert [status for status, _ in before] == [200] * len(routes)
    assert after == before
    assert took < 3.0 * len(routes), took
