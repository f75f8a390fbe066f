"""Decoding upstream wire formats into log items -- sans-IO.

* OpenAI-compatible servers send SSE whose ``data`` is a
  ``chat.completion.chunk`` (or ``[DONE]``, or ``{"error": ...}``).
* Ollama's ``/api/chat`` sends NDJSON: one object per line with a
  ``message`` and ``done``.

Both map to the same items: one log entry per chunk or line (a ``str`` for a
text-only one, else a :class:`~trio_stream.core.log.Chunk` carrying
everything the upstream sent but ``id``/``created``/``model``: see
:mod:`trio_stream.core.log`), one :class:`Finish`, the upstream's ``model``
once, as a :class:`ResponseModel` before the stream's first entry (given a
:class:`StreamState`; never on the text-only path, which costs nothing
more), and the upstream's
:class:`Usage` where it reports one (a malformed usage is not counted: it is
advisory; it is still relayed as sent).  Anything else malformed raises
:class:`UpstreamError` -- also a delta nested too deep to be encoded again
(:data:`~trio_stream.wire.request.MAX_DEPTH`), which would otherwise crash the
writer that relays it (a text delta is never re-encoded as JSON, so only
the other deltas are checked, and only when their chunk is long enough to be
that deep: a text token costs nothing more).

This module never imports trio.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..core.log import Chunk
from ..errors import UpstreamError, UpstreamReported
from ..wire.request import MAX_DEPTH, nested_too_deep
from ..wire.usage import Usage
from .base import Finish, ResponseModel, UpstreamItem

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
    if (error := reported_error(obj)) is not None:
        raise UpstreamReported(error)
    return obj


# -- the upstream's own errors (issue 20 item 5) -------------------------------
# Kept in these few functions, apart from the chunk decoding above, on purpose.

#: The keys of OpenAI's error object, in OpenAI's order.
ERROR_KEYS = ("message", "type", "param", "code")
#: Headers of an upstream's HTTP error answered with it to the client: what
#: clients' back-off reads (``retry-after-ms`` and ``x-should-retry`` are the
#: official SDK's), the rate-limit state, and the upstream's request id.
PASSED_HEADERS = frozenset({b"retry-after", b"retry-after-ms", b"x-should-retry", b"x-request-id"})
PASSED_PREFIX = b"x-ratelimit-"
#: Upstream HTTP statuses never answered as such: they are about trio-stream's
#: own credentials for the upstream, not about the client's request.
NOT_PASSED = frozenset({401, 407})
#: The most of an HTTP error's body that is read to find its error object.
ERROR_BODY_LIMIT = 65536
#: The most of it quoted in trio-stream's own 502 message.
ERROR_SNIPPET = 512


def reported_error(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The error that an upstream object carries, in OpenAI's shape, or None.

    Recognised, whatever arrives (an HTTP error's body, an SSE event, an
    NDJSON line): ``{"error": {...}}`` (OpenAI, vLLM >= 0.10.1, OpenRouter --
    also OpenRouter's error chunk, which has ``choices`` with
    ``finish_reason: "error"`` next to its ``error``), vLLM's older flat
    ``{"object": "error", "message", "type", "param", "code"}``, and
    Ollama's ``{"error": "text"}``.  See :func:`openai_error`.  (A chunk
    whose choice says ``finish_reason: "error"`` with no ``error`` beside it
    is read by :func:`openai_items`, see :func:`finish_error`.)
    """
    if obj.get("object") == "error" and "message" in obj:  # vLLM <= 0.10.0
        return openai_error({k: v for k, v in obj.items() if k != "object"})
    err = obj.get("error")
    if isinstance(err, dict):
        return openai_error(err)
    if err is not None:  # Ollama: {"error": "model 'x' not found"}
        return openai_error({"message": err})
    return None


def finish_error(choice: dict[str, Any]) -> dict[str, Any]:
    """The error of a chunk whose choice says ``finish_reason: "error"``
    without a top-level ``error`` (OpenRouter, when the model itself ended on
    an error: Gemini's ``MALFORMED_FUNCTION_CALL``, say), in OpenAI's shape
    (:func:`openai_error`): the choice's own ``error`` object if it carries
    one (OpenRouter's ``StreamingChoice.error``), else a message that says
    what the upstream said; either way with the choice's
    ``native_finish_reason`` as a key when it sent one.  Such a chunk ends
    the run as failed, never as a completed answer whose reason is
    ``error``."""
    native = choice.get("native_finish_reason")
    own = choice.get("error")
    if isinstance(own, dict):
        fields = dict(own)
    else:
        said = f' (native_finish_reason "{native[:200]}")' if isinstance(native, str) else ""
        fields = {"message": f'The upstream ended its answer with finish_reason "error"{said}.'}
    if native is not None:
        fields.setdefault("native_finish_reason", native)
    return openai_error(fields)


