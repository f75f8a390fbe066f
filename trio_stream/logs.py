"""Lifecycle logging: one line per event on stderr (docs/api.md section 4).

Text format: ``event key=value ...``; JSON format: one object per line,
``{"event": ..., "key": value, ...}``.  Built on structlog, without touching
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

        def capture(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Any:
            if self._sink is not None:
                self._sink(dict(event_dict))
            return event_dict

        renderer = _render_json if fmt == "json" else _render_text
        # WriteLogger writes each line and its newline in one call: the
        # workers of --workers share one stderr, and PrintLogger's two writes
        # (text, then newline) let their lines run into each other.
        self._log = structlog.wrap_logger(
            structlog.WriteLogger(stream if stream is not None else sys.stderr),
            processors=[capture, renderer],
        )

    def event(self, name: str, **fields: Any) -> None:
        self._log.info(name, **fields)


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
