"""Close when HTTP says so: HTTP/1.0 and ``Connection: close``, on every path.

After its response to an HTTP/1.0 request, or to an HTTP/1.1 request with
``Connection: close``, the server must close the connection.  A client that
reads an HTTP/1.0 response (no ``Content-Length``, no chunking) learns that
the body ended *only* from the EOF, and so does any client behind a proxy
that speaks HTTP/1.0 upstream: a server that answers and keeps the socket
open hangs them for ever.

hypercorn closes such a connection from inside the app's final ``send()``,
after delivering ``http.disconnect``; the app's disconnect watcher used to
cancel that close halfway (see ``trio_stream.server.serve.Connection``).  So every
route is tested here, streaming or not, success or error, because each has its
own watcher (ours, or quart-trio's) and its own last ``send()``.

Each test speaks raw bytes on a trio TCP socket to a real in-process server
on 127.0.0.1, reads until EOF under ``trio.fail_after`` and then checks that
the whole response arrived (h11 parses it) and that the EOF followed its last
byte within :data:`CLOSE_BOUND`.  Every close case runs in both forms,
HTTP/1.0 and HTTP/1.1 + ``Connection: close``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import h11
import orjson
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from tests.conftest import Server, loopback_client, running_server, waitable_server
from tools.fakes import FakeUpstream, Plan, Step, openai_chunk
from trio_stream import Settings
from trio_stream.server import serve as server_mod
from trio_stream.wire.sse import SSEDecoder, SSEEvent

CHAT = "/v1/chat/completions"
#: How long after a response's last byte its EOF may come.  The real figure is
#: well under a millisecond; the failure this guards against is "never".
CLOSE_BOUND = 1.0
#: The bound on a whole exchange (request sent -> EOF).
EXCHANGE_BOUND = 10.0
#: The two ways a client says "close after this response".
FORMS = ["http/1.0", "connection-close"]
KEY = "sk-close-test"


# -- raw exchanges ------------------------------------------------------------


def raw_request(
    form: str, method: str, target: str, body: bytes | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:  # fmt: skip
    """The request's bytes in ``form``: ``http/1.0``, ``connection-close`` or
    ``keep-alive`` (HTTP/1.1 with no ``Connection`` header)."""
    version = "HTTP/1.0" if form == "http/1.0" else "HTTP/1.1"
    lines = [f"{method} {target} {version}", "host: 127.0.0.1"]
    if form == "connection-close":
        lines.append("connection: close")
    if body is not None:
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (body or b"")


def chat(stream: bool, max_tokens: int = 5, **extra: Any) -> bytes:
    messages = [{"role": "user", "content": "close"}]
    body = {"messages": messages, "stream": stream, "max_tokens": max_tokens, **extra}
    return orjson.dumps(body)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def events(self) -> list[SSEEvent]:
        return SSEDecoder().feed(self.body)

    def error(self) -> dict[str, Any]:
        """The OpenAI error body's ``error`` object."""
        error = orjson.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return dict(error)


