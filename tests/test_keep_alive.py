"""An idle HTTP/1.1 keep-alive connection is closed after the keep-alive timeout.

docs/api.md section 3.9: an idle keep-alive connection is closed after 5 s
(hypercorn's idle timer, ``keep_alive_timeout`` in
``server.hypercorn_config``).  hypercorn restarts that timer when a response
ends, from inside the app's last ``send()`` -- the task the app's disconnect
watcher cancels right then.  Its restart used to take that ``Cancelled``
halfway, so once a connection had served one request no timer ran any more
and the connection stayed open for ever (``connection.IdleTimer``).  Each
kind of last ``send()`` is tested: a Quart JSON route (quart-trio's
watcher), a ``stream: false`` completion and a streamed one (our watcher;
on plain HTTP/1.1 its chunks go out on the direct body path), over plain
TCP and TLS.

The server runs in-process on real loopback sockets with ``autojump_clock``
and an inline store (no threads), so the 5 s pass in virtual time and are
measured exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h11
import orjson
import pytest
import trio
import trio.testing
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import TrioSingleTask

from tests.conftest import running_server, tasks_living
from tests.protocols import client_context, with_tls
from trio_stream import Settings
from trio_stream.http import transport as transport_mod
from trio_stream.http.transport import DirectBody
from trio_stream.server.connection import IdleTimer
from trio_stream.server.serve import hypercorn_config
from trio_stream.store import open_store

CHAT = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "keep alive"}]
#: docs/api.md section 3.9.
KEEP_ALIVE = 5.0
#: How late after the keep-alive timeout the close may come (virtual time:
#: the close itself takes none; the margin is for scheduling only).
LATE = 0.01


def request(kind: str) -> tuple[h11.Request, bytes]:
    """One keep-alive HTTP/1.1 request of ``kind`` and its body."""
    if kind == "healthz":
        return h11.Request(method="GET", target="/healthz", headers=[("host", "x")]), b""
    body = orjson.dumps({"messages": PROMPT, "stream": kind == "stream", "max_tokens": 6})
    head = h11.Request(
        method="POST", target=CHAT,
        headers=[("host", "x"), ("content-type", "application/json"),
                 ("content-length", str(len(body)))],
    )  # fmt: skip
    return head, body


class Client:
    """One client connection (plain or TLS), speaking HTTP/1.1 through h11."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def _event(self) -> Any:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:  # TLS: the socket closed without close_notify
                data = b""
            self.h11.receive_data(bytes(data))
        return event

    async def exchange(self, kind: str) -> tuple[int, bytes]:
        """Send one request of ``kind``; read its whole response."""
        head, body = request(kind)
        out = self.h11.send(head) + (self.h11.send(h11.Data(data=body)) if body else b"")
        await self.stream.send_all(out + self.h11.send(h11.EndOfMessage()))
        response = await self._event()
        assert isinstance(response, h11.Response), response
        data = bytearray()
        while not isinstance(event := await self._event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            data += event.data
        self.h11.start_next_cycle()
        return response.status_code, bytes(data)

    async def wait_closed(self) -> None:
        """Wait for the server's close; a byte instead is an error."""
        event = await self._event()
        assert isinstance(event, h11.ConnectionClosed), event


def test_the_documented_keep_alive_timeout_is_configured() -> None:
    """The figure these tests hold the server to is the one it is given."""
    assert hypercorn_config(Settings()).keep_alive_timeout == KEEP_ALIVE


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("kind", ["healthz", "json", "stream"])
async def test_idle_keep_alive_connection_closes_after_every_response(
    kind: str, tls: bool, settings: Settings, tmp_path: Path,
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """After each response on an HTTP/1.1 keep-alive connection -- a Quart
    JSON route, a ``stream: false`` and a streamed completion, plain or TLS --
    the connection stays open for the next request, and once idle it is
    closed exactly ``keep_alive_timeout`` (5 s) after its last response ended,
    not before and not never.  On plain HTTP/1.1 the streamed answer's chunks
    went out on the direct body path."""
    direct_chunks = 0
    original = transport_mod.DirectBody.send

    async def counting(self: DirectBody, data: bytes) -> bool:
        nonlocal direct_chunks
        sent = await original(self, data)
        direct_chunks += sent
        return sent

    monkeypatch.setattr(transport_mod.DirectBody, "send", counting)
    context = None
    if tls:
        settings, context = with_tls(settings, tmp_path), client_context("http/1.1")
    store = open_store(settings.db, threaded=False)  # no thread: the clock may jump
    async with running_server(settings, store=store) as server:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        if context is not None:
            stream = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
        client = Client(stream)
        try:
            for _ in range(2):  # the second proves the first left it open
                status, body = await client.exchange(kind)
                assert status == 200, body
            if kind == "stream":
                assert body.endswith(b"data: [DONE]\n\n")
            ended = trio.current_time()
            with trio.fail_after(KEEP_ALIVE + 1):
                await client.wait_closed()
            idle = trio.current_time() - ended
        finally:
            await stream.aclose()
    assert KEEP_ALIVE <= idle < KEEP_ALIVE + LATE, idle
    if kind == "stream" and not tls:
        assert direct_chunks > 0
    else:
        assert direct_chunks == 0


@pytest.mark.parametrize("cls", [IdleTimer, TrioSingleTask], ids=["ours", "hypercorn"])
async def test_idle_timer_restarts_from_a_cancelled_task(cls: type[Any]) -> None:
    """The root cause: the timer's restart is called from a task whose scope
    the app's disconnect watcher has just cancelled.  ``IdleTimer.restart``
    starts the timer all the same (and is no checkpoint, so the caller's
    ``Cancelled`` comes at its own next checkpoint); hypercorn's
    ``TrioSingleTask.restart`` is cancelled at its first checkpoint and
    starts nothing -- the bug ``IdleTimer`` fixes."""
    timer = cls()
    fired = trio.Event()

    async def action() -> None:
        fired.set()
        await trio.sleep_forever()

    async with TaskGroup() as group:
        with trio.CancelScope() as scope:
            scope.cancel()
            await timer.restart(group, action)
        await trio.testing.wait_all_tasks_blocked()
        assert fired.is_set() is (cls is IdleTimer)
        assert scope.cancelled_caught is (cls is TrioSingleTask)
        await timer.stop()  # the group can close: the timer task ends


async def test_idle_timer_stop_before_the_timer_ran_cancels_it() -> None:
    """A timer stopped (or restarted) before its task first ran never runs
    its action: the scope is cancelled before the task enters it.  So a
    request head right after a response cannot be cut by the old timer."""
    timer = IdleTimer()
    ran: list[int] = []

    async def action(n: int) -> None:
        ran.append(n)
        await trio.sleep_forever()

    async with TaskGroup() as group:
        await timer.restart(group, lambda: action(1))
        await timer.restart(group, lambda: action(2))
        await timer.stop()
        await timer.restart(group, lambda: action(3))
        await trio.testing.wait_all_tasks_blocked()
        assert ran == [3]
        await timer.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("requests", [0, 1], ids=["silent", "after-a-response"])
async def test_connection_the_client_closes_is_released_at_once(
    requests: int, tls: bool, settings: Settings, tmp_path: Path
) -> None:
    """A connection the client closes while it is idle -- after a response,
    or before sending a byte -- is released at once: its connection task
    (and with it its socket) does not wait for the idle timer, which has
    nothing left to time.  hypercorn's task group waited for it, up to
    ``keep_alive_timeout``: a socket held 5 s for every client gone.  (Real
    clock: all tasks blocked must already mean "released".)"""
    context = None
    if tls:
        settings, context = with_tls(settings, tmp_path), client_context("http/1.1")
    with trio.fail_after(10):
        async with running_server(settings) as server:
            baseline = await tasks_living()
            stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            if context is not None:
                stream = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
                await stream.do_handshake()
            client = Client(stream)
            for _ in range(requests):
                assert (await client.exchange("healthz"))[0] == 200
            assert await tasks_living() > baseline  # the connection (and its timer)
            await stream.aclose()
            assert await tasks_living() == baseline
