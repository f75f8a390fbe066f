"""Server-Sent Events framing, both ways, sans-IO.

Encoding follows the WHATWG "server-sent events" format: an event is a block of
``field: value`` lines ended by a blank line; a line starting with ``:`` is a
comment (our ``: ping``).  :class:`SSEDecoder` is the mirror image, used for
the load generator and the tests.  It is fed bytes in arbitrary pieces and
returns whole events, like ``h11.Connection``.  :class:`SSEDataDecoder` is its
lean twin for OpenAI-compatible upstreams (the per-token hot path): the same
line and event rules, but it returns only each event's ``data``, as bytes,
ready for ``orjson``.

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


class SSEDataDecoder:
    """Incremental SSE parser for upstreams: ``feed(bytes) -> [data, ...]``.

    Exactly :class:`SSEDecoder`'s rules -- ``\n``, ``\r\n`` and ``\r`` line
    endings (a ``\r`` at the end of one piece and a ``\n`` at the start of the
    next are one ending), a blank line dispatches the event, the ``data``
    lines of one event are joined with ``\n``, an event without a ``data``
    line is dropped, comments are counted and ignored -- but it stays in
    bytes (no ``str`` per line) and keeps only ``data`` (``id``, ``event`` and
    ``retry`` are parsed by nobody downstream).  A piece that is exactly one
    ``data: ...`` event, the usual shape of a token, takes a fast path.
    """

    __slots__ = ("_buf", "_data", "_pending_cr", "comments")

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""  # the start of an unfinished line
        self._data: list[bytes | bytearray] = []  # the data lines of the event being read
        self._pending_cr = False  # the last piece ended with "\r"
        self.comments = 0

    def feed(self, data: bytes | bytearray) -> list[bytes | bytearray]:
        """The data of every event that ``data`` completes (h11 hands body
        data over as ``bytearray``: then so are the results)."""
        if not data:
            return []  # keep a pending "\r" pending: its "\n" may come next
        if self._pending_cr:
            self._pending_cr = False
            if data.startswith(b"\n"):
                data = data[1:]
        elif (
            not self._buf
            and not self._data
            and data.startswith(b"data: ")
            and data.find(b"\n") == len(data) - 2
            and data.endswith(b"\n\n")
            and b"\r" not in data
        ):
            return [data[6:-2]]
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            self._pending_cr = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out: list[bytes | bytearray] = []
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            line = buf[start:end]
            start = end + 1
            if not line:
                if self._data:
                    out.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b":"):
                self.comments += 1
            elif line.startswith(b"data:"):
                self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif line == b"data":
                self._data.append(b"")
        self._buf = buf[start:]
        return out
