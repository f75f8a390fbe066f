"""The OpenAI Responses API at the seam -- sans-IO (docs/api.md section 8).

Upstreams speak chat completions, and a response is a run like any other
(:mod:`trio_stream.runs.manager`).  This module translates at the two ends:

* **In**: a ``POST /v1/responses`` body becomes a
  :class:`~trio_stream.wire.request.ChatRequest` (``instructions`` a system
  message first, ``input`` the messages, ``max_output_tokens`` the
  ``max_tokens``, ``background`` the detach flag) plus the
  :class:`ResponseMeta` that rendering needs.
* **Out**: a run's log and outcome become the ``response`` object and its
  stream events.

Sequence numbers are a pure function of the run's log, so that any event can
be replayed from its number (``GET /v1/responses/{id}?stream=true&starting_after=N``)::

    0 response.created   1 response.in_progress
    2 response.output_item.added   3 response.content_part.added
    n + 3              response.output_text.delta of log entry n (n >= 1)
    L + 4 ...          the trailing events, after the last entry L:
                       completed or incomplete: output_text.done,
                       content_part.done, output_item.done, then
                       response.completed | response.incomplete;
                       failed: response.failed; cancelled: error.

Each log entry is one delta event (never coalesced), so the mapping holds
however a subscriber was batched.  The SSE ``id:`` is the sequence number.

This module never imports trio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..core.log import Entry, Outcome, RunStatus
from ..errors import bad_request
from .request import ChatRequest, _field, parse_json_object

#: Events before the first delta: created, in_progress, output_item.added,
#: content_part.added (sequence numbers 0 to 3).
PREAMBLE = 4
_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
#: Fields that would change the answer and are not served: refused, not ignored.
_UNSUPPORTED = ("previous_response_id", "conversation", "prompt", "tools")


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What a response object shows of its request."""

    model: str
    instructions: str | None = None
    max_output_tokens: int | None = None
    background: bool = False
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None


# -- in ---------------------------------------------------------------------
def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A Responses message content as chat content: text parts joined into
    one string; with an image, a list of chat parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"'{where}.content' must be a string or an array.", "invalid_type")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image = {"url": part["image_url"], "detail": part.get("detail") or "auto"}
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise bad_request(
                f"'{where}.content[{i}]' must be an input_text, output_text or input_image "
                "part with an image_url.",
                "unsupported_content",
            )
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _messages(input_: Any) -> list[dict[str, Any]]:
    if input_ is None:
        raise bad_request("'input' is required.", "missing_required_parameter")
    if isinstance(input_, str):
        return [{"role": "user", "content": input_}]
    if not isinstance(input_, list) or not input_:
        raise bad_request("'input' must be a string or a non-empty array.", "invalid_type")
    messages = []
    for i, item in enumerate(input_):
        where = f"input[{i}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise bad_request(f"'{where}' must be a message (other items are not served).",
                              "unsupported_input")  # fmt: skip
        role = item.get("role")
        if role not in _ROLES:
            raise bad_request(f"'{where}.role' must be one of {sorted(_ROLES)}.", "invalid_type")
        messages.append({"role": role, "content": _content(item.get("content"), where)})
    return messages


def parse_responses_request(raw: bytes) -> tuple[ChatRequest, ResponseMeta]:
    """Validate a ``POST /v1/responses`` body; the chat request to run and
    what the response object shows.  Unknown fields are ignored, not sent on."""
    body = parse_json_object(raw)
    for name in _UNSUPPORTED:
        if body.get(name):
            raise bad_request(f"'{name}' is not supported by this server.", "unsupported_parameter")
    model = _field(body, "model", str, "a string") or "mock"
    instructions = _field(body, "instructions", str, "a string")
    messages = _messages(body.get("input"))
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    stream = _field(body, "stream", bool, "a boolean") or False
    background = _field(body, "background", bool, "a boolean") or False
    store = _field(body, "store", bool, "a boolean")
    if background and store is False:
        raise bad_request("'background' requires 'store' to be true.", "invalid_value")
    limit = _field(body, "max_output_tokens", int, "an integer")
    if limit is not None and not 1 <= limit <= 1_000_000:
        raise bad_request("'max_output_tokens' must be between 1 and 1000000.", "invalid_value")
    temperature = _field(body, "temperature", (int, float), "a number")
    top_p = _field(body, "top_p", (int, float), "a number")
    chat: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    for name, value in (("max_tokens", limit), ("temperature", temperature), ("top_p", top_p)):
        if value is not None:
            chat[name] = value
    meta = ResponseMeta(model, instructions, limit, background, store is not False,
                        temperature, top_p)  # fmt: skip
    return ChatRequest(chat, model, messages, stream, limit, background), meta


# -- out: the response object ----------------------------------------------
def item_id(response_id: str) -> str:
    """The id of a response's one output message."""
    return "msg_" + response_id.removeprefix("resp_")


def status_of(outcome: Outcome | None, deltas: int, background: bool) -> str:
    """The response ``status``: ``queued`` (a background response with no
    delta yet), ``in_progress``, or how it ended."""
    if outcome is None:
        return "queued" if background and deltas == 0 else "in_progress"
    if outcome.status is RunStatus.COMPLETED:
        return "incomplete" if outcome.reason == "length" else "completed"
    return "cancelled" if outcome.status is RunStatus.CANCELLED else "failed"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(response_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message", "id": item_id(response_id), "role": "assistant", "status": status,
        "content": [_text_part(text)],
    }  # fmt: skip


