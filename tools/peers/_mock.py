"""The mock reply every peer serves: the same text and SSE bytes as trio-stream's mock.

A request ``{"messages": [...], "max_tokens": n}`` is answered with the tokens
of :func:`trio_stream.upstream.mocktext.tokens`, one ``chat.completion.chunk`` event per
token (``id: 1`` upwards, the first delta carries ``"role": "assistant"``),
then a chunk with ``finish_reason`` and no id, then ``data: [DONE]``.  With
the same completion id and ``created``, the bytes are exactly those of
trio-stream with ``--no-coalesce`` (``tests/test_bench_peers.py`` checks it).

The peers differ only in the web stack around this: each writes one event
per token and waits ``--delay-ms`` (or checkpoints once, for 0) before each.

This module never imports an event loop.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from trio_stream.upstream import mocktext

DONE = b"data: [DONE]\n\n"


def parse_args(description: str) -> argparse.Namespace:
    """``--host``, ``--port`` and ``--delay-ms`` (default from ``PEER_DELAY_MS``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=float(os.environ.get("PEER_DELAY_MS", "0")),
        help="gap before each token in ms; 0 = as fast as possible (env PEER_DELAY_MS)",
    )
    return parser.parse_args()


def sse_event(data: bytes, event_id: int | None = None) -> bytes:
    """One SSE event: optional ``id:`` line, one ``data:`` line, blank line."""
    if event_id is None:
        return b"data: " + data + b"\n\n"
    return b"id: %d\ndata: %s\n\n" % (event_id, data)


@dataclass
class MockReply:
    """The reply to one request; ``chunk(i)`` is the JSON of token ``i``'s event."""

    tokens: list[str]
    finish_reason: str
    model: str = "mock"
    completion_id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_urlsafe(16))
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_body(cls, body: bytes | str | dict[str, Any]) -> MockReply:
        request = body if isinstance(body, dict) else orjson.loads(body)
        messages, max_tokens = request["messages"], request.get("max_tokens")
        return cls(
            list(mocktext.tokens(messages, max_tokens)),
            mocktext.reply_length(max_tokens)[1],
            model=request.get("model") or "mock",
        )

    def _chunk(self, delta: dict[str, str], finish_reason: str | None) -> bytes:
        return orjson.dumps(
            {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
        )

    def chunk(self, i: int) -> bytes:
        """Token ``i``'s chunk; its event id is ``i + 1``."""
        delta = {"content": self.tokens[i]}
        return self._chunk({"role": "assistant", **delta} if i == 0 else delta, None)

    def finish_chunk(self) -> bytes:
        return self._chunk({}, self.finish_reason)

    def event(self, i: int) -> bytes:
        return sse_event(self.chunk(i), i + 1)

    def tail(self) -> bytes:
        """The finish event and ``[DONE]``."""
        return sse_event(self.finish_chunk()) + DONE
