"""HTTP/2: h2c prior knowledge, h2c Upgrade, h2 by ALPN over TLS (docs/api.md section 3.8).

The client is :mod:`trio_stream.load.h2` (``h2`` driven directly), because
httpx's HTTP/2 sends no ``RST_STREAM`` when a response is closed early
(httpcore issue #943).  A reset stream must cancel its run and close its
upstream request, and must never disturb the other streams of its connection.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import orjson
import trio
import trio.testing
import trustme

from tests.conftest import Server, running_server, tasks_living
from tools.fakes import FakeUpstream, mock_plan
from trio_stream import Settings
from trio_stream.load.h2 import H2Connection, H2Stream, open_h2_connection
from trio_stream.upstream import mocktext
from trio_stream.wire.sse import SSEDecoder

CHAT = "/v1/chat/completions"
JSON_HEADERS = [("content-type", "application/json")]
CLOSE_BOUND = 1.0  # generous: 10 resets close their upstreams in milliseconds
LONG = 1000  # tokens at 10 ms: only a cancellation ends such a stream in time
SHORT = 30


def body(content: str, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens}


def expected(content: str, max_tokens: int) -> str:
    return mocktext.expected_text(body(content, max_tokens)["messages"], max_tokens)


async def post(conn: H2Connection, content: str, max_tokens: int) -> H2Stream:
    """Send one streaming request (its response is not awaited)."""
    return await conn.request("POST", CHAT, JSON_HEADERS, orjson.dumps(body(content, max_tokens)))


async def read_text(stream: H2Stream, first: bytes = b"") -> tuple[str, str]:
    """The concatenated delta text of the rest of ``stream``, and its last event."""
    decoder = SSEDecoder()
    events = decoder.feed(first)
    while (chunk := await stream.receive()) is not None:
        events += decoder.feed(chunk)
    chunks = [orjson.loads(e.data) for e in events if e.data.startswith('{"id"')]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    return text, events[-1].data


def upstream_request_closed(fake: FakeUpstream, content: str) -> bool:
    """Has the upstream connection that carried ``content``'s request closed?"""
    for conn in fake.connections:
        if any(r["messages"][0]["content"] == content for r in conn.requests):
            return conn.closed is not None
    return False


async def settled(server: Server, fake: FakeUpstream) -> None:
    """No upstream response in progress (completed runs' connections may stay
    pooled, idle), no live run, no open client stream."""
    await fake.wait_for(lambda: fake.busy_connections == 0)
    await server.service.runs.wait_idle()
    await server.service.wait_streams_closed()