def _item_status(status: str) -> str:
    return {"queued": "in_progress", "in_progress": "in_progress", "completed": "completed"}.get(
        status, "incomplete"
    )


@dataclass(frozen=True, slots=True)
class ResponseState:
    """What the response object shows of a run at one moment."""

    id: str
    meta: ResponseMeta
    created: float
    content: str
    deltas: int
    outcome: Outcome | None
    usage: dict[str, Any] | None  # the Responses ``usage`` (None while running)
    status: str | None = None  # overrides status_of (a row or a remote record)


def response_object(s: ResponseState) -> dict[str, Any]:
    """The ``response`` object (``GET /v1/responses/{id}``, the events)."""
    status = s.status or status_of(s.outcome, s.deltas, s.meta.background)
    started = s.deltas > 0 or status in ("completed", "incomplete")
    output = [_message(s.id, s.content, _item_status(status))] if started else []
    error = None
    if status == "failed":
        message = s.outcome.message if s.outcome is not None else ""
        error = {"code": "server_error", "message": message or "The upstream failed."}
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": s.id,
        "object": "response",
        "created_at": int(s.created),
        "status": status,
        "background": s.meta.background,
        "model": s.meta.model,
        "instructions": s.meta.instructions,
        "max_output_tokens": s.meta.max_output_tokens,
        "output": output,
        "error": error,
        "incomplete_details": incomplete,
        "usage": s.usage,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "temperature": s.meta.temperature,
        "top_p": s.meta.top_p,
        "metadata": {},
    }


# -- out: the events ---------------------------------------------------------
def _event(kind: str, seq: int, fields: dict[str, Any]) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": seq, **fields})
    return b"event: %s\nid: %d\ndata: %s\n\n" % (kind.encode(), seq, data)


def log_cursor(starting_after: int) -> int:
    """The run-log cursor of a replay after sequence number ``starting_after``
    (-1: from the start): the deltas numbered above it."""
    return max(0, starting_after - (PREAMBLE - 1))


class ResponseEvents:
    """Renders one subscriber's events of one response, skipping those at or
    below ``starting_after``."""

    def __init__(self, response_id: str, meta: ResponseMeta, created: float,
                 starting_after: int = -1) -> None:  # fmt: skip
        self.id = response_id
        self.meta = meta
        self.created = created
        self.after = starting_after
        self._item = item_id(response_id)

    def _state(self, **kw: Any) -> dict[str, Any]:
        kw.setdefault("content", "")
        kw.setdefault("deltas", 0)
        kw.setdefault("outcome", None)
        kw.setdefault("usage", None)
        return response_object(ResponseState(self.id, self.meta, self.created, **kw))

    def _part(self, seq: int, kind: str, **fields: Any) -> bytes:
        where = {"item_id": self._item, "output_index": 0, "content_index": 0}
        return _event(kind, seq, {**where, **fields}) if seq > self.after else b""

    def preamble(self) -> bytes:
        """Events 0-3 (those after ``starting_after``)."""
        out = []
        if self.after < 0:
            created = self._state(status="queued" if self.meta.background else "in_progress")
            out.append(_event("response.created", 0, {"response": created}))
        if self.after < 1:
            progress = self._state(status="in_progress")
            out.append(_event("response.in_progress", 1, {"response": progress}))
        if self.after < 2:
            item = {**_message(self.id, "", "in_progress"), "content": []}
            out.append(_event("response.output_item.added", 2, {"output_index": 0, "item": item}))
        out.append(self._part(3, "response.content_part.added", part=_text_part("")))
        return b"".join(out)

    def deltas(self, entries: Sequence[Entry], first_seq: int) -> bytes:
        """One ``response.output_text.delta`` per entry with non-empty content
        (log seq ``n`` is sequence number ``n + 3``); any other entry keeps its
        number, unsent."""
        out = []
        for n, entry in enumerate(entries, first_seq):
            text = entry if isinstance(entry, str) else entry.delta.get("content")
            if isinstance(text, str) and text:
                out.append(self._part(n + PREAMBLE - 1, "response.output_text.delta",
                                      delta=text, logprobs=[]))  # fmt: skip
        return b"".join(out)

    def trailing(self, content: str, deltas: int, outcome: Outcome, usage: dict[str, Any]) -> bytes:
        """The events after the last delta (``deltas`` of them in the log)."""
        seq = deltas + PREAMBLE
        final = self._state(content=content, deltas=deltas, outcome=outcome, usage=usage)
        status = final["status"]
        if status == "cancelled":
            message = outcome.message or f"The response was cancelled ({outcome.reason})."
            fields = {"code": outcome.reason, "message": message, "param": None}
            return _event("error", seq, fields) if seq > self.after else b""
        if status == "failed":
            return _event("response.failed", seq, {"response": final}) if seq > self.after else b""
        item = _message(self.id, content, _item_status(status))
        out = [
            self._part(seq, "response.output_text.done", text=content, logprobs=[]),
            self._part(seq + 1, "response.content_part.done", part=_text_part(content)),
        ]
        if seq + 2 > self.after:
            out.append(_event("response.output_item.done", seq + 2,
                              {"output_index": 0, "item": item}))  # fmt: skip
        if seq + 3 > self.after:
            out.append(_event(f"response.{status}", seq + 3, {"response": final}))
        return b"".join(out)
