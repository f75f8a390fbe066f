"""A finished answer goes out whole: headers, events and terminal frame in one body.

When nothing has been sent yet and the run has already finished -- cleaned
up, so saved: a replay of a finished run -- the subscriber answers with a
``Content-Length`` and one body.  Nothing is held back for it: a run still
running or cleaning up streams as before.  The invariants:
it carries what a live stream carries (text, last id, finish), it is not
chunked, and it takes two socket writes (headers, body) instead of four.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from tests.conftest import running_server
from trio_stream import Settings
from trio_stream.http import transport
from trio_stream.wire.sse import SSEDecoder

BODY = {"messages": [{"role": "user", "content": "whole"}], "stream": True, "max_tokens": 10}


def text_and_end(raw: bytes) -> tuple[str, str | None, list[str]]:
    """The streamed text, the last event id, and the last two frames' data
    (finish chunk, ``[DONE]``).  Coalescing may group deltas differently."""
    evs = list(SSEDecoder().feed(raw))
    text = "".join(
        orjson.loads(e.data)["choices"][0]["delta"].get("content") or "" for e in evs[:-2]
    )
    ids = [e.id for e in evs if e.id]
    return text, ids[-1] if ids else None, [e.data for e in evs[-2:]]


async def test_a_replay_of_a_finished_run_is_one_body(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /v1/runs/{id}/events of a finished detached run answers 200 with a
    Content-Length (no chunked encoding) whose body carries the same text, the
    same last event id and the same finish chunk as the live stream, ending
    in [DONE]; it costs two socket writes."""
    writes: list[int] = []
    send_all = transport.GuardedStream.send_all

    async def counting(self: transport.GuardedStream, data: Any) -> None:
        if len(data):
            writes.append(len(data))
        await send_all(self, data)

    monkeypatch.setattr(transport.GuardedStream, "send_all", counting)
    with trio.fail_after(20):
        async with (
            running_server(settings.replace(mock_delay_ms=0)) as server,
            server.client() as client,
        ):
            live = await client.post("/v1/chat/completions", json={**BODY, "detach": True})
            run_id = live.headers["x-run-id"]
            await server.service.runs.runs[run_id].done.wait()
            writes.clear()
            replay = await client.get(f"/v1/runs/{run_id}/events")
            replay_writes = len(writes)
    assert replay.status_code == 200
    assert replay.headers["content-length"] == str(len(replay.content))
    assert "transfer-encoding" not in replay.headers
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert text_and_end(replay.content) == text_and_end(live.content)
    assert replay.text.endswith("data: [DONE]\n\n")
    assert replay_writes == 2
