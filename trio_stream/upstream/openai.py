"""Any OpenAI-compatible server: ``POST {url}/chat/completions`` with SSE."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any

import httpx
import trio

from ..config import Settings
from ..protocol import ChatRequest
from ..sse import SSEDecoder
from . import Item
from ._http import get_json, make_client, map_errors, open_stream
from ._http import raw_chunks as _raw
from .wire import DONE, openai_items


class OpenAIUpstream:
    name = "openai"

    def __init__(self, settings: Settings) -> None:
        assert settings.upstream_url
        self.client = make_client(settings, settings.upstream_url, settings.upstream_api_key)

    def stream(self, request: ChatRequest) -> AbstractAsyncContextManager[AsyncIterator[Item]]:
        return self._stream(request)

    @asynccontextmanager
    async def _stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[Item]]:
        body = request.upstream_body()
        body["stream_options"] = {"include_usage": True}  # the last chunk carries usage
        async with (
            open_stream(self.client, "/chat/completions", body) as response,
            aclosing(_items(response)) as items,
        ):
            yield items

    async def models(self) -> list[dict[str, Any]]:
        body = await get_json(self.client, "/models")
        data = body.get("data") if isinstance(body, dict) else None
        return data if isinstance(data, list) else []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # no background work: httpx needs none

    async def aclose(self) -> None:
        await self.client.aclose()


async def _items(response: httpx.Response) -> AsyncGenerator[Item, None]:
    """Items until ``[DONE]``; then the body is read to its end (and ignored),
    so that a completed response leaves its connection reusable."""
    decoder = SSEDecoder()
    done = False
    with map_errors():
        async with aclosing(_raw(response)) as chunks:
            async for raw in chunks:
                for event in decoder.feed(raw):
                    if done or event.data == DONE:
                        done = True
                        continue
                    for item in openai_items(event.data):
                        yield item
