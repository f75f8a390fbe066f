"""Lifecycle logging: one line per event on stderr (docs/api.md section 4).

Text format: ``event key=value ...``; JSON format: one object per line,
``{"key": value, ..., "event": ...}``.  Written with structlog's ``WriteLogger``, without touching
its global configuration, so that several apps in one process (tests,
embedders) each log through their own :class:`EventLogger`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

Record = dict[str, Any]


def _render_text(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
    name = event_dict.pop("event")
    return " ".join([name, *(f"{k}={_text(v)}" for k, v in event_dict.items())])


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    s = str(value)
    return orjson.dumps(s).decode() if (" " in s or "=" in s or not s) else s


def _render_json(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
    return orjson.dumps(event_dict, default=str).decode()


class EventLogger:
    """Writes lifecycle events; ``sink`` (tests) also receives each record."""

    def __init__(
        self,
        fmt: str = "text",
        stream: TextIO | None = None,
        sink: Callable[[Record], None] | None = None,
    ) -> None:
        self._sink = sink
        self._render = _render_json if fmt == "json" else _render_text
        # WriteLogger writes each line and its newline in one call (under its
        # per-file lock): the workers of --workers share one stderr, and
        # PrintLogger's two writes (text, then newline) let their lines run
        # into each other.
        self._write = structlog.WriteLogger(stream if stream is not None else sys.stderr).msg
        #: With tracing on: the current span's trace and span ids, added to
        #: each line as ``trace_id`` and ``span_id`` (``Tracing.log_ids``).
        self.ids: Callable[[], tuple[str, str] | None] | None = None

    def event(self, name: str, **fields: Any) -> None:
        """Write one line.

        The record is built and rendered here, then handed to structlog's
        ``WriteLogger``: what a ``BoundLogger`` with our two processors did,
        without its chain (a context copy, a dispatch per processor), which
        was most of a line's cost -- two lines per request.  The record is
        the one structlog built: the fields in call order, ``event`` last.
        """
        if self.ids is not None and (ids := self.ids()) is not None:
            fields["trace_id"], fields["span_id"] = ids
        record: Record = {**fields, "event": name}
        if self._sink is not None:
            self._sink(dict(record))
        self._write(self._render(None, "info", record))


class RecordingSink:
    """Collects records in memory: ``EventLogger(sink=RecordingSink())``."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def __call__(self, record: Record) -> None:
        self.records.append(record)

    def events(self, name: str | None = None, **match: Any) -> list[Record]:
        return [
            r
            for r in self.records
            if (name is None or r["event"] == name) and all(r.get(k) == v for k, v in match.items())
        ]
