"""A run's event log, its replay cursor and its state machine -- sans-IO.

A *run* is one upstream completion.  Everything it produced is kept here, in
order, so that any number of subscribers can replay it from any point and then
follow it live.  The trio layer (:mod:`trio_stream.runs.manager`) only adds wake-ups.

State machine of the outcome (checked on every move; the run's whole
lifecycle around it is the table of :mod:`trio_stream.core.lifecycle`)::

    RUNNING --complete--> COMPLETED   (finish_reason "stop" | "length" | ...)
    RUNNING --cancel----> CANCELLED   (reason: superseded, interrupted, ...)
    RUNNING --fail------> FAILED      (reason: upstream_error, internal_error, ...)

Rule 1: a run leaves RUNNING exactly once; any other move raises
        :class:`IllegalTransition`.
Rule 2: entries are appended only while RUNNING and not fenced; afterwards
        :meth:`RunLog.append` raises :class:`LogClosed`.  So the content that
        is saved is fixed at the moment the run ends.
Rule 3: sequence numbers start at 1 and have no gaps: entry ``n`` is
        ``entries[n - 1]``.  A subscriber's cursor is the last sequence number
        it has seen (the SSE ``Last-Event-ID``); ``read(cursor)`` returns what
        comes after it.
Rule 4: a *fenced* run (it outlived its supersede deadline) is treated as
        closed: it can append nothing and emit nothing more.

The entries (issue 20: "relay everything; rewrite only what trio-stream owns")
-------------------------------------------------------------------------------
One entry is one upstream chunk, as the upstream sent it.  It has one of two
forms:

* :class:`Chunk` -- the upstream's ``chat.completion.chunk`` object minus the
  three keys trio-stream rewrites (``id``, ``created``, ``model``: they are
  the run's, see docs/api.md "What trio-stream rewrites").  Everything else is
  kept as sent, ``null`` values and unknown keys included: chunk-level fields
  (``object``, ``system_fingerprint``, ``service_tier``, ``obfuscation``,
  OpenRouter's ``provider``, ``usage`` with all its fields) and the one
  choice (``index`` 0, its ``delta`` whole -- ``role``, ``content``,
  ``reasoning_content``/``reasoning``, ``refusal``, ``tool_calls``, ... --
  ``logprobs``, ``finish_reason``, vLLM's ``stop_reason``, OpenRouter's
  ``native_finish_reason``, ...).  ``Chunk.body["choices"]`` is a list of
  at most one choice (``[]`` for a usage-only chunk).
* ``str`` -- the common case, kept small: a chunk whose delta is only
  ``{"content": <that str>}`` and whose every other field equals the log's
  :attr:`RunLog.shape`.  The shape is the first such chunk of the run, which
  is itself stored as a :class:`Chunk` with ``shape=True`` (so a replay from
  any cursor, and a follower on another node, knows it: it travels with the
  entries).  Before a shape is set (the mock upstream and Ollama never set
  one), a ``str`` stands for :data:`DEFAULT_SHAPE`.

:func:`expand` turns any entry back into the chunk body it stands for;
:func:`delta_of` gives its delta.  Readers other than the chat encoder (the
Responses API) should use those two and never look at ``str`` vs ``Chunk``.

Chunks the upstream sends after its finish chunk (OpenAI's usage chunk with
``choices: []``, OpenRouter's trailing usage chunk) arrive after the run has
completed (rule 2), so they are not entries: they are the log's
:attr:`RunLog.tail`, set once by the reader before the run's cleanup ends,
shipped with the run's end to other nodes, and relayed before ``[DONE]``.

Coalescing (:func:`merge`) joins two consecutive entries into one event only
where the merge is exact: the same keys everywhere; the text fields of the
delta (``content``, ``reasoning_content``, ``reasoning``, ``refusal``)
concatenate; ``logprobs`` lists concatenate; every other field must be equal
in both, else the entries are never merged.  Two ``str`` entries always merge.

This module never imports trio.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..errors import TrioStreamError


class RunStatus(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


_MOVES: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.RUNNING: frozenset({RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED}),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
    RunStatus.FAILED: frozenset(),
}


class IllegalTransition(TrioStreamError):
    """A run was moved out of a terminal state (a bug, never a client error)."""


class LogClosed(TrioStreamError):
    """An append after the run ended or was fenced."""


#: The keys of an upstream chunk that trio-stream rewrites (and so never stores).
REWRITTEN = ("id", "created", "model")

#: The delta fields that concatenate when entries are merged or aggregated.
TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")

#: What a ``str`` entry stands for before the upstream set a shape: the
#: chunk trio-stream always sent for a content delta.
DEFAULT_SHAPE: dict[str, Any] = {
    "object": "chat.completion.chunk",
    "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}],
}


@dataclass(frozen=True, slots=True)
class Chunk:
    """One upstream chunk as sent, minus :data:`REWRITTEN` (module docstring).

    ``shape``: this chunk sets the log's shape (its first text-only chunk).
    Never mutate ``body``: replays and other nodes read the same object.
    """

    body: dict[str, Any]
    shape: bool = False

    @classmethod
    def of(cls, delta: dict[str, Any], finish_reason: str | None = None) -> Chunk:
        """A chunk in :data:`DEFAULT_SHAPE` with this ``delta`` (and finish)."""
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return cls({"object": "chat.completion.chunk", "choices": [choice]})

    @property
    def choice(self) -> dict[str, Any] | None:
        choices = self.body.get("choices")
        return choices[0] if choices else None

    @property
    def delta(self) -> dict[str, Any]:
        choice = self.choice
        delta = choice.get("delta") if choice is not None else None
        return delta if isinstance(delta, dict) else {}

    @property
    def finish_reason(self) -> str | None:
        choice = self.choice
        reason = choice.get("finish_reason") if choice is not None else None
        return reason if isinstance(reason, str) else None

    @property
    def text(self) -> str | None:
        """The content of a text-only chunk (delta ``{"content": str}``), else None."""
        delta = self.delta
        content = delta.get("content")
        return content if len(delta) == 1 and isinstance(content, str) else None


Entry = str | Chunk


def with_text(shape: Chunk | None, text: str) -> dict[str, Any]:
    """The chunk body a ``str`` entry ``text`` stands for under ``shape``."""
    body = DEFAULT_SHAPE if shape is None else shape.body
    choice = {**body["choices"][0], "delta": {"content": text}}
    return {**body, "choices": [choice]}


def expand(entry: Entry, shape: Chunk | None) -> dict[str, Any]:
    """The chunk body (minus :data:`REWRITTEN`) an entry stands for.  Do not mutate."""
    return with_text(shape, entry) if isinstance(entry, str) else entry.body


def delta_of(entry: Entry) -> dict[str, Any]:
    """An entry's delta (``{"content": ...}`` for a ``str``).  Do not mutate."""
    return {"content": entry} if isinstance(entry, str) else entry.delta