class RawConnection:
    """One client connection driven by hand: raw request bytes out, h11 in.

    h11 only writes HTTP/1.1 requests, so requests go out as raw bytes and a
    mirror request is fed to the h11 client state machine, which then parses
    the responses (chunked, ``Content-Length`` or read-until-close alike).
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.last_byte_at = 0.0
        self.eof_at: float | None = None

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, raw: bytes, method: str = "POST", *, close: bool = True) -> None:
        """Send one request; ``close=False`` for a keep-alive HTTP/1.1 one."""
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        mirror = [("host", "127.0.0.1"), *([("connection", "close")] if close else [])]
        self.h11.send(h11.Request(method=method, target="/", headers=mirror))
        self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(raw)

    async def _receive(self) -> None:
        data = await self.stream.receive_some(65536)
        now = trio.current_time()
        if data:
            self.last_byte_at = now
        elif self.eof_at is None:
            self.eof_at = now
        self.h11.receive_data(bytes(data))

    async def _event(self) -> Any:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            await self._receive()
        return event

    async def head(self) -> Response:
        """Wait for the response head (the body is read by :meth:`rest`)."""
        event = await self._event()
        assert isinstance(event, h11.Response), event
        headers = {k.decode(): v.decode() for k, v in event.headers}
        return Response(event.status_code, headers, b"")

    async def rest(self, response: Response) -> Response:
        """Read ``response``'s body to its end (as h11 frames it)."""
        body = bytearray()
        while not isinstance(event := await self._event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            body += event.data
        response.body = bytes(body)
        return response

    async def response(self) -> Response:
        return await self.rest(await self.head())

    async def eof(self) -> float:
        """Wait for the server's EOF after the response; returns how long after
        the response's last byte it came.  Any further byte is an error."""
        while self.eof_at is None:
            await self._receive()
        event = self.h11.next_event()
        assert isinstance(event, h11.ConnectionClosed), event
        return self.eof_at - self.last_byte_at

    async def aclose(self) -> None:
        await self.stream.aclose()


async def exchange(port: int, raw: bytes, method: str = "POST") -> Response:
    """Send ``raw`` on a new connection, read the whole response and the EOF
    (within :data:`EXCHANGE_BOUND`), and check the EOF came promptly."""
    conn = await RawConnection.open(port)
    try:
        with trio.fail_after(EXCHANGE_BOUND):
            await conn.send(raw, method)
            response = await conn.response()
            lag = await conn.eof()
    finally:
        await conn.aclose()
    assert lag < CLOSE_BOUND, f"EOF {lag:.3f} s after the last byte"
    return response


def assert_done(response: Response) -> None:
    """A streamed completion that ran to its end: chunks, then ``[DONE]``."""
    assert response.status == 200, response.body
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.events()
    assert events[-1].data == "[DONE]"
    assert any(e.data.startswith('{"id"') for e in events)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- streaming completions ----------------------------------------------------


async def test_http10_stream_gets_done_then_eof(settings: Settings) -> None:
    """An HTTP/1.0 streaming completion: the body (close-delimited, since
    HTTP/1.0 has no chunking) ends with ``[DONE]``, and the server closes the
    connection right after it -- for this client the EOF *is* the end of the
    body."""
    async with running_server(settings) as server:
        response = await exchange(server.port, raw_request("http/1.0", "POST", CHAT, chat(True)))
    assert_done(response)
    assert "transfer-encoding" not in response.headers


async def test_connection_close_stream_gets_done_then_eof(settings: Settings) -> None:
    """HTTP/1.1 + ``Connection: close``, streaming: ``[DONE]``, the chunked
    body's end, then EOF."""
    async with running_server(settings) as server:
        raw = raw_request("connection-close", "POST", CHAT, chat(True))
        response = await exchange(server.port, raw)
    assert_done(response)
    assert response.headers["connection"] == "close"


# -- JSON routes (quart-trio, or the raw endpoint's stream: false) -------------


@pytest.mark.parametrize("form", FORMS)
async def test_healthz_closes(form: str, settings: Settings) -> None:
    """``GET /healthz`` (a Quart route, with quart-trio's own disconnect
    watcher) answers 200 and closes."""
    async with running_server(settings) as server:
        response = await exchange(server.port, raw_request(form, "GET", "/healthz"), "GET")
    assert (response.status, orjson.loads(response.body)) == (200, {"status": "ok"})


@pytest.mark.parametrize("form", FORMS)
async def test_json_completion_closes(form: str, settings: Settings) -> None:
    """A ``stream: false`` completion (raw endpoint, one JSON answer) closes."""
    async with running_server(settings) as server:
        response = await exchange(server.port, raw_request(form, "POST", CHAT, chat(False)))
    assert response.status == 200
    assert orjson.loads(response.body)["object"] == "chat.completion"


@pytest.mark.parametrize("form", FORMS)
async def test_models_closes(form: str, settings: Settings) -> None:
    """``GET /v1/models`` (a Quart route that awaits the upstream) closes."""
    async with running_server(settings) as server:
        response = await exchange(server.port, raw_request(form, "GET", "/v1/models"), "GET")
    assert response.status == 200
    assert orjson.loads(response.body)["object"] == "list"


# -- errors ---------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
async def test_400_bad_json_closes(form: str, settings: Settings) -> None:
    """A 400 from the raw endpoint (the body is not JSON) closes."""
    async with running_server(settings) as server:
        response = await exchange(server.port, raw_request(form, "POST", CHAT, b"{not json"))
    assert response.status == 400
    assert response.error()["type"] == "invalid_request_error"


@pytest.mark.parametrize("form", FORMS)
async def test_404_unknown_path_closes(form: str, settings: Settings) -> None:
    """A 404 from Quart's router (through our HTTPException handler) closes."""
    async with running_server(settings) as server:
        response = await exchange(server.port, raw_request(form, "GET", "/nope"), "GET")
    assert (response.status, response.error()["code"]) == (404, "unknown_url")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path", [CHAT, "/v1/models"])
async def test_401_without_key_closes(form: str, path: str, settings: Settings) -> None:
    """A 401 (keys configured, none sent) closes, on the raw endpoint --
    refused before its body is read -- and on a Quart route."""
    async with running_server(settings.replace(api_keys=(KEY,))) as server:
        method, body = ("POST", chat(True)) if path == CHAT else ("GET", None)
        response = await exchange(server.port, raw_request(form, method, path, body), method)
    assert (response.status, response.error()["code"]) == (401, "invalid_api_key")


@pytest.mark.parametrize("form", FORMS)
async def test_502_upstream_refused_closes(form: str, settings: Settings) -> None:
    """A 502 (the upstream refuses the connection before the first token:
    the deferred head lets it be an HTTP error) closes."""
    upstream = settings.replace(
        upstream="openai", upstream_url=f"http://127.0.0.1:{closed_port()}/v1"
    )
    async with running_server(upstream) as server:
        response = await exchange(server.port, raw_request(form, "POST", CHAT, chat(True)))
    assert (response.status, response.error()["type"]) == (502, "upstream_error")


@pytest.mark.parametrize("form", FORMS)
async def test_503_while_shutting_down_closes(form: str, settings: Settings) -> None:
    """During the grace period a new stream gets 503, and that connection
    closes (one long stream is held open so the grace period lasts)."""
    draining = settings.replace(graceful_timeout=60)
    async with waitable_server(draining) as (server, logs), loopback_client(server) as client:
        body = orjson.loads(chat(True, max_tokens=100_000))
        async with client.stream("POST", CHAT, json=body) as held:
            assert held.status_code == 200
            server.shutdown.set()
            await logs.wait_for("shutdown_start")
            response = await exchange(server.port, raw_request(form, "POST", CHAT, chat(True)))
    assert (response.status, response.error()["code"]) == (503, "shutting_down")


# -- streams cut early ----------------------------------------------------------


async def cancel_run(server: Server, run_id: str) -> None:
    async with loopback_client(server) as client:
        r = await client.post(f"/v1/runs/{run_id}/cancel")
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("form", FORMS)
async def test_stream_stopped_midway_gets_error_event_then_eof(
    form: str, settings: Settings
) -> None:
    """A stream cut by ``POST /v1/runs/{id}/cancel`` after its first token:
    the client gets the ``stopped`` error event, and then the EOF."""
    async with running_server(settings) as server:
        conn = await RawConnection.open(server.port)
        try:
            with trio.fail_after(EXCHANGE_BOUND):
                await conn.send(raw_request(form, "POST", CHAT, chat(True, max_tokens=100_000)))
                response = await conn.head()
                assert response.status == 200
                await cancel_run(server, response.headers["x-run-id"])
                await conn.rest(response)
                lag = await conn.eof()
        finally:
            await conn.aclose()
    assert lag < CLOSE_BOUND
    last = orjson.loads(response.events()[-1].data)["error"]
    assert (last["type"], last["code"]) == ("stream_cancelled", "stopped")


def fails_midway(body: dict[str, Any]) -> Plan:
    """Three tokens, then the upstream drops the connection."""
    steps = [Step(openai_chunk(t)) for t in ("one ", "two ", "three ")]
    return Plan(steps=[*steps, Step(drop=True)])


@pytest.mark.parametrize("form", FORMS)
async def test_upstream_error_midway_gets_error_event_then_eof(
    form: str, settings: Settings, nursery: trio.Nursery
) -> None:
    """A stream whose upstream fails after some tokens: the client gets the
    tokens, the ``upstream_error`` event, and then the EOF."""
    fake = FakeUpstream("openai", fails_midway)
    await nursery.start(fake.serve)
    upstream = settings.replace(upstream="openai", upstream_url=fake.url)
    async with running_server(upstream) as server:
        response = await exchange(server.port, raw_request(form, "POST", CHAT, chat(True)))
    assert response.status == 200
    events = response.events()
    assert orjson.loads(events[-1].data)["error"]["type"] == "upstream_error"
    assert "[DONE]" not in {e.data for e in events}


# -- keep-alive stays as it is ----------------------------------------------------


async def test_keep_alive_connection_serves_three_requests(settings: Settings) -> None:
    """HTTP/1.1 without ``Connection: close`` keeps the connection: a streamed
    completion, a JSON completion and ``/healthz`` are all answered on one
    socket.  Each answer after the first proves the previous response did not
    close it -- no waiting for an EOF that must not come."""
    async with running_server(settings) as server:
        conn = await RawConnection.open(server.port)
        try:
            with trio.fail_after(EXCHANGE_BOUND):
                await conn.send(raw_request("keep-alive", "POST", CHAT, chat(True)), close=False)
                streamed = await conn.response()
                await conn.send(raw_request("keep-alive", "POST", CHAT, chat(False)), close=False)
                whole = await conn.response()
                await conn.send(raw_request("keep-alive", "GET", "/healthz"), "GET", close=False)
                health = await conn.response()
        finally:
            await conn.aclose()
    assert_done(streamed)
    assert "connection" not in streamed.headers
    assert orjson.loads(whole.body)["object"] == "chat.completion"
    assert health.status == 200
    assert conn.eof_at is None  # no EOF was ever read


# -- the root cause --------------------------------------------------------------


def connection(cls: type[TCPServer], stream: trio.SocketStream) -> TCPServer:
    """A hypercorn per-connection server around ``stream`` (not run)."""
    app: Any = None  # _close never touches the app
    return cls(app, Config(), WorkerContext(None), ConnectionState({}), stream)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [server_mod.Connection, TCPServer], ids=["ours", "hypercorn"])
