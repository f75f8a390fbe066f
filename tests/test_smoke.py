"""End-to-end smoke tests against a real in-process server."""

from __future__ import annotations

import orjson

from tests.conftest import running_server
from trio_stream import Settings
from trio_stream.upstream import mocktext
from trio_stream.wire.sse import SSEDecoder

MESSAGES = [{"role": "user", "content": "hello"}]


async def test_stream_delivers_exact_mock_text(settings: Settings) -> None:
    """A client that stays gets every token, in order, then [DONE]."""
    async with running_server(settings) as server, server.client() as client:
        body = {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": 20}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            decoder = SSEDecoder()
            events = [
                e for chunk in [c async for c in r.aiter_bytes()] for e in decoder.feed(chunk)
            ]
    assert events[-1].data == "[DONE]"
    text = "".join(
        orjson.loads(e.data)["choices"][0]["delta"].get("content", "") for e in events[:-1]
    )
    assert text == mocktext.expected_text(MESSAGES, 20)