def merge(a: Entry, b: Entry, shape: Chunk | None) -> Entry | None:
    """``a`` then ``b`` as one entry when the merge is exact (module docstring), else None."""
    if isinstance(a, str) and isinstance(b, str):
        return a + b
    if isinstance(a, Chunk) and a.shape and a is shape and isinstance(b, str):
        return a.text + b  # type: ignore[operator]  # a shape chunk is text-only
    if not (isinstance(a, Chunk) and isinstance(b, Chunk)):
        return None
    x, y = a.body, b.body
    if x.keys() != y.keys() or any(x[k] != y[k] for k in x if k != "choices"):
        return None
    ca, cb = a.choice, b.choice
    if ca is None or cb is None or ca.keys() != cb.keys():
        return None
    if any(ca[k] != cb[k] for k in ca if k not in ("delta", "logprobs")):
        return None
    da, db = a.delta, b.delta
    if da.keys() != db.keys():
        return None
    delta: dict[str, Any] = {}
    for key, value in da.items():
        other = db[key]
        if key in TEXT_FIELDS and isinstance(value, str) and isinstance(other, str):
            delta[key] = value + other
        elif value == other:
            delta[key] = value
        else:
            return None
    choice = {**ca, "delta": delta}
    if "logprobs" in ca:
        la, lb = ca["logprobs"], cb["logprobs"]
        if isinstance(la, dict) and isinstance(lb, dict) and la.keys() == lb.keys():
            merged: dict[str, Any] = {}
            for key, value in la.items():
                if isinstance(value, list) and isinstance(lb[key], list):
                    merged[key] = value + lb[key]
                elif value == lb[key]:
                    merged[key] = value
                else:
                    return None
            choice["logprobs"] = merged
        elif not (la is None and lb is None):
            return None
    return Chunk({**x, "choices": [choice]})


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended.  ``reason`` is the ``finish_reason`` for a completed
    run and the cancel/failure reason otherwise; ``message`` is for humans.
    ``error``: for a run that failed because the upstream reported an error,
    that error as the upstream sent it, in OpenAI's shape
    (:class:`~trio_stream.errors.UpstreamReported`): the stream's error frame
    carries it, on every replay and every node."""

    status: RunStatus
    reason: str
    message: str = ""
    error: dict[str, Any] | None = None


@dataclass(slots=True)
class _ToolCall:
    id: str | None = None
    type: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class RunLog:
    """The append-only log of one run."""

    __slots__ = (
        "_calls", "_entries", "_outcome", "deltas", "fenced", "finished", "shape", "tail", "usage",
    )  # fmt: skip

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._outcome: Outcome | None = None
        self._calls: dict[int, _ToolCall] = {}
        self.fenced = False
        #: The chunk ``str`` entries are shaped after (module docstring), if any.
        self.shape: Chunk | None = None
        #: An entry carried the upstream's ``finish_reason`` (so trio-stream
        #: adds no finish chunk of its own).
        self.finished = False
        #: The chunks the upstream sent after its finish chunk (module docstring).
        self.tail: tuple[Chunk, ...] = ()
        #: The last non-null ``usage`` object an entry carried, as sent.
        self.usage: dict[str, Any] | None = None
        #: Entries that carried something (text, a tool call, ...; not a bare
        #: role or finish): what counted usage counts (wire/usage.py).
        self.deltas = 0

    # -- producing --------------------------------------------------------
    def append(self, entry: Entry) -> int:
        """Add one entry; returns its sequence number."""
        if self._outcome is not None or self.fenced:
            raise LogClosed("the run has ended; nothing more can be appended")
        self._entries.append(entry)
        if isinstance(entry, str):
            self.deltas += 1
        else:
            self._note(entry)
        return len(self._entries)

    def _note(self, chunk: Chunk) -> None:
        if chunk.shape and self.shape is None:
            self.shape = chunk
        body = chunk.body
        if isinstance(usage := body.get("usage"), dict):
            self.usage = usage
        choices = body.get("choices")
        if not choices:
            return
        choice = choices[0]
        if choice.get("finish_reason") is not None:
            self.finished = True
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if any(value for key, value in delta.items() if key != "role"):
                self.deltas += 1
            if "tool_calls" in delta:
                self._merge_tool_calls(delta)

    def set_tail(self, tail: tuple[Chunk, ...]) -> None:
        """The chunks after the upstream's finish chunk (once, before the cleanup ends)."""
        self.tail = tail
        for chunk in tail:
            if isinstance(usage := chunk.body.get("usage"), dict):
                self.usage = usage

    def end(self, outcome: Outcome) -> None:
        """Fix the outcome: move out of RUNNING (rule 1)."""
        current = self.status
        if outcome.status not in _MOVES[current]:
            raise IllegalTransition(f"{current.value} -> {outcome.status.value}")
        self._outcome = outcome

    def fence(self) -> None:
        """Rule 4: nothing more goes in or out of this log."""
        self.fenced = True

    # -- reading ----------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return len(self._entries)

    @property
    def status(self) -> RunStatus:
        return RunStatus.RUNNING if self._outcome is None else self._outcome.status

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def read(self, cursor: int, limit: int | None = None) -> list[Entry]:
        """Entries with sequence numbers ``cursor + 1 ...`` (rule 3), at most ``limit``."""
        if cursor < 0:
            raise ValueError("cursor must be >= 0")
        return self._entries[cursor : None if limit is None else cursor + limit]

    def text(self, field: str = "content") -> str | None:
        """A text field of the deltas concatenated; None if no delta had it."""
        parts: list[str] = []
        seen = False
        for e in self._entries:
            if isinstance(e, str):
                if field == "content":
                    parts.append(e)
                    seen = True
            elif isinstance(value := e.delta.get(field), str):
                parts.append(value)
                seen = True
        return "".join(parts) if seen else None

    @property
    def content(self) -> str:
        """The text content received so far (what gets saved)."""
        return self.text("content") or ""

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """Tool-call deltas merged by index, in the OpenAI message shape."""
        return [
            {
                "id": c.id,
                "type": c.type or "function",
                "function": {"name": c.name, "arguments": "".join(c.arguments)},
            }
            for _, c in sorted(self._calls.items())
        ]

    def _merge_tool_calls(self, delta: dict[str, Any]) -> None:
        for part in delta.get("tool_calls") or ():
            call = self._calls.setdefault(int(part.get("index", 0)), _ToolCall())
            call.id = part.get("id") or call.id
            call.type = part.get("type") or call.type
            fn = part.get("function") or {}
            call.name += fn.get("name") or ""
            if fn.get("arguments"):
                call.arguments.append(fn["arguments"])

    def answer(self) -> Answer:
        """What the stream carried, aggregated (``stream: false``, the saved message)."""
        return aggregate(self._entries, self.shape, self.tail, self.tool_calls)


