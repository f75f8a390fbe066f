"""Any OpenAI-compatible server: ``POST {url}/chat/completions`` with SSE.

The completion streams through :class:`~trio_stream.upstream.h1.Pool`; per
token: one socket read, one llhttp parse, :class:`~trio_stream.wire.sse.SSEDataDecoder`
and ``orjson`` on the event's bytes, in one async generator (:func:`_items`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any

import orjson
import trio

from ..config import Settings
from ..wire.request import ChatRequest
from ..wire.sse import SSEDataDecoder
from ._http import get_json, make_client, make_pool
from .base import UpstreamItem
from .h1 import Response
from .wire import DONE_BYTES, StreamState, openai_items


class OpenAIUpstream:
    name = "openai"

    def __init__(self, settings: Settings) -> None:
        assert settings.upstream_url
        self.client = make_client(settings, settings.upstream_url, settings.upstream_api_key)
        self.pool = make_pool(settings, settings.upstream_url, settings.upstream_api_key)

    def stream(
        self, request: ChatRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[UpstreamItem]]:
        return self._stream(request)

    @asynccontextmanager
    async def _stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[UpstreamItem]]:
        body = request.upstream_body()  # stream_options with include_usage: usage comes
        async with (
            self.pool.post(
                "/chat/completions", orjson.dumps(body), request.trace_headers
            ) as response,
            aclosing(_items(response)) as items,
        ):
            yield items

    async def models(self) -> list[dict[str, Any]]:
        """``GET /models``.  Cancellation: a checkpoint; a ``Cancelled`` leaves nothing behind."""
        body = await get_json(self.client, "/models")
        data = body.get("data") if isinstance(body, dict) else None
        return data if isinstance(data, list) else []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """No background work.  Cancellation: returns at once after ``started()``, without a
        checkpoint.
        """
        task_status.started()  # no background work: the pools need none

    async def aclose(self) -> None:
        """Close the pool, then the httpx client.  Cancellation: the pool's closes are shielded;
        the caller shields the whole with a deadline.
        """
        await self.pool.aclose()
        await self.client.aclose()


async def _items(response: Response) -> AsyncGenerator[UpstreamItem, None]:
    """Items until ``[DONE]``; then the body is read to its end (and ignored),
    so that a completed response leaves its connection reusable."""
    decoder = SSEDataDecoder()
    state = StreamState()
    done = False
    while raw := await response.read():
        for data in decoder.feed(raw):
            if done or data == DONE_BYTES:
                done = True
                continue
            for item in openai_items(data, state):
                yield item
