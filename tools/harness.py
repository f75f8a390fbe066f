"""A real server to drive from a test or a measurement: in process or as a
subprocess, a raw HTTP/1.1 client, and trio's live task count.

Shared by ``tests/`` (through ``tests/conftest.py``) and the ``tools/``
measurements, which do not import ``tests/``.
"""

from __future__ import annotations

import collections
import io
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import h11
import httpx
import orjson
import trio
import trio.testing

from trio_stream import EventLogger, RecordingSink, Service, Settings, open_service, serve_service
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


async def tasks_living() -> int:
    """trio's live task count once everything runnable has run."""
    await trio.testing.wait_all_tasks_blocked()
    return trio.lowlevel.current_statistics().tasks_living


def task_census() -> collections.Counter[str]:
    """The live tasks by name (the whole tree under trio's root task): what
    a test names when ``tasks_living`` is not back at its baseline."""
    census: collections.Counter[str] = collections.Counter()
    root = trio.lowlevel.current_root_task()
    assert root is not None  # inside trio.run
    pending = [root]
    while pending:
        task = pending.pop()
        census[task.name] += 1
        pending.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return census


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
