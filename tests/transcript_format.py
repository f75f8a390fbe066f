"""The transcript file format, and a strict reading of the bodies it holds.

A transcript (``tests/transcripts/*.transcript``) is what one real model server
sends for one request: a TOML header, then a line that is exactly
``--- body ---``, then the response body **byte for byte** up to the end of
the file (SSE ``data:`` lines with their blank lines and comments, NDJSON
lines, or one JSON error body).  The header says where the shape comes from::

    scenario = "vllm_tool_calls"          # the file's stem
    server = "vLLM"
    versions = "..."                      # which releases send this shape
    summary = "..."
    path = "/v1/chat/completions"         # or "/api/chat" (Ollama)
    body_format = "sse"                   # "sse", "ndjson" or "json"
    sources = ["https://...", "owner/repo: path/in/repo.py", ...]
    documented = ["..."]                  # fields a source shows as such
    inferred = ["..."]                    # what was deduced, and from what

    [request]                             # a request that provokes this answer
    ...

    [response]
    status = 200
    headers = [["content-type", "text/event-stream"], ...]
    body_length = 1234                    # guards against editors adding a newline

    [replay]                              # optional
    delay = 0.0                           # seconds before each event

The header's ``headers`` are sent as listed; when they hold neither
``content-length`` nor ``transfer-encoding`` the fake upstream adds
``transfer-encoding: chunked`` (what a streaming server does).

The SSE reader here is deliberately independent of ``trio_stream.sse``: it is
the yardstick the product's decoder is measured against, so it must not share
its code.  It follows the WHATWG "server-sent events" parsing rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).

Pure: no trio, no I/O except :func:`load`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

DIRECTORY = Path(__file__).parent / "transcripts"
SEPARATOR = b"\n--- body ---\n"
BODY_FORMATS = ("sse", "ndjson", "json")
PATHS = ("/v1/chat/completions", "/api/chat")
_HEADER_KEYS = {
    "scenario", "server", "versions", "summary", "path", "body_format", "sources",
    "documented", "inferred", "request", "response", "replay",
}  # fmt: skip


@dataclass(frozen=True)
class Transcript:
    """One recorded-shape answer of a real model server."""

    name: str
    meta: dict[str, Any]
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    delay: float = 0.0

    @property
    def path(self) -> str:
        return str(self.meta["path"])

    @property
    def body_format(self) -> str:
        return str(self.meta["body_format"])

    @property
    def request(self) -> dict[str, Any]:
        req = self.meta.get("request", {})
        assert isinstance(req, dict)
        return req

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def load(path: Path) -> Transcript:
    """Read and validate one transcript file; raise ValueError naming the defect."""
    raw = path.read_bytes()
    head, sep, body = raw.partition(SEPARATOR)
    if not sep:
        raise ValueError(f"{path.name}: no '--- body ---' line")
    meta = tomllib.loads(head.decode("utf-8"))
    unknown = set(meta) - _HEADER_KEYS
    if unknown:
        raise ValueError(f"{path.name}: unknown header keys {sorted(unknown)}")
    for key in ("scenario", "server", "versions", "summary", "path", "body_format"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise ValueError(f"{path.name}: header {key!r} must be a non-empty string")
    for key in ("sources", "documented", "inferred"):
        value = meta.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{path.name}: header {key!r} must be a list of strings")
    if not meta["sources"]:
        raise ValueError(f"{path.name}: cites no source")
    if meta["scenario"] != path.stem:
        raise ValueError(f"{path.name}: scenario {meta['scenario']!r} is not the file's stem")
    if meta["body_format"] not in BODY_FORMATS:
        raise ValueError(f"{path.name}: body_format must be one of {BODY_FORMATS}")
    if meta["path"] not in PATHS:
        raise ValueError(f"{path.name}: path must be one of {PATHS}")
    response = meta.get("response")
    if not isinstance(response, dict):
        raise ValueError(f"{path.name}: no [response] table")
    status, headers = response.get("status"), response.get("headers", [])
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"{path.name}: response.status must be an HTTP status")
    if not all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in headers
    ):
        raise ValueError(f"{path.name}: response.headers must be [name, value] pairs")
    if response.get("body_length") != len(body):
        raise ValueError(
            f"{path.name}: body is {len(body)} bytes, header says {response.get('body_length')}"
            " (an editor added or removed a final newline?)"
        )
    replay = meta.get("replay", {})
    delay = float(replay.get("delay", 0.0))
    return Transcript(path.stem, meta, status, [(k, v) for k, v in headers], body, delay)


def all_transcripts() -> list[Transcript]:
    """Every transcript in ``tests/transcripts/``, sorted by name."""
    return [load(p) for p in sorted(DIRECTORY.glob("*.transcript"))]


def by_name(name: str) -> Transcript:
    return load(DIRECTORY / f"{name}.transcript")


# -- SSE, read strictly ---------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One dispatched SSE event (``data`` joined with ``\\n``, as the spec says)."""

    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None


