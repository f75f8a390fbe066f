"""One contract for both stores: SQLite and Postgres (docs/design.md section 8).

Every test runs against :class:`~trio_stream.store.sqlite.SQLiteStore` and
:class:`~trio_stream.store.postgres.PostgresStore` (a real Postgres, started by the
fixtures of ``tests/postgres_server.py``), threaded as in production.  The
invariants: the primary key refuses a second save (:class:`AlreadySaved`);
tenants never see each other's rows; a session lists its messages oldest
first; group commit shares transactions without letting a duplicate or a bad
row fail its neighbours, whoever stops waiting; migrations are idempotent and
safe when several nodes start at once.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import trio

from trio_stream.store import (
    SQLITE_MIGRATIONS,
    AlreadySaved,
    Message,
    SQLiteStore,
    Store,
    first_of_each,
    open_store,
    retry_delay,
)
from trio_stream.store import postgres as pgstore

BACKENDS = ["sqlite", "postgres"]
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]


def message(run_id: str, *, tenant: str = "t1", session: str | None = "s1", created: float = 1.0,
            content: str = "hello") -> Message:  # fmt: skip
    return Message(run_id, tenant, session, content, None, "complete", "stop", 3, False, created)


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each backend: a SQLite path, or a Postgres URL."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "contract.db")


@pytest.fixture
def store(db: str) -> Iterator[Store]:
    s = open_store(db)
    yield s
    s.close()


@pytest.fixture
async def committing(store: Store, nursery: trio.Nursery) -> Store:
    """The store with its committer running (group commit on), as in a service."""
    await nursery.start(store.run)
    return store


async def test_a_saved_message_reads_back_equal(store: Store) -> None:
    """What save() wrote, get() and session_messages() return unchanged --
    tool calls, usage (every field), reasoning, refusal, logprobs presence, a
    failed run's outcome message and upstream error (JSON, a number code kept
    a number), a missing session, the float timestamp -- and count() is 1."""
    usage = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5, "cost": 0.5,
             "model": "m"}  # fmt: skip
    with_calls = replace(message("run_a", created=1700000000.123456), tool_calls=CALLS,
                         usage=usage, reasoning="think", logprobs=True)  # fmt: skip
    no_session = replace(message("run_b", session=None, content=""), status="partial",
                         reason=None, refusal="I can't help with that.")  # fmt: skip
    error = {"message": "boom", "type": "InternalServerError", "param": None, "code": 500,
             "metadata": {"raw": ["x"]}, "source": "upstream"}  # fmt: skip
    failed = replace(message("run_c", session=None), status="failed", reason="upstream_error",
                     outcome_message="boom", error=error)  # fmt: skip
    await store.save(with_calls)
    await store.save(no_session)
    await store.save(failed)
    assert await store.get("t1", "run_a") == with_calls
    assert await store.get("t1", "run_b") == no_session
    assert await store.get("t1", "run_c") == failed
    assert await store.session_messages("t1", "s1") == [with_calls]
    assert (await store.count("run_a"), await store.count("run_zz")) == (1, 0)


async def test_the_primary_key_refuses_a_second_save(store: Store) -> None:
    """A second save of a run raises AlreadySaved and changes nothing: one
    row, the first one."""
    first = message("run_a")
    await store.save(first)
    with pytest.raises(AlreadySaved):
        await store.save(replace(first, content="something else", status="partial"))
    assert await store.count("run_a") == 1
    assert await store.get("t1", "run_a") == first


async def test_tenants_are_isolated(store: Store) -> None:
    """Two tenants with the same session id see only their own rows, and a
    run is invisible to every tenant but its own."""
    mine, theirs = message("run_1", tenant="t1"), message("run_2", tenant="t2")
    await store.save(mine)
    await store.save(theirs)
    assert await store.session_messages("t1", "s1") == [mine]
    assert await store.session_messages("t2", "s1") == [theirs]
    assert await store.get("t2", "run_1") is None
    assert await store.get("t1", "run_2") is None


async def test_a_session_lists_oldest_first_then_in_save_order(store: Store) -> None:
    """session_messages orders by creation time, and rows created at the same
    instant in the order they were saved."""
    late, tie_a, tie_b = message("run_late", created=5.0), message("run_z"), message("run_y")
    for m in (late, tie_a, tie_b):
        await store.save(m)
    assert [m.run_id for m in await store.session_messages("t1", "s1")] == [
        "run_z", "run_y", "run_late",
    ]  # fmt: skip


async def test_group_commit_shares_transactions_and_keeps_exactly_once(
    committing: Store,
) -> None:
    """Saves that arrive together share transactions (fewer commits than
    saves); every run is saved once; each duplicate -- also one inside the
    same batch -- fails alone with AlreadySaved."""
    store = committing
    ids = [f"run_{i}" for i in range(60)]
    outcomes: dict[int, str] = {}

    async def save(i: int, run_id: str) -> None:
        try:
            await store.save(message(run_id, created=float(i)))
            outcomes[i] = "saved"
        except AlreadySaved:
            outcomes[i] = "duplicate"

    calls = [*ids, *ids[:10]]  # ten runs saved twice, in the same wave
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i, run_id in enumerate(calls):
                nursery.start_soon(save, i, run_id)
    per_run = {run_id: sorted(outcomes[i] for i, r in enumerate(calls) if r == run_id)
               for run_id in ids}  # fmt: skip
    assert all(v in (["saved"], ["duplicate", "saved"]) for v in per_run.values()), per_run
    assert sum(v == ["duplicate", "saved"] for v in per_run.values()) == 10
    assert [await store.count(r) for r in ids] == [1] * len(ids)
    assert store.rows == len(calls)
    assert store.commits < len(calls) / 4, store.commits


async def test_a_bad_row_fails_only_its_own_save(committing: Store) -> None:
    """A row the schema rejects (an unknown status) fails its own save with
    the database's error; the saves batched with it land."""
    store = committing
    results: dict[str, BaseException | None] = {}

    async def save(m: Message) -> None:
        try:
            await store.save(m)
            results[m.run_id] = None
        except Exception as exc:
            results[m.run_id] = exc

    good = [message(f"run_{i}") for i in range(8)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for m in [*good[:4], replace(message("run_bad"), status="bogus"), *good[4:]]:
                nursery.start_soon(save, m)
    assert isinstance(results.pop("run_bad"), sqlite3.IntegrityError | psycopg.IntegrityError)
    assert results == {m.run_id: None for m in good}
    assert await store.count("run_bad") == 0
    assert [await store.count(m.run_id) for m in good] == [1] * len(good)


async def test_a_cancelled_waiter_leaves_its_batch_consistent(committing: Store) -> None:
    """Waiters that give up (their deadline) do not disturb the batch: every
    other save lands once, a cancelled one lands at most once, and saving it
    again either lands it or finds it already saved -- never two rows."""
    store = committing
    ids = [f"run_{i}" for i in range(40)]
    quitters = set(ids[::3])

    async def save(run_id: str) -> None:
        with trio.CancelScope() as scope:
            if run_id in quitters:
                scope.cancel()  # gives up at its first checkpoint: queued or waiting
            await store.save(message(run_id))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for run_id in ids:
                nursery.start_soon(save, run_id)
        for run_id in sorted(quitters):
            with contextlib.suppress(AlreadySaved):
                await store.save(message(run_id))
        counts = [await store.count(r) for r in ids]
    assert counts == [1] * len(ids)


async def test_without_a_committer_each_save_is_its_own_transaction(store: Store) -> None:
    """A store used on its own (no run()) still saves, one transaction each."""
    for i in range(3):
        await store.save(message(f"run_{i}"))
    assert (store.commits, store.rows) == (3, 3)


def schema_of(db: str) -> tuple[list[int], int]:
    """(the schema versions recorded, how many messages tables exist)."""
    if db.startswith("postgresql://"):
        with psycopg.connect(db) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
            tables = conn.execute(
                "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'messages'"
            ).fetchone()
        return versions, tables[0] if tables else 0
    with sqlite3.connect(db) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
        ).fetchone()[0]
    return list(range(1, version + 1)), tables


