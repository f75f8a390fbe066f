"""Server-Sent Events framing, both ways, sans-IO.

Encoding follows the WHATWG "server-sent events" format: an event is a block of
``field: value`` lines ended by a blank line; a line starting with ``:`` is a
comment (our ``: ping``).  :class:`SSEDecoder` is the mirror image, used for
OpenAI-compatible upstreams, the load generator and the tests.  It is fed bytes
in arbitrary pieces and returns whole events, like ``h11.Connection``.

This module never imports trio.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A keep-alive comment *line*, with no blank line after it.  A blank line
#: ends an event, and the OpenAI Python SDK's decoder (openai/_streaming.py)
#: dispatches one on every blank line once an ``id:`` has been seen (it keeps
#: the last event id, as the spec says, and treats it as content), then fails
#: to parse the empty data as JSON.  A comment line alone is ignored by every
#: SSE parser and can never end an event.
PING = b": ping\n"
DONE = b"data: [DONE]\n\n"


def event(data: bytes, event_id: int | None = None) -> bytes:
    """Frame one event.  ``data`` must not contain a newline (compact JSON never does)."""
    if event_id is None:
        return b"data: " + data + b"\n\n"
    return b"id: %d\ndata: %s\n\n" % (event_id, data)


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    id: str | None = None
    event: str | None = None
    retry: int | None = None


class LineDecoder:
    """Split a byte stream into lines, accepting ``\\n``, ``\\r\\n`` and ``\\r`` endings."""

    def __init__(self) -> None:
        self._buf = b""
        self._pending_cr = False

    def feed(self, data: bytes) -> list[bytes]:
        if not data:
            return []  # keep a pending "\r" pending: its "\n" may come next
        if self._pending_cr and data.startswith(b"\n"):
            data = data[1:]
        self._pending_cr = False
        buf = self._buf + data
        lines = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        if buf.endswith(b"\r"):
            self._pending_cr = True
        self._buf = lines.pop()
        return lines

    def flush(self) -> list[bytes]:
        """The last line of a stream that did not end with a newline."""
        rest, self._buf = self._buf, b""
        return [rest] if rest else []


class SSEDecoder:
    """Incremental SSE parser: ``feed(bytes) -> [SSEEvent, ...]``.

    Comments (``: ping``) are counted in :attr:`comments` and otherwise ignored.
    """

    def __init__(self) -> None:
        self._lines = LineDecoder()
        self._data: list[str] = []
        self._id: str | None = None
        self._event: str | None = None
        self._retry: int | None = None
        self.comments = 0

    def feed(self, data: bytes) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        for raw in self._lines.feed(data):
            ev = self._line(raw.decode("utf-8", errors="replace"))
            if ev is not None:
                out.append(ev)
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = None
            return None
        ev = SSEEvent("\n".join(self._data), self._id, self._event, self._retry)
        self._data, self._event = [], None
        return ev