def openai_error(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` as OpenAI's error object: ``message`` (a string: a missing
    one says so, another value is its JSON), ``type``, ``param``, ``code`` as
    sent (``null`` when absent), the upstream's other keys as sent, and
    ``"source": "upstream"`` last.  A value nested too deep to be encoded
    again (:data:`~trio_stream.wire.request.MAX_DEPTH`) is dropped."""
    message = fields.get("message")
    if not isinstance(message, str):
        message = (
            "The upstream reported an error without a message."
            if message is None
            else orjson.dumps(message).decode()
            if not nested_too_deep(message)
            else "The upstream reported an error."
        )
    out: dict[str, Any] = {"message": message}
    for key in ERROR_KEYS[1:]:
        out[key] = fields.get(key)
    out.update((k, v) for k, v in fields.items() if k not in ERROR_KEYS)
    out["source"] = "upstream"
    for key in [k for k, v in out.items() if k != "message" and nested_too_deep(v)]:
        if key in ERROR_KEYS:
            out[key] = None
        else:
            del out[key]
    return out


def http_error(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamError:
    """The error to answer for an upstream's HTTP error (``status`` >= 400).

    A 4xx whose body carries an error object (:func:`reported_error`) is
    answered with the same status and that object (:class:`UpstreamReported`),
    except 401 and 407 (:data:`NOT_PASSED`).  Anything else -- a 5xx, a body
    that is no error object (an HTML page of a proxy) -- is trio-stream's 502
    naming the status, code ``upstream_http_<status>``.  Either way the
    headers of :data:`PASSED_HEADERS` and ``x-ratelimit-*`` go with it.
    """
    passed = tuple(
        (name, value)
        for name, value in headers
        if name in PASSED_HEADERS or name.startswith(PASSED_PREFIX)
    )
    error: dict[str, Any] | None = None
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        error = reported_error(obj)
    if error is not None and 400 <= status < 500 and status not in NOT_PASSED:
        return UpstreamReported(error, status=status, upstream_status=status, headers=passed)
    if error is not None:
        detail = error["message"]
    else:
        detail = body[:ERROR_SNIPPET].decode("utf-8", errors="replace")
    exc = UpstreamError(
        f"The upstream answered HTTP {status}: {detail}",
        code=f"upstream_http_{status}",
        headers=passed,
    )
    exc.upstream_status = status
    return exc


class StreamState:
    """What decoding one upstream stream remembers between its chunks.

    ``key``: the shape its text-only chunks are compared with
    (:attr:`~trio_stream.core.log.RunLog.shape`), the first text-only
    chunk's body with its content blanked.  ``tool_called``: Ollama sent a
    tool call (its ``done_reason`` ``stop`` then reads ``tool_calls``).
    ``started``: the stream's first entry was made (and its
    :class:`ResponseModel` said, if the upstream named one).
    """

    __slots__ = ("key", "started", "tool_called")

    def __init__(self) -> None:
        self.key: dict[str, Any] | None = None
        self.tool_called = False
        self.started = False


def _opening(state: StreamState, model: Any, items: list[UpstreamItem]) -> list[UpstreamItem]:
    """``items``, the stream's first entry's, after the upstream's ``model``
    when it named one (a non-empty string: Azure's first chunk says ``""``)."""
    state.started = True
    if isinstance(model, str) and model:
        return [ResponseModel(model), *items]
    return items


def openai_items(
    data: str | bytes | bytearray, shape: StreamState | None = None
) -> list[UpstreamItem]:
    """Items from one SSE ``data`` field of an OpenAI-compatible stream (the
    bytes of :class:`~trio_stream.wire.sse.SSEDataDecoder`, or a ``str``).

    One chunk is one entry (core/log's module docstring): a ``str`` when it
    is text-only and has the stream's ``shape``, else a :class:`Chunk` with
    everything but ``id``/``created``/``model``; then its :class:`Usage`
    and :class:`Finish`.  A choice whose ``index`` is not 0, or more than one
    choice, is a protocol error (trio-stream asks for ``n = 1``).  A choice
    whose ``finish_reason`` is ``"error"`` is the upstream's error
    (:class:`UpstreamReported`, :func:`finish_error`), not a finish.
    Given ``shape``, the chunk of the stream's first entry is preceded by
    the upstream's ``model`` (:func:`_opening`).
    """
    chunk = _json(data, "chunk", replace=True)
    model = chunk.pop("model", None)  # the REWRITTEN keys: kept out of the log
    chunk.pop("id", None)
    chunk.pop("created", None)
    raw_usage = chunk.get("usage")
    usage = None if raw_usage is None else Usage.from_openai(raw_usage)
    choices = chunk.get("choices")
    if not choices:
        if usage is None:
            return []  # nothing a client could use
        items: list[UpstreamItem] = [Chunk(chunk), usage]  # a usage-only chunk
        return items if shape is None or shape.started else _opening(shape, model, items)
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise UpstreamError("The upstream sent malformed choices", code="malformed_chunk")
    choice = choices[0]
    if choice.get("index", 0) != 0:
        raise UpstreamError(
            "The upstream sent a choice with index "
            f"{str(choice.get('index'))[:20]} (trio-stream asks for one choice, index 0)",
            code="malformed_chunk",
        )
    if choice.get("finish_reason") == "error":  # with a top-level error, _json raised
        raise UpstreamReported(finish_error(choice))
    delta = choice.get("delta")
    if delta is None:
        delta = {}
    elif not isinstance(delta, dict):
        raise UpstreamError("The upstream sent a malformed delta", code="malformed_chunk")
    content = delta.get("content")
    reason = choice.get("finish_reason")
    if len(delta) == 1 and type(content) is str and shape is not None:
        # The common case: a text-only chunk.  Blank its text and compare
        # the rest with the stream's shape (a C-level dict comparison).
        delta["content"] = ""
        if shape.key is None and reason is None and usage is None:
            shape.key = chunk
            entry = Chunk({**chunk, "choices": [{**choice, "delta": {"content": content}}]}, True)
            return [entry] if shape.started else _opening(shape, model, [entry])
        if chunk == shape.key:
            return [content]
        delta["content"] = content
    if "tool_calls" in delta and delta["tool_calls"] is not None:
        _check_tool_calls(delta["tool_calls"])
    if len(data) > 2 * MAX_DEPTH and nested_too_deep(chunk):
        raise _too_deep()
    items = [Chunk(chunk)]
    if usage is not None:
        items.append(usage)
    if reason:
        items.append(Finish(str(reason)))
    if shape is not None and not shape.started:
        return _opening(shape, model, items)
    return items


def ollama_items(line: bytes, state: StreamState | None = None) -> list[UpstreamItem]:
    """Items from one NDJSON line of Ollama's ``/api/chat`` stream.

    One line is one entry, in the OpenAI chunk shape (docs/api.md, Ollama):
    ``message.content`` -> ``delta.content``, ``message.thinking`` ->
    ``delta.reasoning_content`` (the name vLLM and DeepSeek use; Ollama's own
    OpenAI layer says ``reasoning``), ``message.tool_calls`` ->
    ``delta.tool_calls`` with Ollama's own ``id`` and ``function.index``, the
    first line's ``message.role`` -> ``delta.role``, the
    ``arguments`` object as JSON text; the ``done`` line -> ``finish_reason``
    (``done_reason`` as sent, ``stop`` read as ``tool_calls`` after a tool
    call, as Ollama's OpenAI layer does) and ``usage`` from its counts.
    A text-only line is a ``str``.  Given ``state``, the first line's items
    are preceded by its ``model`` (:func:`_opening`).
    """
    if not line.strip():
        return []
    obj = _json(line, "line")
    message = obj.get("message") or {}
    if not isinstance(message, dict):
        raise UpstreamError("The upstream sent a malformed message", code="malformed_chunk")
    delta: dict[str, Any] = {}
    content = message.get("content")
    if isinstance(content, str) and content:
        delta["content"] = content
    thinking = message.get("thinking")
    if isinstance(thinking, str) and thinking:
        delta["reasoning_content"] = thinking
    if calls := message.get("tool_calls"):
        if not isinstance(calls, list):
            raise _malformed_tool_calls()
        if len(line) > 2 * MAX_DEPTH and nested_too_deep(calls):  # its arguments are re-encoded
            raise _too_deep()
        delta["tool_calls"] = [_ollama_call(i, c) for i, c in enumerate(calls)]
        if state is not None:
            state.tool_called = True
    first = state is not None and not state.started
    if first and isinstance(role := message.get("role"), str):
        delta = {"role": role, **delta}  # the first chunk says who speaks, as OpenAI's does
    items: list[UpstreamItem]
    if not obj.get("done"):
        text_only = len(delta) == 1 and "content" in delta
        items = [content] if text_only else [Chunk.of(delta)]  # type: ignore[list-item]  # a str
    else:
        reason = str(obj.get("done_reason") or "stop")
        if reason == "stop" and state is not None and state.tool_called:
            reason = "tool_calls"
        chunk = Chunk.of(delta, reason)
        items = [chunk]
        if (usage := Usage.from_ollama(obj)) is not None:
            chunk.body["usage"] = usage.chat()
            items.append(usage)
        items.append(Finish(reason))
    if first and state is not None:
        return _opening(state, obj.get("model"), items)
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


def _ollama_call(position: int, call: Any) -> dict[str, Any]:
    """One Ollama tool call as an OpenAI tool-call delta: its own ``id`` and
    ``function.index`` kept (``position`` when it sends no index; ``call_<index>``
    when it sends no id, as Ollama before 0.12 did: a client needs one to
    answer the call)."""
    if not isinstance(call, dict):
        raise _malformed_tool_calls()
    fn = call.get("function", {})
    if not isinstance(fn, dict) or not isinstance(fn.get("name", ""), str):
        raise _malformed_tool_calls()
    index = fn.get("index", position)
    if type(index) is not int:
        raise _malformed_tool_calls()
    call_id = call.get("id")
    out: dict[str, Any] = {
        "index": index,
        "id": call_id if isinstance(call_id, str) else f"call_{index}",
    }
    args = fn.get("arguments", {})
    out["type"] = "function"
    out["function"] = {
        "name": fn.get("name", ""),
        "arguments": args if isinstance(args, str) else orjson.dumps(args).decode(),
    }
    return out
