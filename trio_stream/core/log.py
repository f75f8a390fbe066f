"""A run's event log, its replay cursor and its state machine -- sans-IO.

A *run* is one upstream completion.  Everything it produced is kept here, in
order, so that any number of subscribers can replay it from any point and then
follow it live.  The trio layer (:mod:`trio_stream.runs.manager`) only adds wake-ups.

State machine of the outcome (checked on every move; the run's whole
lifecycle around it is the table of :mod:`trio_stream.core.lifecycle`)::

    RUNNING --complete--> COMPLETED   (finish_reason "stop" | "length")
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

Entries are ``str`` (a content delta, the common case, kept as a bare string
to keep memory per token small) or :class:`ToolDelta`.

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


@dataclass(frozen=True, slots=True)
class ToolDelta:
    """A delta that is not plain content (tool calls, refusals, ...): the raw
    OpenAI ``delta`` object minus ``role``."""

    delta: dict[str, Any]


Entry = str | ToolDelta


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

    __slots__ = ("_calls", "_entries", "_outcome", "fenced")

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._outcome: Outcome | None = None
        self._calls: dict[int, _ToolCall] = {}
        self.fenced = False

    # -- producing --------------------------------------------------------
    def append(self, entry: Entry) -> int:
        """Add one delta; returns its sequence number."""
        if self._outcome is not None or self.fenced:
            raise LogClosed("the run has ended; nothing more can be appended")
        self._entries.append(entry)
        if isinstance(entry, ToolDelta):
            self._merge_tool_calls(entry.delta)
        return len(self._entries)

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

    @property
    def content(self) -> str:
        """The text content received so far (what gets saved)."""
        return "".join(e for e in self._entries if isinstance(e, str))

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
