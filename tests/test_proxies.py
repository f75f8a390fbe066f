"""trio-stream behind real reverse proxies: nginx and HAProxy, as deployed.

Every test runs the whole chain as separate processes on 127.0.0.1:

    client -> nginx | HAProxy -> trio-stream serve -> FakeUpstream

The fake upstream (OpenAI wire format) runs in the test process and records
when each upstream connection closes, so "the client left, so the upstream
request ended" is observed where it matters.

Two configurations of each proxy (see :mod:`tools.proxies`):

* **defaults** plus one ``proxy_pass`` line, over plain HTTP/1.1.  nginx's
  defaults speak HTTP/1.0 and ``Connection: close`` to trio-stream and buffer
  the response unless told not to: trio-stream must close the connection at
  the end of each response, and its ``X-Accel-Buffering: no`` must turn the
  buffering off.
* **production**: ``docs/deploy/nginx.conf`` and ``docs/deploy/haproxy.cfg``
  as shipped, with TLS and HTTP/2 at the edge and HTTP/1.1 keep-alive to
  trio-stream.

A missing nginx or HAProxy fails these tests (``make services`` installs
them); they are never skipped.
"""

from __future__ import annotations

import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import httpx
import orjson
import pytest
import trio

from tests.conftest import RawClient
from tools.fakes import Plan, mock_plan, token_plan
from tools.proxies import (
    PROXIES,
    Stack,
    Timeline,
    TLSFiles,
    chat,
    leave_mid_stream,
    open_stack,
    timed_stream,
    upstream_finished,
    upstream_request,
    wait_upstream_closed,
)
from trio_stream.load.h2 import open_h2_connection
from trio_stream.upstream import mocktext
from trio_stream.wire.sse import SSEDecoder

CHAT = "/v1/chat/completions"
GAP = 0.1  # seconds between two upstream tokens
TOKENS = 20  # a 2 s answer
RESUME_TOKENS = 10
LONG = 1000  # tokens: only a cancellation ends such a stream before the test does
PING = 0.5  # trio-stream's --ping-interval behind the default configs
END_BOUND = 1.0  # last token -> [DONE] -> end of the response, at the client
FIRST_BOUND = 1.0  # request -> first token at the client (the last leaves at 2 s)
CANCEL_BOUND = 1.0  # client gone -> upstream connection closed
SILENT = "silent"  # requests whose content starts so get no token at all


def plan(body: dict[str, Any]) -> Plan:
    """The mock's text at one token per ``GAP``; nothing at all for ``SILENT`` requests."""
    if body["messages"][0]["content"].startswith(SILENT):
        return token_plan(["never"], hang_after=0)
    return mock_plan("openai", GAP)(body)


def expected(content: str, max_tokens: int) -> str:
    return mocktext.expected_text(chat(content, max_tokens)["messages"], max_tokens)


# -- behind each proxy's defaults ---------------------------------------------


@pytest.fixture(params=PROXIES)
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    """nginx or HAProxy on its defaults, in front of trio-stream."""
    async with open_stack(tmp_path, request.param, plan, "--ping-interval", str(PING)) as s:
        yield s


async def test_default_proxy_stream_ends_promptly(stack: Stack) -> None:
    """Behind a proxy's defaults a stream ends: ``data: [DONE]`` and then the end
    of the response reach the client within ``END_BOUND`` of the upstream's
    last token.  Behind nginx's defaults (HTTP/1.0 upstream) the response ends
    only when trio-stream closes the connection, which it once never did."""
    with trio.fail_after(10):
        timeline, last_token = await timed_stream(stack, "ends", 5)
    assert timeline.last.data == "[DONE]"
    assert timeline.text == expected("ends", 5)
    assert timeline.end is not None
    assert timeline.done - last_token < END_BOUND
    assert timeline.end - last_token < END_BOUND


async def test_default_proxy_does_not_buffer_the_first_token(stack: Stack) -> None:
    """With the upstream sending a token every 100 ms for 2 s, the first token
    reaches the client within ``FIRST_BOUND``, long before the last one is
    produced: nginx's default buffering is off for trio-stream's streams
    (``X-Accel-Buffering: no``), and HAProxy does not buffer responses."""
    with trio.fail_after(10):
        timeline, last_token = await timed_stream(stack, "first", TOKENS)
    assert last_token - timeline.sent >= (TOKENS - 1) * GAP
    assert timeline.first_delta - timeline.sent < FIRST_BOUND
    assert timeline.text == expected("first", TOKENS)


async def test_default_proxy_client_leaving_mid_stream_cancels_upstream(stack: Stack) -> None:
    """A client that closes its connection to the proxy mid-answer ends the
    upstream request: the fake upstream's connection closes within
    ``CANCEL_BOUND``.  (The proxy drops its connection to trio-stream, which
    cancels the run.)"""
    with trio.fail_after(10):
        delay = await leave_mid_stream(stack, "leave", LONG)
    assert delay < CANCEL_BOUND


