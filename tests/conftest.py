"""Shared fixtures: a real in-process server on 127.0.0.1, fake upstreams, leak checks.

``running_server`` (``tools/harness.py``, shared with the measurements in
``tools/``) starts :func:`trio_stream.serve_service` on a free port in the
test's nursery, with a :class:`~trio_stream.RecordingSink` for the logs and
direct access to the :class:`~trio_stream.Service` (runs, store).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tools.fakes import FakeUpstream
from tools.harness import RawClient as RawClient
from tools.harness import ServeProcess as ServeProcess
from tools.harness import Server as Server
from tools.harness import running_server as running_server
from tools.harness import serve_process as serve_process
from tools.harness import task_census as task_census
from tools.harness import tasks_living as tasks_living
from trio_stream import EventLogger, RecordingSink, Service, Settings, open_service
from trio_stream.runs import Run
from trio_stream.store import Message, SQLiteStore, Store, open_store
from trio_stream.store.postgres import PostgresStore
from trio_stream.upstream import Upstream, UpstreamItem
from trio_stream.wire.request import ChatRequest


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(port=0, db=str(tmp_path / "test.db"), mock_delay_ms=1)


@pytest.fixture
async def fake_openai(nursery: trio.Nursery) -> FakeUpstream:
    fake = FakeUpstream("openai")
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def fake_ollama(nursery: trio.Nursery) -> FakeUpstream:
    fake = FakeUpstream("ollama")
    await nursery.start(fake.serve)
    return fake


@asynccontextmanager
async def memory_app(settings: Settings, **service_kw: Any) -> AsyncIterator[tuple[Service, Any]]:
    """An open service and its ASGI app, for in-memory (autojump-safe) tests.

    The store (``--db``: SQLite or Postgres) runs inline (``threaded=False``)
    unless one is passed.
    """
    from trio_stream import TrioStreamApp

    if "store" not in service_kw:
        service_kw["store"] = open_store(settings.db, threaded=False)
    logs = RecordingSink()
    logger = EventLogger(settings.log_format, sink=logs, stream=io.StringIO())
    async with open_service(settings, logger=logger, **service_kw) as service:
        app = TrioStreamApp(service)
        app.logs = logs  # type: ignore[attr-defined]
        yield service, app


class Recording(Store):
    """Mixed into a store: also records every ``save()`` call in :attr:`saves`.

    The schema refuses a second row, so counting rows alone cannot tell "saved
    once" from "saved twice, the second refused": the recorded calls can.
    """

    saves: list[Message]

    async def save(self, m: Message) -> None:
        self.saves.append(m)
        await super().save(m)

    def saves_of(self, run_id: str) -> list[Message]:
        return [m for m in self.saves if m.run_id == run_id]


class RecordingStore(Recording, SQLiteStore):
    """A :class:`~trio_stream.store.sqlite.SQLiteStore` that records its saves."""

    def __init__(self, path: str, *, threaded: bool = True) -> None:
        super().__init__(path, threaded=threaded)
        self.saves = []


class RecordingPostgresStore(Recording, PostgresStore):
    """A :class:`~trio_stream.store.postgres.PostgresStore` that records its saves."""

    def __init__(self, url: str, *, threaded: bool = True, timeout: float = 5.0) -> None:
        super().__init__(url, threaded=threaded, timeout=timeout)
        self.saves = []


def recording_store(db: str, *, threaded: bool = True) -> RecordingStore | RecordingPostgresStore:
    """The recording store of ``db``: a SQLite path or a ``postgresql://`` URL."""
    if db.startswith("postgresql://"):
        return RecordingPostgresStore(db, threaded=threaded)
    return RecordingStore(db, threaded=threaded)


async def until_seq(run: Run, n: int) -> None:
    """Block until ``run``'s log holds at least ``n`` entries (or the run ended)."""
    while run.log.last_seq < n and run.log.outcome is None:
        await run.wait_changed()


class WaitableSink(RecordingSink):
    """A :class:`~trio_stream.RecordingSink` whose records can be awaited.

    Each record's ``trio.current_time()`` is kept in :attr:`times` (same
    index), so tests can order log lines against other trio timestamps
    (for example :class:`~tools.fakes.FakeUpstream` connection times).
    """

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._changed = trio.Event()

    def __call__(self, record: dict[str, Any]) -> None:
        super().__call__(record)
        self.times.append(trio.current_time())
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Any) -> None:
        """Block until ``predicate()`` holds (re-checked after every record)."""
        while not predicate():
            await self._changed.wait()

    async def wait_for(self, name: str, **match: Any) -> dict[str, Any]:
        """Block until a ``name`` record matching ``match`` exists; return the first."""
        await self.wait_until(lambda: self.events(name, **match))
        return self.events(name, **match)[0]

    def time_of(self, name: str, **match: Any) -> float:
        """The trio time of the first ``name`` record matching ``match``."""
        for record, at in zip(self.records, self.times, strict=True):
            if record["event"] == name and all(record.get(k) == v for k, v in match.items()):
                return at
        raise LookupError(f"no {name} record matching {match}")