async def test_reset_ten_of_twenty_streams_on_one_connection(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """20 concurrent streams on one h2c (prior knowledge) connection; 10 are
    reset mid-stream.  Their runs are cancelled and their upstream requests
    close within milliseconds; the other 10 complete with the exact text; the
    connection still serves a new stream; no task is left."""
    fake_openai.plan = mock_plan("openai", 0.01)
    s = settings.replace(upstream="openai", upstream_url=fake_openai.url)
    with trio.fail_after(10):
        async with running_server(s) as server:
            baseline = await tasks_living()
            async with open_h2_connection("127.0.0.1", server.port) as conn:
                streams = []
                for i in range(20):
                    n = LONG if i % 2 == 0 else SHORT
                    streams.append((i, n, await post(conn, f"h2 stream {i}", n)))
                assert [await st.response() for _, _, st in streams] == [200] * 20
                firsts = {i: await st.receive() or b"" for i, _, st in streams}
                assert all(firsts.values())  # every stream is mid-stream

                reset_at = trio.current_time()
                for _, n, st in streams:
                    if n == LONG:
                        await st.reset()
                reset_contents = [f"h2 stream {i}" for i, n, _ in streams if n == LONG]
                await fake_openai.wait_for(
                    lambda: all(upstream_request_closed(fake_openai, c) for c in reset_contents)
                )
                assert trio.current_time() - reset_at < CLOSE_BOUND

                for i, n, st in streams:
                    if n == SHORT:
                        text, last = await read_text(st, firsts[i])
                        assert (text, last) == (expected(f"h2 stream {i}", n), "[DONE]")

                again = await post(conn, "after the resets", SHORT)
                assert await again.response() == 200
                assert await read_text(again) == (expected("after the resets", SHORT), "[DONE]")
            await settled(server, fake_openai)

            reset_ids = {st.headers["x-run-id"] for _, n, st in streams if n == LONG}
            cancelled = server.logs.events("stream_cancelled", reason="client_disconnect")
            assert {r["trace"] for r in cancelled} == reset_ids
            assert len(server.logs.events("stream_cancelled")) == 10
            assert len(server.logs.events("stream_end", status="completed")) == 11
            # Each idle pooled upstream connection is one handler task of the fake.
            assert await tasks_living() == baseline + fake_openai.open_connections


async def test_h2c_upgrade_serves_healthz(settings: Settings) -> None:
    """An HTTP/1.1 GET with ``Upgrade: h2c`` is answered 101, then over HTTP/2
    on stream 1 with the health body."""
    async with running_server(settings) as server:
        h2c = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        settings_header = h2c.initiate_upgrade_connection()
        assert settings_header is not None
        request = (
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: " + settings_header + b"\r\n\r\n"
        )
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(request)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(65536)
                head, _, rest = head.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                assert b"upgrade: h2c" in head.lower()
                await stream.send_all(h2c.data_to_send())

                status, data, ended = None, b"", False
                while not ended:
                    for event in h2c.receive_data(rest):
                        if isinstance(event, h2.events.ResponseReceived):
                            assert event.stream_id == 1
                            headers = {_text(k): _text(v) for k, v in event.headers or ()}
                            status = headers[":status"]
                        elif isinstance(event, h2.events.DataReceived):
                            data += event.data or b""
                        elif isinstance(event, h2.events.StreamEnded):
                            ended = event.stream_id == 1
                    await stream.send_all(h2c.data_to_send())
                    rest = b"" if ended else await stream.receive_some(65536)
                    assert ended or rest, "connection closed before the response ended"
        assert status == "200"
        assert orjson.loads(data) == {"status": "ok"}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _tls_files(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    return ca, certfile, keyfile


async def test_tls_offers_h2_by_alpn_and_a_reset_spares_its_sibling(
    settings: Settings, tmp_path: Path
) -> None:
    """With --certfile/--keyfile the server negotiates ``h2`` by ALPN; on that
    connection, resetting one stream cancels its run and leaves its sibling
    to finish with the exact text."""
    ca, certfile, keyfile = _tls_files(tmp_path)
    s = settings.replace(certfile=str(certfile), keyfile=str(keyfile), mock_delay_ms=5)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with trio.fail_after(10):
        async with running_server(s) as server:
            raw = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with trio.SSLStream(raw, ctx, server_hostname="127.0.0.1") as tls:
                await tls.do_handshake()
                assert tls.selected_alpn_protocol() == "h2"

            async with open_h2_connection("127.0.0.1", server.port, ctx) as conn:
                doomed = await post(conn, "reset me", LONG)
                sibling = await post(conn, "keep me", SHORT)
                assert (await doomed.response(), await sibling.response()) == (200, 200)
                assert await doomed.receive()
                await doomed.reset()
                assert await read_text(sibling) == (expected("keep me", SHORT), "[DONE]")
            await server.service.runs.wait_idle()
            doomed_id = doomed.headers["x-run-id"]
            assert server.logs.events("stream_cancelled", trace=doomed_id) == [
                {"event": "stream_cancelled", "trace": doomed_id, "reason": "client_disconnect"}
            ]
            assert server.logs.events("stream_end", trace=sibling.headers["x-run-id"])[0][
                "status"
            ] == ("completed")
