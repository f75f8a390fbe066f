"""Shared fixtures: a real in-process server on 127.0.0.1, fake upstreams, leak checks.

``running_server`` starts :func:`trio_stream.serve_service` on a free port in
the test's nursery, with a :class:`~trio_stream.RecordingSink` for the logs
and direct access to the :class:`~trio_stream.Service` (runs, store).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.fakes import FakeUpstream
from trio_stream import EventLogger, RecordingSink, Service, Settings, open_service, serve_service


@dataclass
class Server:
    service: Service
    port: int
    logs: RecordingSink
    shutdown: trio.Event

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kw)


@asynccontextmanager
async def running_server(settings: Settings, **service_kw: Any) -> AsyncIterator[Server]:
    """Serve ``settings`` on a real socket for the duration of the block."""
    logs = RecordingSink()
    logger = EventLogger(settings.log_format, sink=logs, stream=io.StringIO())
    shutdown = trio.Event()
    async with (
        open_service(settings, logger=logger, **service_kw) as service,
        trio.open_nursery() as nursery,
    ):
        port = await nursery.start(partial(serve_service, service, shutdown=shutdown))
        try:
            yield Server(service, port, logs, shutdown)
        finally:
            nursery.cancel_scope.cancel()


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


async def tasks_living() -> int:
    """trio's live task count once everything runnable has run."""
    await trio.testing.wait_all_tasks_blocked()
    return trio.lowlevel.current_statistics().tasks_living


@asynccontextmanager
async def memory_app(settings: Settings, **service_kw: Any) -> AsyncIterator[tuple[Service, Any]]:
    """An open service and its ASGI app, for in-memory (autojump-safe) tests.

    The store runs SQLite inline (``threaded=False``) unless one is passed.
    """
    from trio_stream import TrioStreamApp
    from trio_stream.store import Store

    service_kw.setdefault("store", Store(settings.db, threaded=False))
    logs = RecordingSink()
    logger = EventLogger(settings.log_format, sink=logs, stream=io.StringIO())
    async with open_service(settings, logger=logger, **service_kw) as service:
        app = TrioStreamApp(service)
        app.logs = logs  # type: ignore[attr-defined]
        yield service, app
