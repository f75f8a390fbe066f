"""The in-memory ASGI driver works with autojump_clock."""

from __future__ import annotations

import trio
import trio.testing

from tests.conftest import memory_app
from tests.memasgi import start_request
from trio_stream import Settings
from trio_stream.upstream import mocktext

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_slow_mock_completes_in_virtual_time(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A 20 ms/token mock stream of 50 tokens completes in ~1 s of virtual time,
    with exact text: time is virtual, the ordering is real."""
    async with memory_app(settings.replace(mock_delay_ms=20)) as (_, app):
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            body = {"messages": MESSAGES, "stream": True, "max_tokens": 50}
            client = start_request(nursery, app, "POST", "/v1/chat/completions", json=body)
            await client.finished.wait()
        assert client.status == 200
        assert client.text() == mocktext.expected_text(MESSAGES, 50)
        assert 1.0 <= trio.current_time() - t0 < 1.1