async def test_default_proxy_client_leaving_silent_upstream(stack: Stack) -> None:
    """A client that leaves while the upstream sends nothing still ends the
    upstream request.  nginx notices the close itself (within
    ``CANCEL_BOUND``).  HAProxy's defaults notice it only when a write to the
    client fails, so the bound is trio-stream's pings: the first reaches the
    gone client, the second fails -- ``2 * PING + CANCEL_BOUND``.  (The
    production config's ``option abortonclose`` removes that wait.)"""
    bound = 2 * PING + CANCEL_BOUND if stack.kind == "haproxy" else CANCEL_BOUND
    content = SILENT + "-leave"
    with trio.fail_after(10):
        client = await RawClient.post(stack.port, CHAT, chat(content, TOKENS))
        await upstream_request(stack.fake, content)
        left_at = trio.current_time()
        await client.aclose()
        closed = await wait_upstream_closed(stack.fake, content)
    assert closed - left_at < bound


async def test_default_proxy_connection_close_health_check(stack: Stack) -> None:
    """``GET /healthz`` with ``Connection: close`` through the proxy answers
    200 ``{"status": "ok"}`` and the connection is then closed (EOF within
    ``END_BOUND``), as a load balancer's health check expects."""
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    received = bytearray()
    with trio.fail_after(END_BOUND):
        stream = await trio.open_tcp_stream("127.0.0.1", stack.port)
        async with stream:
            await stream.send_all(request)
            while chunk := await stream.receive_some(65536):
                received += chunk
    response, body = parse_response(bytes(received))
    assert response.status_code == 200
    assert orjson.loads(body) == {"status": "ok"}


def parse_response(data: bytes) -> tuple[h11.Response, bytes]:
    """One complete HTTP/1.1 response, read up to the connection's close."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    response, body = None, b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert event is not h11.NEED_DATA, "the response was cut short"
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
    assert response is not None
    return response, body


# -- behind the production configs (docs/deploy/) -------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    return TLSFiles.issue(tmp_path / "tls")


@pytest.fixture(params=PROXIES)
async def edge(
    request: pytest.FixtureRequest, tmp_path: Path, tls: TLSFiles
) -> AsyncIterator[Stack]:
    """nginx or HAProxy on its ``docs/deploy/`` config, in front of trio-stream
    on its own defaults (a ping every 15 s)."""
    async with open_stack(tmp_path, request.param, plan, tls=tls) as s:
        yield s


def h2_client(stack: Stack, tls: TLSFiles) -> httpx.AsyncClient:
    """httpx over TLS, HTTP/2 by ALPN.  (Not for cancel tests: httpx's HTTP/2
    sends no ``RST_STREAM`` when a response is closed early.)"""
    return httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{stack.port}", http2=True, verify=tls.client_context(),
        timeout=10,
    )  # fmt: skip


async def read_httpx(response: httpx.Response, timeline: Timeline) -> None:
    """Read ``response`` to its end into ``timeline``."""
    decoder = SSEDecoder()
    async for chunk in response.aiter_bytes():
        timeline.add(decoder.feed(chunk))
    timeline.finish()


async def test_production_stream_over_h2(edge: Stack, tls: TLSFiles) -> None:
    """Over HTTP/2 and TLS through the production config, a stream arrives
    token by token (the first within ``FIRST_BOUND``; no bursts: at least
    three quarters of the gaps between tokens are over half the upstream's
    gap, where HAProxy without ``option http-no-delay`` sends three at a
    time) and ends with ``[DONE]`` and END_STREAM within ``END_BOUND`` of the
    upstream's last token."""
    content = "production"
    with trio.fail_after(10):
        async with h2_client(edge, tls) as client, trio.open_nursery() as nursery:
            finished: list[float] = []
            nursery.start_soon(stamp_finished, edge, content, finished)
            timeline = Timeline(sent=trio.current_time())
            async with client.stream("POST", CHAT, json=chat(content, TOKENS)) as response:
                assert (response.http_version, response.status_code) == ("HTTP/2", 200)
                await read_httpx(response, timeline)
    assert timeline.text == expected(content, TOKENS)
    assert timeline.last.data == "[DONE]"
    assert timeline.first_delta - timeline.sent < FIRST_BOUND
    gaps = [b - a for a, b in zip(timeline.delta_times, timeline.delta_times[1:], strict=False)]
    assert sum(gap > GAP / 2 for gap in gaps) >= 0.75 * len(gaps), statistics.quantiles(gaps)
    assert timeline.end is not None
    assert timeline.end - finished[0] < END_BOUND


async def stamp_finished(stack: Stack, content: str, into: list[float]) -> None:
    """Append when the upstream's last token for ``content`` left it."""
    into.append(await upstream_finished(stack.fake, content))


