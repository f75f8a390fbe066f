"""The upstream seam: the types every adapter speaks (sans transport).

An :class:`Upstream` turns a :class:`~trio_stream.wire.request.ChatRequest` into an
async iterator of log entries (one per upstream chunk: a text-only ``str`` or
a :class:`~trio_stream.core.log.Chunk`, see :mod:`trio_stream.core.log`) ended by one
:class:`Finish`, with the upstream's token counts as a :class:`Usage` item
wherever it reports them (before or after the ``Finish``), and, before its
first entry, at most one :class:`ResponseModel`: the model the upstream
says answered (never after the first entry: the run's reader,
:mod:`trio_stream.runs.routes`, takes it out of what it reads up to the first
entry, so the reader's per-token loop never sees one).  Every adapter
translates its transport's errors into
:class:`~trio_stream.errors.UpstreamError` at this seam; ``trio.Cancelled``
passes through untouched.

Cancellation contract of :meth:`Upstream.stream`: the context manager owns the
upstream connection.  Leaving it by an exception or by ``Cancelled``, or
before the body's end, closes the connection before ``__aexit__`` returns
(:class:`~trio_stream.upstream.h1.Pool` closes it in a shielded block with a
deadline, and re-raises), so a cancelled run never leaves a connection
behind; only a response read to its end goes back to the keep-alive pool.
Timeouts between items are the caller's (:mod:`trio_stream.runs.manager`), not the
adapter's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..core.log import Entry
from ..wire.request import ChatRequest
from ..wire.usage import Usage


@dataclass(frozen=True, slots=True)
class Finish:
    """The upstream's last word: ``finish_reason`` (``stop``, ``length``, ...)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ResponseModel:
    """The model the upstream says is answering (its first chunk's
    ``model``, Ollama's first line's): ``gen_ai.response.model`` in traces.
    Yielded at most once, before the first entry."""

    name: str


#: What the run's reader gets (after :mod:`trio_stream.runs.routes`).
Item = Entry | Finish | Usage
#: What an adapter yields: an :data:`Item`, or one :class:`ResponseModel` first.
UpstreamItem = Item | ResponseModel


class Upstream(Protocol):
    name: str

    def stream(
        self, request: ChatRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[UpstreamItem]]:
        """Open one completion.  See the module docstring for cancellation."""
        ...

    async def models(self) -> list[dict[str, Any]]:
        """The upstream's models in the OpenAI ``model`` object shape.

        Cancellation: cancellable while it waits on the upstream; a ``Cancelled`` leaves nothing
        behind.
        """
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Background work the upstream needs (the mock's timer), in the
        service's nursery; returns at once after ``started()`` if none.

        Cancellation: runs until cancelled (or returns at once); a ``Cancelled`` leaves nothing
        behind.
        """
        ...

    async def aclose(self) -> None:
        """Close the upstream's connections and clients.  Cancellation: the caller shields it with
        a deadline (``open_service``).
        """