async def test_close_from_a_cancelled_task(cls: type[TCPServer]) -> None:
    """``Connection._close`` closes the socket even when called from a task
    whose scope is already cancelled -- which is where hypercorn calls it from
    when the app's disconnect watcher has just cancelled the app's nursery.
    hypercorn's own ``TCPServer._close`` is cancelled at ``send_eof``'s first
    checkpoint and leaves the socket open: the bug ``Connection`` fixes."""
    mine, peer = socket.socketpair()
    ours = trio.socket.from_stdlib_socket(mine)
    server = connection(cls, trio.SocketStream(ours))
    with trio.CancelScope() as scope:
        scope.cancel()
        await server._close()
    with peer:
        peer.setblocking(False)
        if cls is server_mod.Connection:
            assert not scope.cancelled_caught  # the shield hid the cancel
            assert ours.fileno() == -1
            assert peer.recv(1) == b""  # FIN
        else:
            assert scope.cancelled_caught
            assert ours.fileno() != -1
            with pytest.raises(BlockingIOError):
                peer.recv(1)  # no FIN: the connection is still open
            ours.close()


async def test_plain_tcpserver_leaves_http10_open(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through the whole stack: with hypercorn's plain ``TCPServer``
    in place of ``Connection``, an HTTP/1.0 stream gets ``[DONE]`` and then no
    EOF -- the client would wait for ever.  (Proves the tests above can fail.)"""
    monkeypatch.setattr(server_mod, "Connection", TCPServer)
    async with running_server(settings) as server:
        conn = await RawConnection.open(server.port)
        try:
            with trio.fail_after(EXCHANGE_BOUND):
                await conn.send(raw_request("http/1.0", "POST", CHAT, chat(True)))
                head = await conn.head()
                body = bytearray()
                while b"data: [DONE]\n\n" not in body:
                    event = await conn._event()
                    assert isinstance(event, h11.Data), event
                    body += event.data
            with trio.move_on_after(CLOSE_BOUND):
                await conn._receive()
                raise AssertionError("the plain TCPServer closed the connection")
        finally:
            await conn.aclose()
    assert head.status == 200
