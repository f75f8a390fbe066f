"""OpenAI chat-completion encoding: SSE chunks, the final object, error events.

The hot path is :meth:`ChunkEncoder.render`.  Everything in a chunk except the
delta is the same for the whole run, so it is encoded once per run and each
event only pays for ``orjson.dumps`` of its text.  When a writer has fallen
behind and finds several content deltas queued, ``coalesce=True`` merges them
into one event whose ``id`` is the last sequence number it carries: no token
is dropped or reordered, and ``Last-Event-ID`` resumption stays exact.  With
``coalesce=False`` every delta is its own event, but a batch is still returned
as one ``bytes`` so it costs one ASGI send and one system call.

This module never imports trio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ..core.log import Entry, Outcome, RunLog, RunStatus, ToolDelta
from ..errors import INTERNAL_MESSAGE, error_body
from . import sse

_ROLE_DELTA = {"role": "assistant"}


def cancel_error(outcome: Outcome) -> tuple[str, str, str]:
    """``(type, code, message)`` of the error event for a run that ended early."""
    if outcome.status is RunStatus.FAILED:
        if outcome.reason == "internal_error":  # the run crashed: our fault, not the upstream's
            return "server_error", outcome.reason, outcome.message or INTERNAL_MESSAGE
        return "upstream_error", outcome.reason, outcome.message or "The upstream failed."
    message = outcome.message or f"The run was cancelled ({outcome.reason})."
    return "stream_cancelled", outcome.reason, message


class ChunkEncoder:
    """Encodes one run's deltas as ``chat.completion.chunk`` SSE events."""

    def __init__(self, completion_id: str, model: str, created: int, *, coalesce: bool) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = created
        self.coalesce = coalesce
        self._head = (
            b'{"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,'
            b'"choices":[{"index":0,"delta":'
            % (orjson.dumps(completion_id), created, orjson.dumps(model))
        )

    def _chunk(self, delta: bytes, finish: bytes = b"null") -> bytes:
        return self._head + delta + b',"finish_reason":' + finish + b"}]}"

    def _delta(self, entry: Entry, first: bool) -> bytes:
        if isinstance(entry, ToolDelta):
            return orjson.dumps({**_ROLE_DELTA, **entry.delta} if first else entry.delta)
        if first:
            return b'{"role":"assistant","content":' + orjson.dumps(entry) + b"}"
        return b'{"content":' + orjson.dumps(entry) + b"}"

    def render(self, entries: Sequence[Entry], first_seq: int) -> bytes:
        """SSE bytes for ``entries``, whose first item has sequence ``first_seq``."""
        out: list[bytes] = []
        seq = first_seq
        i, n = 0, len(entries)
        while i < n:
            entry = entries[i]
            j = i + 1
            if self.coalesce and isinstance(entry, str):
                while j < n and isinstance(entries[j], str):
                    j += 1
                if j - i > 1:
                    entry = "".join(entries[i:j])  # type: ignore[arg-type]
            last = seq + (j - i) - 1
            out.append(sse.event(self._chunk(self._delta(entry, seq == 1)), last))
            seq, i = last + 1, j
        return b"".join(out)

    def finish(self, reason: str, usage: dict[str, Any] | None = None) -> bytes:
        """The last chunk (empty delta with ``finish_reason``), the usage chunk
        if ``usage`` (``stream_options.include_usage``), and ``[DONE]``."""
        last = sse.event(self._chunk(b"{}", orjson.dumps(reason)))
        if usage is not None:
            last += sse.event(self.usage_chunk(usage))
        return last + sse.DONE

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        """The chunk with ``usage`` and empty ``choices`` (OpenAI's last chunk)."""
        return orjson.dumps(
            {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            }
        )

    def terminal(self, outcome: Outcome, usage: dict[str, Any] | None = None) -> bytes:
        """What ends the stream: finish chunk (and usage chunk) and ``[DONE]``,
        or one error event."""
        if outcome.status is RunStatus.COMPLETED:
            return self.finish(outcome.reason, usage)
        if outcome.error is not None:  # the upstream's own error, as it sent it
            return sse.event(orjson.dumps({"error": outcome.error}))
        return sse.event(error_body(*_reorder(cancel_error(outcome))))

    def completion(self, log: RunLog, usage: dict[str, Any] | None = None) -> bytes:
        """The ``chat.completion`` object for ``stream: false`` (with ``usage``)."""
        outcome = log.outcome
        assert outcome is not None
        assert outcome.status is RunStatus.COMPLETED
        message: dict[str, Any] = {"role": "assistant", "content": log.content}
        if calls := log.tool_calls:
            message["tool_calls"] = calls
            message["content"] = message["content"] or None
        return orjson.dumps(
            {
                "id": self.completion_id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": outcome.reason}],
                **({} if usage is None else {"usage": usage}),
            }
        )


def _reorder(t: tuple[str, str, str]) -> tuple[str, str, str]:
    type_, code, message = t
    return message, type_, code