#: Choice and chunk keys :func:`aggregate` handles itself.
_CHOICE_KNOWN = frozenset({"index", "delta", "logprobs", "finish_reason"})
_CHUNK_KNOWN = frozenset({"object", "choices", "usage", *REWRITTEN})
#: Chunk-level keys that only make sense on the wire (OpenAI's per-chunk padding).
STREAM_ONLY = frozenset({"obfuscation"})


@dataclass(slots=True)
class Answer:
    """A run's chunks aggregated in the shape of OpenAI's non-streamed answer.

    ``message``: ``role``, ``content`` (None when empty and there is a refusal
    or a tool call), ``reasoning_content``/``reasoning``/``refusal`` (each only
    if the upstream sent that field), ``reasoning_details`` (merged by index),
    ``tool_calls``.  ``logprobs``: ``{"content": [...], ...}`` concatenated, or
    None when no chunk had any.  ``choice_extra``/``chunk_extra``: every other
    choice/chunk field, its last non-null value (``stop_reason``,
    ``native_finish_reason``, ``system_fingerprint``, ``service_tier``,
    ``provider``, ...).  ``finish_reason``: the last one sent.
    """

    message: dict[str, Any]
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    choice_extra: dict[str, Any]
    chunk_extra: dict[str, Any]


def _merge_detail(details: dict[Any, dict[str, Any]], item: Any) -> None:
    if not isinstance(item, dict):
        return
    into = details.setdefault(item.get("index", len(details)), {})
    for key, value in item.items():
        if key in ("text", "summary", "data") and isinstance(value, str):
            into[key] = into.get(key, "") + value
        elif value is not None or key not in into:
            into[key] = value