@dataclass
class SSEReading:
    """What a spec-conformant reader makes of a whole body."""

    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    #: Lines the spec ignores but that no real server means to send
    #: (unknown field names, an event left open at the end of the body).
    oddities: list[str] = field(default_factory=list)


def _lines(text: str) -> list[str]:
    # The spec's line terminators: CRLF, LF, CR.  The text after the last
    # terminator is an incomplete line, which the spec never processes.
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_sse(body: bytes) -> SSEReading:
    """Parse a complete SSE body the way the WHATWG algorithm does.

    A body that is not UTF-8 raises UnicodeDecodeError (the spec decodes with
    replacement; a server that needs it is broken for our purposes).
    """
    text = body.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    reading = SSEReading()
    lines = _lines(text)
    tail = lines.pop()  # after the last terminator: never processed
    if tail:
        reading.oddities.append(f"unterminated last line {tail[:40]!r}")
    data: list[str] = []
    event_type: str | None = None
    last_id: str | None = None
    retry: int | None = None
    pending = False  # a field line seen since the last dispatch
    for line in lines:
        if line == "":
            if data:
                reading.events.append(Event("\n".join(data), event_type, last_id, retry))
            elif pending:
                reading.oddities.append("an event with no data field (dispatches nothing)")
            data, event_type, pending = [], None, False
            continue
        if line.startswith(":"):
            reading.comments.append(line[1:].removeprefix(" "))
            continue
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        pending = True
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id":
            if "\0" not in value:
                last_id = value
        elif name == "retry":
            if value.isdigit():
                retry = int(value)
            else:
                reading.oddities.append(f"retry field {value!r} is not digits")
        else:
            reading.oddities.append(f"unknown field {name!r}")
    if pending or data:
        reading.oddities.append("the body ends inside an event (no blank line after it)")
    return reading


def sse_problems(body: bytes) -> list[str]:
    """Why ``body`` is not a well-formed OpenAI-style SSE stream (empty when it is).

    Well-formed: UTF-8; every event is dispatched (ends with a blank line); only
    known fields; every ``data`` is one JSON object or the ``[DONE]`` sentinel;
    nothing follows ``[DONE]``.
    """
    try:
        reading = read_sse(body)
    except UnicodeDecodeError as exc:
        return [f"not UTF-8: {exc}"]
    problems = list(reading.oddities)
    done_at: int | None = None
    for i, ev in enumerate(reading.events):
        if done_at is not None:
            problems.append(f"event {i} comes after [DONE]")
        if ev.data == "[DONE]":
            done_at = i
            continue
        try:
            obj = orjson.loads(ev.data)
        except orjson.JSONDecodeError as exc:
            problems.append(f"event {i} data is not JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"event {i} data is not a JSON object")
    return problems


def sse_objects(body: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The JSON objects of a well-formed SSE body, and whether it ended with ``[DONE]``."""
    objects: list[dict[str, Any]] = []
    done = False
    for ev in read_sse(body).events:
        if ev.data == "[DONE]":
            done = True
            continue
        obj = orjson.loads(ev.data)
        assert isinstance(obj, dict)
        objects.append(obj)
    return objects, done


def ndjson_problems(body: bytes) -> list[str]:
    """Why ``body`` is not well-formed NDJSON (empty when it is).

    Well-formed: UTF-8, every line ends with ``\\n``, no blank line, every line
    one JSON object.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [f"not UTF-8: {exc}"]
    if not text.endswith("\n"):
        return ["the last line has no newline"]
    problems: list[str] = []
    for i, line in enumerate(text[:-1].split("\n")):
        if not line.strip():
            problems.append(f"line {i} is blank")
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            problems.append(f"line {i} is not JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {i} is not a JSON object")
    return problems


def ndjson_objects(body: bytes) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for line in body.decode("utf-8").splitlines():
        obj = orjson.loads(line)
        assert isinstance(obj, dict)
        out.append(obj)
    return out


def body_objects(t: Transcript) -> list[dict[str, Any]]:
    """Every JSON object the body carries, in order (``[DONE]`` left out)."""
    if t.body_format == "sse":
        return sse_objects(t.body)[0]
    if t.body_format == "ndjson":
        return ndjson_objects(t.body)
    obj = orjson.loads(t.body)
    assert isinstance(obj, dict)
    return [obj]


def steps(t: Transcript) -> list[bytes]:
    """The body cut where a server flushes: after each SSE blank line, NDJSON line,
    or whole (JSON).  Joined, the pieces are the body exactly."""
    if t.body_format == "json":
        return [t.body]
    sep = b"\n\n" if t.body_format == "sse" else b"\n"
    pieces: list[bytes] = []
    rest = t.body
    while rest:
        head, found, rest = rest.partition(sep)
        pieces.append(head + found)
    return pieces
