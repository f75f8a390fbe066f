"""Every stream of an HTTP/2 connection closed by TCP is told (issue 18, item 4).

The cause, as found: hypercorn tells the streams of a closed connection in one
loop (``H2Protocol.handle(Closed())`` -> ``_close_stream`` -> ``app_put
({"type": "http.disconnect"})``), run by whichever task first finds the
connection gone.  Often that is a request task writing its response head into
the broken socket.  The disconnect that loop delivers to the task's *own*
stream wakes that stream's watcher, which cancels the request's nursery --
the very task running the loop -- and the next stream's ``app_put`` raised
``Cancelled``.  hypercorn had already taken that stream out of its table and
marked it closed, so no later close told it: its run went on pulling tokens
until ``--stall-timeout`` cut it as ``client_stalled``.  (Seen with an
instrumented ``HTTPStream.handle``: each stream left open was one whose
``StreamClosed`` handling raised ``Cancelled`` in ``app_put``, called from a
request task in ``Subscriber._start``.)  The fix: ``AppInbox.send`` delivers
``http.disconnect`` whatever the sending task, never raising ``Cancelled``.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import orjson
import pytest
import trio
import trio.testing
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from tests.conftest import running_server, tasks_living
from tests.protocols import client_context, serving
from trio_stream import Settings
from trio_stream.server.connection import AppInbox, LightTaskGroup

CHAT = "/v1/chat/completions"
CONNECTIONS = 5
STREAMS = 100  # per connection: the server's SETTINGS_MAX_CONCURRENT_STREAMS
TOKENS = 300
TOLD_BOUND = 5.0  # seconds for every run of the closed connections to end (real time)
ROUNDS = 2  # of the five connections: before the fix, one round left streams open 9 times in 11


async def open_streams_then_reset(port: int, k: int, ready: trio.Event, proto: str) -> None:
    """One HTTP/2 connection (h2c, or TLS with ALPN h2): STREAMS streaming chat
    completions, then -- as soon as the first response head arrives, while the
    server is writing the others' -- a TCP reset (``SO_LINGER`` 0), with the
    rest unread (over TLS without ``close_notify``)."""
    sock = trio.socket.socket()
    try:
        await sock.connect(("127.0.0.1", port))
        stream: trio.abc.Stream = trio.SocketStream(sock)
        if proto == "h2tls":
            stream = trio.SSLStream(stream, client_context(), server_hostname="127.0.0.1")
            await stream.do_handshake()
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        scheme = "https" if proto == "h2tls" else "http"
        for i in range(STREAMS):
            body = orjson.dumps({
                "model": "m", "messages": [{"role": "user", "content": f"c{k} s{i}"}],
                "stream": True, "max_tokens": TOKENS,
            })  # fmt: skip
            stream_id = client.get_next_available_stream_id()
            client.send_headers(stream_id, [
                (":method", "POST"), (":path", CHAT), (":scheme", scheme), (":authority", "x"),
                ("content-type", "application/json"), ("content-length", str(len(body))),
            ])  # fmt: skip
            client.send_data(stream_id, body, end_stream=True)
        await stream.send_all(client.data_to_send())
        await ready.wait()  # every connection's requests are on the wire
        headed = False
        while not headed:
            data = await stream.receive_some(65536)
            assert data, "the server closed first"
            events = client.receive_data(data)
            headed = any(isinstance(e, h2.events.ResponseReceived) for e in events)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


@pytest.mark.parametrize("proto", ["h2c", "h2tls"])
async def test_every_stream_of_five_reset_connections_ends_as_a_disconnect(
    tmp_path: Path, proto: str
) -> None:
    """Five HTTP/2 connections (h2c, or TLS+h2) with 100 streaming runs each (300 tokens 300 ms
    apart: a minute and a half each) are reset by the client while their
    response heads are being written, twice over.  Each time all 500 runs end
    at once (within TOLD_BOUND) as ``client_disconnect``, none as
    ``client_stalled``, and no task is left.  (Before the fix, a round of five
    connections left 2-5 of its 500 streams open in 9 runs of 11: their
    watchers were never told.)"""
    s = serving(Settings(port=0, db=str(tmp_path / "t.db"), mock_delay_ms=300), proto, tmp_path)
    async with running_server(s) as server:
        baseline = await tasks_living()
        for n in range(1, ROUNDS + 1):
            ready = trio.Event()
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for k in range(CONNECTIONS):
                        nursery.start_soon(open_streams_then_reset, server.port, k, ready, proto)
                    await trio.testing.wait_all_tasks_blocked()
                    ready.set()
            with trio.move_on_after(TOLD_BOUND):
                await server.service.wait_streams_closed()
                await server.service.runs.wait_idle()
            left = server.service.streams
            reasons = Counter(r["reason"] for r in server.logs.events("stream_cancelled"))
            assert (left, reasons) == (0, {"client_disconnect": n * CONNECTIONS * STREAMS})
        assert await tasks_living() == baseline


# -- the mechanism, in memory ----------------------------------------------------------


class Wire:
    """hypercorn's ``H2Protocol`` with our task group (so our ``AppInbox``),
    fed by an ``h2`` client in memory; every stream's app only waits for its
    ``http.disconnect`` and records it."""

    def __init__(self, task_group: TaskGroup) -> None:
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.client.initiate_connection()
        self.told: list[str] = []
        self.protocol = H2Protocol(
            ASGIWrapper(self.app), Config(), WorkerContext(None), task_group,
            ConnectionState({}), False, None, None, self._server_sends,
        )  # fmt: skip

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.told.append(scope["path"])

    async def _server_sends(self, event: Event) -> None:
        pass  # what the server writes does not matter here

    async def open(self, n: int) -> None:
        """Open ``n`` streams (``GET /<i>``); return once every app waits."""
        for i in range(n):
            headers = [(":method", "GET"), (":path", f"/{i}"), (":scheme", "http"),
                       (":authority", "x")]  # fmt: skip
            self.client.send_headers(self.client.get_next_available_stream_id(), headers,
                                     end_stream=True)  # fmt: skip
        await self.protocol.handle(RawData(data=self.client.data_to_send()))
        await trio.testing.wait_all_tasks_blocked()


async def test_a_cancelled_task_closing_the_connection_tells_every_stream() -> None:
    """``H2Protocol.handle(Closed())`` run by a task whose scope is already
    cancelled -- as a request task is once its own watcher has seen the
    disconnect -- still delivers ``http.disconnect`` to every one of the
    connection's streams, and ``Cancelled`` reaches the task only after.
    (Before the fix the first stream's delivery raised ``Cancelled``: that
    stream was marked closed and never told, and neither were the others.)"""
    with trio.fail_after(5):
        async with LightTaskGroup() as task_group:
            wire = Wire(task_group)
            await wire.protocol.initiate()
            await wire.open(5)
            assert len(wire.protocol.streams) == 5
            with trio.CancelScope() as scope:
                scope.cancel()
                await wire.protocol.handle(Closed())
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(wire.told) == [f"/{i}" for i in range(5)]
            assert wire.protocol.streams == {}


async def test_app_inbox_takes_a_disconnect_from_a_cancelled_task_and_when_full() -> None:
    """``AppInbox.send`` of ``http.disconnect`` neither raises ``Cancelled``
    nor waits: from a cancelled task it is delivered all the same, and an
    inbox already holding ``capacity`` messages queues it after them (one
    over capacity).  Any other message still waits for room and is
    cancellable (tests/test_idle_memory.py)."""
    inbox = AppInbox(1)
    await inbox.send({"type": "http.request", "body": b"x", "more_body": True})
    with trio.CancelScope() as scope:
        scope.cancel()
        await inbox.send({"type": "http.disconnect"})  # full, and cancelled
    assert not scope.cancelled_caught
    assert [(await inbox.receive())["type"] for _ in range(2)] == [
        "http.request",
        "http.disconnect",
    ]
    got: list[Any] = []

    async def receive() -> None:
        got.append(await inbox.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await inbox.send({"type": "http.disconnect"})  # straight to the waiting receiver
    assert got == [{"type": "http.disconnect"}]