def aggregate(
    entries: list[Entry],
    shape: Chunk | None,
    tail: tuple[Chunk, ...] = (),
    tool_calls: list[dict[str, Any]] | None = None,
) -> Answer:
    """The :class:`Answer` of a run's entries (and tail), see :class:`Answer`."""
    texts: dict[str, list[str]] = {}
    details: dict[Any, dict[str, Any]] = {}
    logprobs: dict[str, Any] | None = None
    choice_extra: dict[str, Any] = {}
    chunk_extra: dict[str, Any] = {}
    finish: str | None = None
    content = texts.setdefault("content", [])
    shape_extra = None
    for entry in [*entries, *tail]:
        if isinstance(entry, str):
            content.append(entry)
            if shape_extra is None:  # a str stands for its shape: its fields count once
                shape_extra = expand(entry, shape)
                _extras(shape_extra, chunk_extra, choice_extra)
            continue
        body = entry.body
        _extras(body, chunk_extra, choice_extra)
        choice = entry.choice
        if choice is None:
            continue
        delta = entry.delta
        for name in TEXT_FIELDS:
            if isinstance(value := delta.get(name), str):
                texts.setdefault(name, []).append(value)
        if isinstance(items := delta.get("reasoning_details"), list):
            for item in items:
                _merge_detail(details, item)
        if isinstance(lp := choice.get("logprobs"), dict):
            logprobs = logprobs or {}
            for key, value in lp.items():
                if isinstance(value, list):
                    logprobs.setdefault(key, []).extend(value)
                elif key not in logprobs or value is not None:
                    logprobs[key] = value
        if isinstance(reason := choice.get("finish_reason"), str):
            finish = reason
    joined = {
        field: "".join(parts) for field, parts in texts.items() if parts or field == "content"
    }
    calls = tool_calls or []
    message: dict[str, Any] = {"role": "assistant"}
    text = joined.get("content", "")
    message["content"] = None if not text and (joined.get("refusal") or calls) else text
    for name in ("reasoning_content", "reasoning", "refusal"):
        if name in joined:
            message[name] = joined[name]
    if details:
        message["reasoning_details"] = [details[i] for i in details]
    if calls:
        message["tool_calls"] = calls
    if logprobs is not None:
        logprobs.setdefault("content", [])
    return Answer(message, logprobs, finish, choice_extra, chunk_extra)


def _extras(
    body: dict[str, Any], chunk_extra: dict[str, Any], choice_extra: dict[str, Any]
) -> None:
    for key, value in body.items():
        known = key in _CHUNK_KNOWN or key in STREAM_ONLY
        if not known and (value is not None or key not in chunk_extra):
            chunk_extra[key] = value
    choices = body.get("choices")
    if choices:
        for key, value in choices[0].items():
            if key not in _CHOICE_KNOWN and (value is not None or key not in choice_extra):
                choice_extra[key] = value
