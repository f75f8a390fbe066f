"""Measure saves per second: group commit against one transaction per save.

Each measurement opens a fresh store (``--db``: a SQLite file, or a
``postgresql://`` URL whose ``messages`` table is emptied first), then
``--savers`` tasks each save ``--saves`` messages one after another, as the
cleanups of that many concurrent runs would.  Two modes:

* **group**: the store's committer runs (``Store.run``, as in a server):
  saves that arrive together share one transaction and one thread hop;
* **single**: no committer: every save is its own transaction, in its own
  worker-thread call (what every save cost before group commit).

It reports saves per second, transactions, and the mean rows per
transaction, for each mode and each ``--db`` given (median of ``--rounds``).

Usage::

    .venv/bin/python tools/measure_saves.py --db /tmp/saves.db \\
        --db postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also as a plain script

from trio_stream.store import Message, Store, is_postgres, open_store


def _fresh(db: str) -> Store:
    """Open ``db`` with no saved messages."""
    if is_postgres(db):
        import psycopg

        open_store(db).close()  # create or migrate the schema
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("TRUNCATE messages")
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(db + suffix).unlink(missing_ok=True)
    return open_store(db)


def _message(run_id: str, session: str) -> Message:
    """A saved run of 10 events, 200 characters."""
    return Message(run_id, "public", session, "x" * 200, None, "complete", "stop", 10, False,
                   time.time())  # fmt: skip


async def _measure(db: str, *, group: bool, savers: int, saves: int) -> tuple[float, int]:
    """(saves per second, transactions) of one run."""
    store = await trio.to_thread.run_sync(_fresh, db)
    try:
        async with trio.open_nursery() as nursery:
            if group:
                await nursery.start(store.run)

            async def saver(n: int) -> None:
                for i in range(saves):
                    await store.save(_message(f"run_{n}_{i}", f"s{n}"))

            start = time.perf_counter()
            async with trio.open_nursery() as savers_nursery:
                for n in range(savers):
                    savers_nursery.start_soon(saver, n)
            took = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        return savers * saves / took, store.commits
    finally:
        store.close()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", action="append", required=True,
                        help="a SQLite path or a postgresql:// URL (repeatable)")  # fmt: skip
    parser.add_argument("--savers", type=int, default=64, help="concurrent saving tasks")
    parser.add_argument("--saves", type=int, default=50, help="saves per task")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    total = args.savers * args.saves
    print(f"{args.savers} concurrent savers x {args.saves} saves = {total} rows per run; "
          f"median of {args.rounds} rounds; {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'database':<10} {'mode':<7} {'saves/s':>9} {'transactions':>13} {'rows/tx':>8}")
    for db in args.db:
        kind = "postgres" if is_postgres(db) else "sqlite"
        for group in (False, True):
            figures = [await _measure(db, group=group, savers=args.savers, saves=args.saves)
                       for _ in range(args.rounds)]  # fmt: skip
            rate = statistics.median(f[0] for f in figures)
            commits = int(statistics.median(f[1] for f in figures))
            mode = "group" if group else "single"
            print(f"{kind:<10} {mode:<7} {rate:>9,.0f} {commits:>13,} {total / commits:>8.1f}")


if __name__ == "__main__":
    trio.run(main)
