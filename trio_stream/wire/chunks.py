"""OpenAI chat-completion encoding: SSE chunks, the final object, error events.

Every event is one upstream chunk as sent (:mod:`trio_stream.core.log`), with
``id``, ``created`` and ``model`` set to the run's.  The hot path is
:meth:`ChunkEncoder.render` of a text-only entry (a ``str``): everything in
its chunk but the text is the run's shape, encoded once per run, so each event
only pays for ``orjson.dumps`` of its text.  When a writer has fallen behind
and finds several entries queued, ``coalesce=True`` merges those that merge
exactly (:func:`~trio_stream.core.log.merge`) into one event whose ``id`` is
the last sequence number it carries: no token is dropped or reordered, and
``Last-Event-ID`` resumption stays exact.  With
``coalesce=False`` every delta is its own event, but a batch is still returned
as one ``bytes`` so it costs one ASGI send and one system call.

This module never imports trio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ..core.log import Chunk, Entry, Outcome, RunLog, RunStatus, merge, with_text
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


_SENTINEL = "\x00trio-stream-text\x00"
_SENTINEL_JSON = orjson.dumps(_SENTINEL)


class ChunkEncoder:
    """Encodes one run's entries as ``chat.completion.chunk`` SSE events.

    Each entry is the upstream's chunk (:mod:`trio_stream.core.log`) with
    ``id``, ``created`` and ``model`` set to the run's; the first event's
    delta gets ``"role": "assistant"`` when it has none (docs/api.md, "What
    trio-stream rewrites").  A ``str`` entry costs one ``orjson.dumps`` of its
    text between two byte strings made once per run (per shape).
    """

    # Slotted, and the two byte strings made by the first event that needs
    # them: every open stream's run holds an encoder, and an idle one has
    # rendered nothing yet (docs/design.md section 16).
    __slots__ = (
        "_head",
        "_ours",
        "_shape",
        "_text",
        "coalesce",
        "completion_id",
        "created",
        "model",
    )

    def __init__(self, completion_id: str, model: str, created: int, *, coalesce: bool) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = created
        self.coalesce = coalesce
        self._head: bytes | None = None
        self._ours: bytes | None = None
        self._shape: Chunk | None = None
        self._text: tuple[bytes, bytes] = (b"", b"")

    def _chunk(self, delta: bytes, finish: bytes = b"null") -> bytes:
        head = self._head
        if head is None:
            head = self._head = (
                b'{"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,'
                b'"choices":[{"index":0,"delta":'
                % (orjson.dumps(self.completion_id), self.created, orjson.dumps(self.model))
            )
        return head + delta + b',"finish_reason":' + finish + b"}]}"

    def _body(self, body: dict[str, Any]) -> bytes:
        ours = self._ours
        if ours is None:  # the rewritten keys, for a chunk body appended after them
            ours = self._ours = b'{"id":%s,"created":%d,"model":%s,' % (
                orjson.dumps(self.completion_id),
                self.created,
                orjson.dumps(self.model),
            )
        return ours + orjson.dumps(body)[1:]

    def _text_bytes(self, text: str, shape: Chunk | None, first: bool) -> bytes:
        if shape is None:
            if first:
                return self._chunk(b'{"role":"assistant","content":' + orjson.dumps(text) + b"}")
            return self._chunk(b'{"content":' + orjson.dumps(text) + b"}")
        if first:
            return self._entry_bytes(with_text(shape, text), True)
        if shape is not self._shape:
            prefix, _, suffix = self._body(with_text(shape, _SENTINEL)).partition(_SENTINEL_JSON)
            self._shape, self._text = shape, (prefix, suffix)
        prefix, suffix = self._text
        return prefix + orjson.dumps(text) + suffix

    def _entry_bytes(self, body: dict[str, Any], first: bool) -> bytes:
        if first and (choices := body.get("choices")):
            delta = choices[0].get("delta")
            if isinstance(delta, dict) and "role" not in delta:
                choice = {**choices[0], "delta": {**_ROLE_DELTA, **delta}}
                body = {**body, "choices": [choice]}
        return self._body(body)

    def render(self, entries: Sequence[Entry], first_seq: int, shape: Chunk | None = None) -> bytes:
        """SSE bytes for ``entries``, whose first item has sequence ``first_seq``;
        ``shape`` is the log's (:attr:`~trio_stream.core.log.RunLog.shape`).

        With ``coalesce``, consecutive entries that merge exactly
        (:func:`~trio_stream.core.log.merge`) go out as one event whose ``id``
        is the last sequence number it carries."""
        out: list[bytes] = []
        seq = first_seq
        i, n = 0, len(entries)
        while i < n:
            entry: Entry = entries[i]
            j = i + 1
            if self.coalesce:
                if isinstance(entry, str) or (entry is shape and shape is not None):
                    while j < n and isinstance(entries[j], str):
                        j += 1
                    if j - i > 1:
                        first_text = entry if isinstance(entry, str) else entry.text
                        entry = "".join([first_text or "", *entries[i + 1 : j]])  # type: ignore[list-item]
                else:
                    while j < n and (merged := merge(entry, entries[j], shape)) is not None:
                        entry, j = merged, j + 1
            last = seq + (j - i) - 1
            if isinstance(entry, str):
                data = self._text_bytes(entry, shape, seq == 1)
            else:
                data = self._entry_bytes(entry.body, seq == 1)
            out.append(sse.event(data, last))
            seq, i = last + 1, j
        return b"".join(out)

    def finish(self, reason: str, usage: dict[str, Any] | None = None) -> bytes:
        """trio-stream's own last chunk (empty delta with ``finish_reason``), the
        usage chunk if ``usage`` (``stream_options.include_usage``), and ``[DONE]``:
        the ending of a run whose upstream sent no finish chunk (the mock)."""
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

    def terminal(
        self, outcome: Outcome, usage: dict[str, Any] | None = None, log: RunLog | None = None
    ) -> bytes:
        """What ends the stream, or one error event for a run that did not complete.

        A completed run: trio-stream's finish chunk unless an entry carried
        the upstream's; then the upstream's chunks after its finish chunk
        (:attr:`~trio_stream.core.log.RunLog.tail`) as sent -- a usage-only one
        (``choices: []``) only for a client that asked for usage (``usage`` is
        not None); then, for such a client, trio-stream's usage chunk if
        nothing relayed carried a usage; then ``[DONE]``."""
        if outcome.status is not RunStatus.COMPLETED:
            if outcome.error is not None:  # the upstream's own error, as it sent it
                return sse.event(orjson.dumps({"error": outcome.error}))
            return sse.event(error_body(*_reorder(cancel_error(outcome))))
        if log is None or not log.finished:
            out = sse.event(self._chunk(b"{}", orjson.dumps(outcome.reason)))
        else:
            out = b""
        if log is not None and log.tail:
            # A usage-only chunk (``choices: []``) only for a client that
            # asked for usage: trio-stream may have asked for it itself.
            tail = [c for c in log.tail if usage is not None or c.body.get("choices")]
            out += b"".join(sse.event(self._body(chunk.body)) for chunk in tail)
        if usage is not None and (log is None or log.usage is None):
            out += sse.event(self.usage_chunk(usage))
        return out + sse.DONE

    def completion(self, log: RunLog, usage: dict[str, Any] | None = None) -> bytes:
        """The ``chat.completion`` object for ``stream: false``: what the stream
        carried, aggregated (:meth:`~trio_stream.core.log.RunLog.answer`)."""
        outcome = log.outcome
        assert outcome is not None
        assert outcome.status is RunStatus.COMPLETED
        answer = log.answer()
        choice = {
            "index": 0,
            "message": answer.message,
            "logprobs": answer.logprobs,
            "finish_reason": outcome.reason,
            **answer.choice_extra,
        }
        return orjson.dumps(
            {
                "id": self.completion_id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
                **answer.chunk_extra,
                **({} if usage is None else {"usage": usage}),
            }
        )


def _reorder(t: tuple[str, str, str]) -> tuple[str, str, str]:
    type_, code, message = t
    return message, type_, code
