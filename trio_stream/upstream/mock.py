"""The built-in mock upstream: no network, a deterministic reply (API.md section 5).

The text is :func:`trio_stream.mocktext.tokens`; the gap before each token is
``--mock-delay-ms``.  With a delay of 0 it still checkpoints once per token so
that a cancel lands between any two tokens.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any

import trio

from .. import mocktext
from ..protocol import ChatRequest
from . import Finish, Item


class MockUpstream:
    name = "mock"

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def stream(self, request: ChatRequest) -> AbstractAsyncContextManager[AsyncIterator[Item]]:
        return aclosing(self._items(request))

    async def _items(self, request: ChatRequest) -> AsyncGenerator[Item, None]:
        for token in mocktext.tokens(request.messages, request.max_tokens):
            if self.delay:
                await trio.sleep(self.delay)
            else:
                await trio.lowlevel.checkpoint()
            yield token
        yield Finish(mocktext.reply_length(request.max_tokens)[1])

    async def models(self) -> list[dict[str, Any]]:
        return [{"id": "mock", "object": "model", "created": 0, "owned_by": "trio-stream"}]

    async def aclose(self) -> None:
        pass
