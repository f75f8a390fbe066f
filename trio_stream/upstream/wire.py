"""Decoding upstream wire formats into log items -- sans-IO.

* OpenAI-compatible servers send SSE whose ``data`` is a
  ``chat.completion.chunk`` (or ``[DONE]``, or ``{"error": ...}``).
* Ollama's ``/api/chat`` sends NDJSON: one object per line with a
  ``message`` and ``done``.

Both map to the same items: content strings, :class:`ToolDelta`, one
:class:`Finish`, and the upstream's :class:`Usage` where it reports one (a
malformed usage is dropped: it is advisory).  Anything else malformed raises
:class:`UpstreamError` -- also a delta nested too deep to be encoded again
(:data:`~trio_stream.protocol.MAX_DEPTH`), which would otherwise crash the
writer that relays it (a text delta is never re-encoded as JSON, so only
the other deltas are checked, and only when their chunk is long enough to be
that deep: a text token costs nothing more).

This module never imports trio.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import UpstreamError
from ..protocol import MAX_DEPTH, nested_too_deep
from ..runlog import ToolDelta
from ..usage import Usage
from . import Finish, Item

DONE = "[DONE]"
DONE_BYTES = b"[DONE]"


def _loads(data: str | bytes | bytearray, replace: bool) -> Any:
    """``orjson.loads``; with ``replace``, bytes that are not UTF-8 are read
    with U+FFFD for the bad sequences, as SSE decoding always did (its lines
    were decoded with ``errors="replace"``)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        if isinstance(data, str) or not replace:
            raise
        try:
            bytes(data).decode()
        except UnicodeDecodeError:
            return orjson.loads(bytes(data).decode(errors="replace"))
        raise


def _json(data: str | bytes | bytearray, what: str, replace: bool = False) -> dict[str, Any]:
    try:
        obj = _loads(data, replace)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(
            f"The upstream sent a malformed {what}", code="malformed_chunk"
        ) from exc
    if not isinstance(obj, dict):
        raise UpstreamError(
            f"The upstream sent a {what} that is not an object", code="malformed_chunk"
        )
    if "error" in obj:
        err = obj["error"]
        message = err.get("message") if isinstance(err, dict) else err
        raise UpstreamError(f"The upstream reported an error: {message}", code="upstream_reported")
    return obj


def openai_items(data: str | bytes | bytearray) -> list[Item]:
    """Items from one SSE ``data`` field of an OpenAI-compatible stream (the
    bytes of :class:`~trio_stream.sse.SSEDataDecoder`, or a ``str``)."""
    chunk = _json(data, "chunk", replace=True)
    usage = Usage.from_openai(chunk.get("usage"))
    choices = chunk.get("choices")
    if not choices:
        return [] if usage is None else [usage]  # a usage-only chunk
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise UpstreamError("The upstream sent malformed choices", code="malformed_chunk")
    choice = choices[0]
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise UpstreamError("The upstream sent a malformed delta", code="malformed_chunk")
    items: list[Item] = []
    content = delta.get("content")
    if isinstance(content, str) and content:
        items.append(content)
    rest = {k: v for k, v in delta.items() if k not in ("role", "content") and v is not None}
    if "tool_calls" in rest:
        _check_tool_calls(rest["tool_calls"])
    if rest:
        if len(data) > 2 * MAX_DEPTH and nested_too_deep(rest):
            raise _too_deep()
        items.append(ToolDelta(rest))
    if usage is not None:
        items.append(usage)
    if reason := choice.get("finish_reason"):
        items.append(Finish(str(reason)))
    return items


def ollama_items(line: bytes) -> list[Item]:
    """Items from one NDJSON line of Ollama's ``/api/chat`` stream."""
    if not line.strip():
        return []
    obj = _json(line, "line")
    message = obj.get("message") or {}
    if not isinstance(message, dict):
        raise UpstreamError("The upstream sent a malformed message", code="malformed_chunk")
    items: list[Item] = []
    content = message.get("content")
    if isinstance(content, str) and content:
        items.append(content)
    if calls := message.get("tool_calls"):
        if not isinstance(calls, list):
            raise _malformed_tool_calls()
        if len(line) > 2 * MAX_DEPTH and nested_too_deep(calls):  # its arguments are re-encoded
            raise _too_deep()
        items.append(ToolDelta({"tool_calls": [_ollama_call(i, c) for i, c in enumerate(calls)]}))
    if obj.get("done"):
        if (usage := Usage.from_ollama(obj)) is not None:
            items.append(usage)
        items.append(Finish("length" if obj.get("done_reason") == "length" else "stop"))
    return items


def _too_deep() -> UpstreamError:
    return UpstreamError(
        f"The upstream sent a delta nested more than {MAX_DEPTH} levels deep",
        code="malformed_chunk",
    )


def _malformed_tool_calls() -> UpstreamError:
    return UpstreamError("The upstream sent malformed tool calls", code="malformed_chunk")


def _check_tool_calls(calls: Any) -> None:
    """Only tool-call deltas that the run log can merge get in: a list of objects
    with an integer ``index`` and string ``function.name``/``arguments``."""
    if not isinstance(calls, list):
        raise _malformed_tool_calls()
    for part in calls:
        fn = part.get("function") or {} if isinstance(part, dict) else None
        if not (
            isinstance(part, dict)
            and type(part.get("index", 0)) is int
            and isinstance(fn, dict)
            and all(isinstance(fn.get(k) or "", str) for k in ("name", "arguments"))
        ):
            raise _malformed_tool_calls()


def _ollama_call(index: int, call: Any) -> dict[str, Any]:
    fn = call.get("function", {}) if isinstance(call, dict) else {}
    if not isinstance(fn, dict) or not isinstance(fn.get("name", ""), str):
        raise _malformed_tool_calls()
    args = fn.get("arguments", {})
    return {
        "index": index,
        "id": f"call_{index}",
        "type": "function",
        "function": {
            "name": fn.get("name", ""),
            "arguments": args if isinstance(args, str) else orjson.dumps(args).decode(),
        },
    }