def expected_versions(db: str) -> list[int]:
    migrations = pgstore.MIGRATIONS if db.startswith("postgresql://") else SQLITE_MIGRATIONS
    return list(range(1, len(migrations) + 1))


async def test_migrations_run_twice_and_by_several_nodes_at_once(db: str) -> None:
    """Opening a database migrates it once: a second open, and six nodes
    opening a fresh database at the same moment, raise nothing and leave one
    schema at the latest version, rows intact."""
    barrier_db = db

    def open_close() -> None:
        open_store(barrier_db).close()

    with ThreadPoolExecutor(6) as pool:  # six nodes starting together
        for f in [pool.submit(open_close) for _ in range(6)]:
            f.result(timeout=30)
    assert schema_of(db) == (expected_versions(db), 1)
    first = open_store(db)
    await first.save(message("run_kept"))
    first.close()
    again = open_store(db)
    assert await again.count("run_kept") == 1
    again.close()
    assert schema_of(db) == (expected_versions(db), 1)


def _version_2(db: str) -> None:
    """Bring a fresh database to schema version 2 and save one row the way a
    trio-stream of that version did (no reasoning/refusal/logprobs columns)."""
    old = ("run_old", "t1", "s1", "hi", None, "complete", "stop", 1, False, 1.0, None)
    if db.startswith("postgresql://"):
        with psycopg.connect(db) as conn:
            conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
            for version, statements in enumerate(pgstore.MIGRATIONS[:2], start=1):
                for sql in statements:
                    conn.execute(sql)
                conn.execute("INSERT INTO schema_version VALUES (%s)", (version,))
            conn.execute(
                "INSERT INTO messages (run_id, tenant, session_id, content, tool_calls, status,"
                " reason, events, detached, created, usage) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                old,
            )
        return
    with sqlite3.connect(db) as conn:
        for statements in SQLITE_MIGRATIONS[:2]:
            for sql in statements:
                conn.execute(sql)
        conn.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", old)
        conn.execute("PRAGMA user_version = 2")


