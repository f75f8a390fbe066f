"""Several processes (``--workers``) open one SQLite file at once."""

from __future__ import annotations

import threading
from pathlib import Path

from trio_stream.store import SQLiteStore


def open_together(path: str, count: int) -> tuple[list[SQLiteStore], list[Exception]]:
    """Open ``count`` stores on ``path`` from as many threads, all at once."""
    start = threading.Barrier(count)
    stores: list[SQLiteStore] = []
    errors: list[Exception] = []

    def open_one() -> None:
        start.wait()
        try:
            stores.append(SQLiteStore(path))
        except Exception as exc:  # the caller's assertion reports it
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return stores, errors


def test_workers_opening_one_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Opening a new database file from several connections at the same moment
    never fails with "database is locked": switching the file to WAL takes an
    exclusive lock that does not wait on the busy timeout, so the store
    retries it (before this, two workers started together could die at
    start)."""
    for attempt in range(20):
        stores, errors = open_together(str(tmp_path / f"shared-{attempt}.db"), 6)
        for store in stores:
            store.close()
        assert errors == [], (attempt, errors)
        assert len(stores) == 6
