"""Shared fixtures: a real in-process server on 127.0.0.1, fake upstreams, leak checks.

``running_server`` starts :func:`trio_stream.serve_service` on a free port in
the test's nursery, with a :class:`~trio_stream.RecordingSink` for the logs
and direct access to the :class:`~trio_stream.Service` (runs, store).
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import orjson
import pytest
import trio
import trio.testing

from tests.fakes import FakeUpstream
from trio_stream import EventLogger, RecordingSink, Service, Settings, open_service, serve_service
from trio_stream.runs.manager import Run
from trio_stream.store.base import Message, SQLiteStore, Store, open_store
from trio_stream.store.postgres import PostgresStore
from trio_stream.upstream import Item, Upstream
from trio_stream.wire.request import ChatRequest
from trio_stream.wire.sse import SSEDecoder, SSEEvent


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


class _Discard(io.StringIO):
    """A text stream that keeps nothing."""

    def write(self, s: str) -> int:
        return len(s)


@asynccontextmanager
async def running_server(
    settings: Settings,
    *,
    record_logs: bool = True,
    logs: RecordingSink | None = None,
    **service_kw: Any,
) -> AsyncIterator[Server]:
    """Serve ``settings`` on a real socket for the duration of the block.

    Log records go to ``logs`` (a fresh :class:`RecordingSink` by default);
    ``record_logs=False`` keeps none (stress tests: memory must not grow).
    """
    logs = logs if logs is not None else RecordingSink()
    if record_logs:
        logger = EventLogger(settings.log_format, sink=logs, stream=io.StringIO())
    else:
        logger = EventLogger(settings.log_format, stream=_Discard())
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
    """A :class:`~trio_stream.store.base.SQLiteStore` that records its saves."""

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


class RawClient:
    """One HTTP/1.1 request on a raw trio socket (h11), its body read as SSE.

    ``aclose()`` is a real TCP close, which is what a client going away looks
    like.  ``rcvbuf`` shrinks the socket's receive buffer before connecting,
    so that a client that stops reading makes the server's send block early.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.decoder = SSEDecoder()
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.ended = False
        self._events: deque[SSEEvent] = deque()

    @classmethod
    async def post(
        cls, port: int, path: str, body: Any, headers: tuple[tuple[str, str], ...] = (),
        rcvbuf: int | None = None,
    ) -> RawClient:  # fmt: skip
        """Connect to 127.0.0.1:``port`` and send the whole request."""
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
        try:
            await sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        client = cls(trio.SocketStream(sock))
        data = orjson.dumps(body)
        head = [("host", "127.0.0.1"), ("content-type", "application/json"),
                ("content-length", str(len(data))), *headers]  # fmt: skip
        h = client.h11
        request = h11.Request(method="POST", target=path, headers=head)
        await client.stream.send_all(
            h.send(request) + h.send(h11.Data(data=data)) + h.send(h11.EndOfMessage())
        )
        return client

    async def _next(self) -> Any:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(bytes(await self.stream.receive_some(65536)))
        return event

    async def start(self) -> int:
        """Wait for the response head; returns the status."""
        while self.status is None:
            event = await self._next()
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = {k.decode(): v.decode() for k, v in event.headers}
        return self.status

    async def next_event(self) -> SSEEvent | None:
        """The next SSE event of the body; ``None`` once the body has ended."""
        await self.start()
        while not self._events and not self.ended:
            event = await self._next()
            if isinstance(event, h11.Data):
                self.body += event.data
                self._events.extend(self.decoder.feed(bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self.ended = True
        return self._events.popleft() if self._events else None

    async def read_all(self) -> list[SSEEvent]:
        """Every remaining event, up to the end of the body."""
        events = []
        while (event := await self.next_event()) is not None:
            events.append(event)
        return events

    async def aclose(self) -> None:
        await self.stream.aclose()


class WaitableSink(RecordingSink):
    """A :class:`~trio_stream.RecordingSink` whose records can be awaited.

    Each record's ``trio.current_time()`` is kept in :attr:`times` (same
    index), so tests can order log lines against other trio timestamps
    (for example :class:`~tests.fakes.FakeUpstream` connection times).
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

    def stream(self, request: ChatRequest) -> AbstractAsyncContextManager[AsyncIterator[Item]]:
        return self._stream(request)

    @asynccontextmanager
    async def _stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[Item]]:
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


class ServeProcess:
    """A ``trio-stream serve`` subprocess, its port, and its stderr as lines."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.port = 0
        self.lines: list[str] = []
        self.eof = trio.Event()
        self._changed = trio.Event()

    async def _read_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        buf = b""
        while chunk := await stream.receive_some(65536):
            *done, buf = (buf + chunk).split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in done)
            self._changed.set()
            self._changed = trio.Event()
        if buf:
            self.lines.append(buf.decode(errors="replace"))
        self.eof.set()
        self._changed.set()

    async def wait_for_line(self, predicate: Callable[[str], bool]) -> str:
        """The first stderr line matching ``predicate`` (waits for it; fails at EOF)."""
        while True:
            for line in self.lines:
                if predicate(line):
                    return line
            if self.eof.is_set():
                raise AssertionError("no such line on stderr:\n" + "\n".join(self.lines))
            await self._changed.wait()

    def records(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log records (``--log-format json``), optionally only ``name``."""
        records = [orjson.loads(line) for line in self.lines if line.startswith("{")]
        return [r for r in records if name is None or r.get("event") == name]

    async def wait_exit(self) -> int:
        """Wait for the process to exit and for its stderr to be read to the end."""
        code = await self.process.wait()
        await self.eof.wait()
        return code


def _is_listening(line: str) -> bool:
    """The ``listening`` log line, in text or JSON format."""
    if line.startswith("{"):
        return bool(orjson.loads(line).get("event") == "listening")
    return line.startswith("listening ")


@asynccontextmanager
async def serve_process(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[ServeProcess]:
    """Run ``python -m trio_stream serve *args`` until its ``listening`` line.

    The child gets this environment minus every ``TRIO_STREAM_*`` variable,
    plus ``env``.  Call ``wait_exit()`` to read stderr to its end.  On exit the
    child is killed if it still runs, and always reaped.
    """
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_STREAM_")}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_stream", "serve", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**base, **(env or {})},
    )  # fmt: skip
    proc = ServeProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proc._read_stderr)
            line = await proc.wait_for_line(_is_listening)
            port = orjson.loads(line)["port"] if line.startswith("{") else line.split("port=")[1]
            proc.port = int(port)
            yield proc
            nursery.cancel_scope.cancel()  # stop reading; the test had what it waited for
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


def loopback_client(server: Server, **kw: Any) -> httpx.AsyncClient:
    """Like ``server.client()``, without loading the CA bundle (about 0.1 s per
    client here): plain HTTP to 127.0.0.1 needs no certificates."""
    return httpx.AsyncClient(base_url=server.url, timeout=30, verify=False, **kw)


# A real Redis for cluster mode (tests/redis_server.py).
# A real Postgres for the Postgres store (tests/postgres_server.py).
from tests.postgres_server import own_postgres, pg_url, postgres_server  # noqa: E402, F401
from tests.redis_server import own_redis, redis_server  # noqa: E402, F401