async def test_production_resume_with_last_event_id(edge: Stack, tls: TLSFiles) -> None:
    """A client reads part of a detached run over HTTP/2, loses its connection,
    and resumes on a new one with ``GET /v1/runs/{id}/events`` and
    ``Last-Event-ID``: the proxy passes the header, so it gets exactly the
    rest of the answer (no gap, no repeat), then ``[DONE]``."""
    content = "resume"
    with trio.fail_after(10):
        async with h2_client(edge, tls) as client:
            first = Timeline(sent=trio.current_time())
            body = chat(content, RESUME_TOKENS, detach=True)
            async with client.stream("POST", CHAT, json=body) as response:
                run_id = response.headers["x-run-id"]
                decoder = SSEDecoder()
                async for chunk in response.aiter_bytes():
                    first.add(decoder.feed(chunk))
                    if len(first.delta_times) >= 3:
                        break
        # The first connection is closed: the client left mid-answer.
        async with h2_client(edge, tls) as client:
            rest = Timeline(sent=trio.current_time())
            headers = {"last-event-id": first.last_delta_id}
            async with client.stream("GET", f"/v1/runs/{run_id}/events", headers=headers) as r:
                assert (r.http_version, r.status_code) == ("HTTP/2", 200)
                await read_httpx(r, rest)
    assert first.text + rest.text == expected(content, RESUME_TOKENS)
    assert rest.last.data == "[DONE]"


async def test_production_stop(edge: Stack, tls: TLSFiles) -> None:
    """``POST /v1/runs/{id}/cancel`` through the proxy, on the same HTTP/2
    connection as the run's stream, stops a detached run: 200 with reason
    ``stopped``, the stream ends with a ``stopped`` error event, and the
    upstream connection closes within ``CANCEL_BOUND``."""
    content = "stop"
    with trio.fail_after(10):
        async with h2_client(edge, tls) as client:
            timeline = Timeline(sent=trio.current_time())
            body = chat(content, LONG, detach=True)
            async with (
                client.stream("POST", CHAT, json=body) as response,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(read_httpx, response, timeline)
                await timeline.wait_deltas(1)
                stopped_at = trio.current_time()
                stop = await client.post(f"/v1/runs/{response.headers['x-run-id']}/cancel")
        closed = await wait_upstream_closed(edge.fake, content)
    assert (stop.status_code, stop.json()["reason"]) == (200, "stopped")
    error = orjson.loads(timeline.last.data)["error"]
    assert (error["type"], error["code"]) == ("stream_cancelled", "stopped")
    assert timeline.end is not None
    assert timeline.end - stopped_at < END_BOUND
    assert closed - stopped_at < CANCEL_BOUND


async def test_production_h2_reset_cancels_upstream(edge: Stack, tls: TLSFiles) -> None:
    """An HTTP/2 client that resets its stream (``RST_STREAM``) mid-answer
    ends the upstream request: the fake upstream's connection closes within
    ``CANCEL_BOUND``."""
    content = "reset"
    headers = [("content-type", "application/json")]
    with trio.fail_after(10):
        async with open_h2_connection("127.0.0.1", edge.port, tls.client_context("h2")) as conn:
            stream = await conn.request("POST", CHAT, headers, orjson.dumps(chat(content, LONG)))
            assert await stream.response() == 200
            assert await stream.receive()
            reset_at = trio.current_time()
            await stream.reset()
            closed = await wait_upstream_closed(edge.fake, content)
    assert closed - reset_at < CANCEL_BOUND


async def test_production_client_leaving_silent_upstream(edge: Stack, tls: TLSFiles) -> None:
    """A client that leaves before the first token (the upstream silent,
    trio-stream not yet pinging) ends the upstream request within
    ``CANCEL_BOUND``, whether it closes an HTTPS/1.1 connection (nginx
    notices by itself, HAProxy because of ``option abortonclose``) or its
    HTTP/2 connection."""
    with trio.fail_after(10):
        stream = await open_tls(edge.port, tls)
        try:
            await stream.send_all(post_bytes(CHAT, chat(SILENT + "-https", TOKENS)))
            await upstream_request(edge.fake, SILENT + "-https")
        finally:
            https_left = trio.current_time()
            await stream.aclose()
        https_closed = await wait_upstream_closed(edge.fake, SILENT + "-https")
        async with open_h2_connection("127.0.0.1", edge.port, tls.client_context("h2")) as conn:
            body = orjson.dumps(chat(SILENT + "-h2", TOKENS))
            await conn.request("POST", CHAT, [("content-type", "application/json")], body)
            await upstream_request(edge.fake, SILENT + "-h2")
            h2_left = trio.current_time()
        h2_closed = await wait_upstream_closed(edge.fake, SILENT + "-h2")
    assert https_closed - https_left < CANCEL_BOUND
    assert h2_closed - h2_left < CANCEL_BOUND


async def open_tls(port: int, tls: TLSFiles) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection to 127.0.0.1:``port`` that speaks HTTP/1.1."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, tls.client_context("http/1.1"), server_hostname="127.0.0.1")
    await stream.do_handshake()
    return stream


def post_bytes(path: str, body: dict[str, Any]) -> bytes:
    """A whole HTTP/1.1 POST of ``body`` as JSON."""
    data = orjson.dumps(body)
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "127.0.0.1"), ("content-type", "application/json"),
               ("content-length", str(len(data)))]  # fmt: skip
    head = conn.send(h11.Request(method="POST", target=path, headers=headers))
    return head + conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage())
