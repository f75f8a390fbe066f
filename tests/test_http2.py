"""HTTP/2: h2c prior knowledge, h2c Upgrade, h2 by ALPN over TLS (docs/api.md section 3.8).

The client is :mod:`trio_stream.load.h2` (``h2`` driven directly), because
httpx's HTTP/2 sends no ``RST_STREAM`` when a response is closed early
(httpcore issue #943).  What a reset stream must do (cancel its run, close its
upstream request, never disturb the other streams of its connection) is tested
over h2c and TLS+h2 beside HTTP/1.1 in ``tests/test_streaming.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import orjson
import trio

from tests.conftest import running_server
from tests.protocols import client_context, with_tls
from trio_stream import Settings
from trio_stream.load.h2 import H2Connection, H2Stream, open_h2_connection
from trio_stream.upstream import mocktext
from trio_stream.wire.sse import SSEDecoder

CHAT = "/v1/chat/completions"
JSON_HEADERS = [("content-type", "application/json")]
SHORT = 30


def body(content: str, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens}


def expected(content: str, max_tokens: int) -> str:
    return mocktext.expected_text(body(content, max_tokens)["messages"], max_tokens)


async def post(conn: H2Connection, content: str, max_tokens: int) -> H2Stream:
    """Send one streaming request (its response is not awaited)."""
    return await conn.request("POST", CHAT, JSON_HEADERS, orjson.dumps(body(content, max_tokens)))


async def read_text(stream: H2Stream) -> tuple[str, str]:
    """The concatenated delta text of ``stream``, and its last event."""
    decoder = SSEDecoder()
    events = []
    while (chunk := await stream.receive()) is not None:
        events += decoder.feed(chunk)
    chunks = [orjson.loads(e.data) for e in events if e.data.startswith('{"id"')]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    return text, events[-1].data


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


async def test_tls_offers_h2_by_alpn_and_serves_a_stream(
    settings: Settings, tmp_path: Path
) -> None:
    """With --certfile/--keyfile the server negotiates ``h2`` by ALPN (from a
    client offering ``h2`` and ``http/1.1``) and serves a stream on it with
    the exact text.  (Resets, disconnects, stalls and shutdown over TLS+h2:
    ``tests/test_streaming.py``, ``tests/test_stall.py``,
    ``tests/test_shutdown.py``.)"""
    s = with_tls(settings, tmp_path).replace(mock_delay_ms=5)
    ctx = client_context("h2", "http/1.1")
    with trio.fail_after(10):
        async with running_server(s) as server:
            raw = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with trio.SSLStream(raw, ctx, server_hostname="127.0.0.1") as tls:
                await tls.do_handshake()
                assert tls.selected_alpn_protocol() == "h2"

            async with open_h2_connection("127.0.0.1", server.port, ctx) as conn:
                stream = await post(conn, "over TLS", SHORT)
                assert await stream.response() == 200
                assert await read_text(stream) == (expected("over TLS", SHORT), "[DONE]")
