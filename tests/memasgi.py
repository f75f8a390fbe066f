"""Drive the ASGI app in memory: no sockets, so ``autojump_clock`` is safe.

With real sockets the autojump clock jumps whenever every task waits on the
kernel, so a 30 s stall timeout could fire while bytes are in flight.  Here a
"client" is a pair of memory channels and a ``send`` that we control:

* :meth:`MemoryClient.disconnect` delivers ``http.disconnect`` (TCP close or
  HTTP/2 ``RST_STREAM``, as hypercorn reports them);
* ``paused=True`` makes every body ``send`` block until :meth:`resume`,
  which is exactly what a client that stops reading looks like over HTTP/2
  (the app waits for flow-control credit, cancellably).
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio

from trio_stream import TrioStreamApp
from trio_stream.wire.sse import SSEDecoder, SSEEvent


@dataclass
class MemoryClient:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    finished: trio.Event = field(default_factory=trio.Event)  # app returned
    complete: bool = False  # more_body=False was sent
    paused: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)
    _resumed: trio.Event = field(default_factory=trio.Event)
    _to_app: trio.MemorySendChannel[dict[str, Any]] | None = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            while self.paused:
                await self._resumed.wait()
            self.body += message.get("body", b"")
            self.complete = not message.get("more_body", False)
        self._notify()

    async def disconnect(self) -> None:
        assert self._to_app is not None
        await self._to_app.send({"type": "http.disconnect"})

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()
        self._resumed = trio.Event()

    async def wait_until(self, predicate: Any) -> None:
        """Block until ``predicate(self)`` holds (checked after every send)."""
        while not predicate(self):
            await self._changed.wait()

    def events(self) -> list[SSEEvent]:
        return SSEDecoder().feed(bytes(self.body))

    def json(self) -> Any:
        return orjson.loads(bytes(self.body))

    def text(self) -> str:
        """The concatenated ``delta.content`` of every chunk event."""
        out = []
        for e in self.events():
            if e.data.startswith("{") and '"choices"' in e.data:
                out.append(orjson.loads(e.data)["choices"][0]["delta"].get("content") or "")
        return "".join(out)


def start_request(
    nursery: trio.Nursery,
    app: TrioStreamApp,
    method: str,
    path: str,
    *,
    json: Any = None,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    paused: bool = False,
) -> MemoryClient:
    """Start one request against ``app`` in ``nursery``; returns its client."""
    if json is not None:
        body = orjson.dumps(json)
    path, _, query = path.partition("?")
    client = MemoryClient(paused=paused)
    to_app, from_client = trio.open_memory_channel[dict[str, Any]](math.inf)
    client._to_app = to_app
    to_app.send_nowait({"type": "http.request", "body": body, "more_body": False})
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
        "root_path": "", "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "extensions": {},
    }  # fmt: skip

    async def run() -> None:
        try:
            await app(scope, from_client.receive, client._send)
        finally:
            client.finished.set()
            client._notify()

    nursery.start_soon(run)
    return client


Write = tuple[float, list[SSEEvent]]  # (virtual time of one body send, its events)


def stamp_writes(client: MemoryClient) -> list[Write]:
    """Record every non-empty body send of ``client`` with its time and events.

    Must be called right after :func:`start_request`, before the test next
    checkpoints (the app's task has not started, so it picks up this send).
    """
    writes: list[Write] = []
    decoder = SSEDecoder()
    inner = client._send

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            writes.append((trio.current_time(), decoder.feed(message["body"])))
        await inner(message)

    client._send = send  # type: ignore[method-assign]
    return writes