@asynccontextmanager
async def waitable_server(
    settings: Settings, **service_kw: Any
) -> AsyncIterator[tuple[Server, WaitableSink]]:
    """:func:`running_server`, logging into a :class:`WaitableSink` (also ``server.logs``)."""
    logs = WaitableSink()
    async with running_server(settings, logs=logs, **service_kw) as server:
        yield server, logs


class Slow(Store):
    """Mixed into a store: ``save`` first sleeps ``delay(m)`` seconds, then
    inserts -- a run's cleanup that is stuck for a while.  Every call is
    recorded in :attr:`saves` before the sleep."""

    delay: Callable[[Message], float]
    saves: list[Message]

    async def save(self, m: Message) -> None:
        self.saves.append(m)
        await trio.sleep(self.delay(m))
        await super().save(m)


class SlowStore(Slow, SQLiteStore):
    """An inline (autojump-safe) SQLite store with slow saves."""

    def __init__(self, path: str, delay: Callable[[Message], float]) -> None:
        super().__init__(path, threaded=False)
        self.delay = delay
        self.saves = []


class SlowPostgresStore(Slow, PostgresStore):
    """An inline (autojump-safe) Postgres store with slow saves."""

    def __init__(self, url: str, delay: Callable[[Message], float]) -> None:
        super().__init__(url, threaded=False)
        self.delay = delay
        self.saves = []


class RecordingUpstream:
    """Wraps an upstream and records which requests hold it open, and when.

    ``stuck_close(request)`` seconds: leaving that request's stream first
    blocks that long, before the inner stream is left, shielded and without a
    deadline -- on purpose: the incident's upstream call that ignored
    cancellation.  (The mock holds nothing meanwhile; httpx has already closed
    a connection whose read was cancelled.)  ``on_open`` is called
    each time a request opens (after it is counted as holding).
    """

    name = "recording"

    def __init__(
        self,
        inner: Upstream,
        *,
        stuck_close: Callable[[ChatRequest], float] | None = None,
        on_open: Callable[[ChatRequest], None] | None = None,
    ) -> None:
        self.inner = inner
        self.stuck_close = stuck_close
        self.on_open = on_open
        self.holding: list[ChatRequest] = []
        self.opened: list[tuple[float, ChatRequest]] = []
        self.closed: list[tuple[float, ChatRequest]] = []
        self.history: list[tuple[str, ChatRequest]] = []  # ("open" | "close", request)

    def holds(self, request: ChatRequest) -> bool:
        return any(r is request for r in self.holding)

    def opened_at(self, request: ChatRequest) -> float:
        return next(t for t, r in self.opened if r is request)

    def closed_at(self, request: ChatRequest) -> float:
        return next(t for t, r in self.closed if r is request)

    def stream(
        self, request: ChatRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[UpstreamItem]]:
        return self._stream(request)

    @asynccontextmanager
    async def _stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[UpstreamItem]]:
        self.opened.append((trio.current_time(), request))
        self.history.append(("open", request))
        self.holding.append(request)
        if self.on_open is not None:
            self.on_open(request)
        try:
            async with self.inner.stream(request) as items:
                try:
                    yield items
                finally:  # stuck while still holding the inner stream (its connection)
                    delay = self.stuck_close(request) if self.stuck_close is not None else 0.0
                    if delay:
                        with trio.CancelScope(shield=True):
                            await trio.sleep(delay)
        finally:
            self.holding = [r for r in self.holding if r is not request]
            self.closed.append((trio.current_time(), request))
            self.history.append(("close", request))

    async def models(self) -> list[dict[str, Any]]:
        return await self.inner.models()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.inner.run(task_status=task_status)

    async def aclose(self) -> None:
        await self.inner.aclose()


def loopback_client(server: Server, **kw: Any) -> httpx.AsyncClient:
    """Like ``server.client()``, without loading the CA bundle (about 0.1 s per
    client here): plain HTTP to 127.0.0.1 needs no certificates."""
    return httpx.AsyncClient(base_url=server.url, timeout=30, verify=False, **kw)


# A real Redis for cluster mode (tests/redis_server.py).
# A real Postgres for the Postgres store (tests/postgres_server.py).
from tests.postgres_server import own_postgres, pg_url, postgres_server  # noqa: E402, F401
from tests.redis_server import own_redis, redis_server  # noqa: E402, F401