async def test_a_version_2_database_migrates_and_keeps_its_rows(db: str) -> None:
    """Issue 20 item 3, both stores: a database saved by an older schema
    (version 2) gets the reasoning/refusal/logprobs columns and the outcome
    message/error columns when a newer trio-stream opens it (append-only
    migrations 3 and 4); its old rows read back with none of them, and new
    rows keep them."""
    _version_2(db)
    store = open_store(db)
    try:
        old = await store.get("t1", "run_old")
        assert old is not None
        assert (old.content, old.reasoning, old.refusal, old.logprobs) == ("hi", None, None, False)
        assert (old.outcome_message, old.error) == (None, None)
        new = replace(message("run_new"), reasoning="r", refusal="no", logprobs=True,
                      outcome_message="m", error={"message": "m", "code": None})  # fmt: skip
        await store.save(new)
        assert await store.get("t1", "run_new") == new
    finally:
        store.close()
    assert schema_of(db) == (expected_versions(db), 1)


def test_a_database_from_before_versioning_is_adopted(tmp_path: Path) -> None:
    """A SQLite file written before schema versions (user_version 0, the
    table already there) opens without error and is marked current."""
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as conn:
        for sql in SQLITE_MIGRATIONS[0]:
            conn.execute(sql)
    SQLiteStore(path).close()
    assert schema_of(path) == (expected_versions(path), 1)


def test_retry_policy_and_batch_bookkeeping() -> None:
    """Retries back off from 50 ms, doubling, capped at 1 s; a run listed
    twice in one batch is new only the first time."""
    assert [retry_delay(n) for n in (1, 2, 3, 5, 10)] == [0.05, 0.1, 0.2, 0.8, 1.0]
    assert first_of_each(["a", "b", "a", "c"], {"a", "b"}) == [True, True, False, False]
