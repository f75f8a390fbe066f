"""The OpenAI Responses API at the seam -- sans-IO (docs/api.md section 8).

Upstreams speak chat completions, and a response is a run like any other
(:mod:`trio_stream.runs.manager`).  This module translates at the two ends:

* **In**: a ``POST /v1/responses`` body becomes a
  :class:`~trio_stream.wire.request.ChatRequest` (``instructions`` a system
  message first, ``input`` the messages -- ``function_call`` items an
  assistant message's ``tool_calls``, ``function_call_output`` items ``tool``
  messages --, ``tools``/``tool_choice``/``text.format`` their chat shapes,
  ``max_output_tokens`` the ``max_tokens``, ``include`` of the output
  text's logprobs and ``top_logprobs`` chat's ``logprobs``/``top_logprobs``,
  ``background`` the detach flag)
  plus the :class:`ResponseMeta` that rendering needs.
* **Out**: a run's log and outcome become the ``response`` object and its
  stream events.  :class:`Output` folds the log's entries into output items
  (``reasoning``, ``message`` with ``output_text``/``refusal`` parts,
  ``function_call``; an ``output_text`` part carries its chunks' token
  logprobs, :func:`logprobs_of`) and says which events each entry makes;
  the object and the events are both rendered from that one fold, so they
  agree.

Sequence numbers are a pure function of the run's log, so that any event can
be replayed from its number (``GET /v1/responses/{id}?stream=true&starting_after=N``)::

    0 response.created   1 response.in_progress
    then, entry by entry, the events each log entry makes (an item opens
    with output_item.added, a part with content_part.added, then its delta;
    opening an item closes the reasoning or message item before it);
    then the trailing events: completed or incomplete: the open items'
    .done events, then response.completed | response.incomplete;
    failed: response.failed; cancelled: error.

For a log of text only, entry ``n`` is sequence number ``n + 3`` (the
message item and its part open with the first entry, at 2 and 3).  A
replay renders the log from its start and sends only the events numbered
above ``N``, so the mapping holds however a subscriber was batched.  The
SSE ``id:`` is the sequence number.

This module never imports trio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..core.log import Chunk, Entry, Outcome, RunStatus
from ..errors import bad_request
from .request import ChatRequest, _field, parse_json_object

_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
#: Fields that would change the answer and are not served: refused, not ignored.
_UNSUPPORTED = ("previous_response_id", "conversation", "prompt")
_TOOL_CHOICES = frozenset({"auto", "none", "required"})
#: The ``include`` value served: the output text's token logprobs.  The
#: others name hosted tools' results, input echoes or encrypted reasoning,
#: which this server does not have.
_LOGPROBS = "message.output_text.logprobs"


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
    #: The function tools as the response object lists them (Responses shape).
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    #: ``text.format`` as given (None: plain text).
    text_format: dict[str, Any] | None = None
    #: ``top_logprobs`` as asked (None: not asked), echoed on the object.
    top_logprobs: int | None = None


# -- in ---------------------------------------------------------------------
def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A Responses message content as chat content: text parts joined into
    one string; with an image, a list of chat parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(
            f"'{where}.content' must be a string or an array.", "invalid_type", f"{where}.content"
        )
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
                f"{where}.content[{i}]",
            )
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or (name != "arguments" and not value):
        param = f"{where}.{name}"
        raise bad_request(f"'{param}' must be a non-empty string.", "invalid_type", param)
    return value


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``function_call`` input item as a chat ``tool_calls`` entry."""
    call_id = _string(item, "call_id", where)
    function = {
        "name": _string(item, "name", where),
        "arguments": _string(item, "arguments", where),
    }
    return {"id": call_id, "type": "function", "function": function}


def _tool_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``function_call_output`` input item as a chat ``tool`` message."""
    call_id = _string(item, "call_id", where)
    output = item.get("output")
    if isinstance(output, list):  # text parts only: a chat tool message is text
        texts = [p.get("text") if isinstance(p, dict) and p.get("type") in _TEXT_PARTS else None
                 for p in output]  # fmt: skip
        if not all(isinstance(t, str) for t in texts):
            raise bad_request(
                f"'{where}.output' may hold text parts only.",
                "unsupported_content",
                f"{where}.output",
            )
        output = "".join(t for t in texts if t is not None)
    if not isinstance(output, str):
        raise bad_request(
            f"'{where}.output' must be a string or an array.", "invalid_type", f"{where}.output"
        )
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise bad_request(
            f"'{where}.role' must be one of {sorted(_ROLES)}.", "invalid_type", f"{where}.role"
        )
    content = item.get("content")
    if role == "assistant" and isinstance(content, list):  # an echoed refusal stays one
        refusals = [p for p in content if isinstance(p, dict) and p.get("type") == "refusal"]
        if refusals and all(isinstance(p.get("refusal"), str) for p in refusals):
            rest = [p for p in content if p not in refusals]
            message: dict[str, Any] = {"role": role, "content": _content(rest, where) or None}
            message["refusal"] = "".join(p["refusal"] for p in refusals)
            return message
    return {"role": role, "content": _content(content, where)}


def _messages(input_: Any) -> list[dict[str, Any]]:
    """The chat messages of ``input``.  ``function_call`` items join the
    assistant message just before them (or make one); ``reasoning`` items
    are not sent (a chat upstream takes no reasoning as input)."""
    if input_ is None:
        raise bad_request("'input' is required.", "missing_required_parameter", "input")
    if isinstance(input_, str):
        return [{"role": "user", "content": input_}]
    if not isinstance(input_, list) or not input_:
        raise bad_request("'input' must be a string or a non-empty array.", "invalid_type", "input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(input_):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or last.get("refusal") is not None:
                last = {"role": "assistant", "content": None}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append(_tool_output(item, where))
        elif kind == "reasoning":
            continue
        else:
            raise bad_request(
                f"'{where}' must be a message, function_call, function_call_output or "
                f"reasoning item (type {kind!r} is not served).",
                "unsupported_input",
                f"{where}.type" if isinstance(item, dict) else where,
            )  # fmt: skip
    if not messages:
        raise bad_request("'input' has no message to send.", "invalid_value", "input")
    return messages


def _tools(tools: Any) -> tuple[list[dict[str, Any]], tuple[dict[str, Any], ...]]:
    """``tools``: the chat upstream's list and the object's list.  Only
    ``function`` tools are served; any other type is a 400 naming it."""
    if tools is None:
        return [], ()
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array.", "invalid_type", "tools")
    chat, shown = [], []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise bad_request(
                f"'tools[{i}]' has type {kind!r}: only 'function' tools are served "
                "(web_search, file_search, computer_use, mcp, ... are not).",
                "unsupported_tool",
                f"tools[{i}].type" if isinstance(tool, dict) else f"tools[{i}]",
            )
        assert isinstance(tool, dict)
        name = _string(tool, "name", f"tools[{i}]")
        parameters = tool.get("parameters")
        strict = tool.get("strict")
        description = tool.get("description")
        for key, value, types, what in (
            ("parameters", parameters, dict, "an object"),
            ("strict", strict, bool, "a boolean"),
            ("description", description, str, "a string"),
        ):
            if value is not None and not isinstance(value, types):
                param = f"tools[{i}].{key}"
                raise bad_request(f"'{param}' must be {what}.", "invalid_type", param)
        function: dict[str, Any] = {"name": name}
        for key, value in (("description", description), ("parameters", parameters),
                           ("strict", strict)):  # fmt: skip
            if value is not None:
                function[key] = value
        chat.append({"type": "function", "function": function})
        shown.append({"type": "function", "name": name, "description": description,
                      "parameters": parameters, "strict": strict})  # fmt: skip
    return chat, tuple(shown)


def _tool_choice(choice: Any) -> tuple[str | dict[str, Any], str | dict[str, Any]]:
    """``tool_choice``: its chat shape and the object's."""
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return choice, choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = _string(choice, "name", "tool_choice")
        return {"type": "function", "function": {"name": name}}, {"type": "function", "name": name}
    raise bad_request(
        "'tool_choice' must be 'auto', 'none', 'required' or "
        "{'type': 'function', 'name': ...} (other tool choices are not served).",
        "unsupported_tool_choice",
        "tool_choice",
    )


def _response_format(text: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``text.format``: the chat ``response_format`` and the object's format."""
    if text is None:
        return None, None
    if not isinstance(text, dict):
        raise bad_request("'text' must be an object.", "invalid_type", "text")
    fmt = text.get("format")
    if fmt is None:
        return None, None
    if not isinstance(fmt, dict):
        raise bad_request("'text.format' must be an object.", "invalid_type", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None, None
    if kind == "json_object":
        return {"type": "json_object"}, {"type": "json_object"}
    if kind == "json_schema":
        name = _string(fmt, "name", "text.format")
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request(
                "'text.format.schema' must be an object.", "invalid_type", "text.format.schema"
            )
        schema = {"name": name, "schema": fmt["schema"]}
        for key in ("description", "strict"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        shown = {"type": "json_schema", "name": name, "schema": fmt["schema"],
                 "description": fmt.get("description"), "strict": fmt.get("strict")}  # fmt: skip
        return {"type": "json_schema", "json_schema": schema}, shown
    raise bad_request(
        f"'text.format' has type {kind!r}: only 'text', 'json_object' and 'json_schema' "
        "are served.",
        "unsupported_parameter",
        "text.format.type",
    )


def _logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """``include`` and ``top_logprobs``: the chat fields that ask the upstream
    for token logprobs (``logprobs: true``, ``top_logprobs``), if any.
    ``include`` may name only :data:`_LOGPROBS`; any other value is refused
    (it asks for something this server cannot give), never ignored."""
    include = body.get("include")
    if include is not None and not (
        isinstance(include, list) and all(isinstance(v, str) for v in include)
    ):
        raise bad_request("'include' must be an array of strings.", "invalid_type", "include")
    for i, value in enumerate(include or ()):
        if value != _LOGPROBS:
            raise bad_request(
                f"'include[{i}]' is {value[:100]!r}: only {_LOGPROBS!r} is served.",
                "unsupported_parameter", f"include[{i}]",
            )  # fmt: skip
    top = _field(body, "top_logprobs", int, "an integer")
    if top is not None and not 0 <= top <= 20:
        raise bad_request(
            "'top_logprobs' must be between 0 and 20.", "invalid_value", "top_logprobs"
        )
    chat: dict[str, Any] = {}
    if include or top is not None:
        chat["logprobs"] = True
    if top is not None:
        chat["top_logprobs"] = top
    return chat


def parse_responses_request(raw: bytes) -> tuple[ChatRequest, ResponseMeta]:
    """Validate a ``POST /v1/responses`` body; the chat request to run and
    what the response object shows.  Unknown fields are ignored, not sent on."""
    body = parse_json_object(raw)
    for name in _UNSUPPORTED:
        if body.get(name):
            raise bad_request(
                f"'{name}' is not supported by this server.", "unsupported_parameter", name
            )
    model = _field(body, "model", str, "a string") or "mock"
    instructions = _field(body, "instructions", str, "a string")
    messages = _messages(body.get("input"))
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    stream = _field(body, "stream", bool, "a boolean") or False
    background = _field(body, "background", bool, "a boolean") or False
    store = _field(body, "store", bool, "a boolean")
    if background and store is False:
        raise bad_request("'background' requires 'store' to be true.", "invalid_value", "store")
    limit = _field(body, "max_output_tokens", int, "an integer")
    if limit is not None and not 1 <= limit <= 1_000_000:
        raise bad_request(
            "'max_output_tokens' must be between 1 and 1000000.",
            "invalid_value",
            "max_output_tokens",
        )
    temperature = _field(body, "temperature", (int, float), "a number")
    top_p = _field(body, "top_p", (int, float), "a number")
    tools, shown_tools = _tools(body.get("tools"))
    choice: Any = None
    shown_choice: str | dict[str, Any] = "auto"
    if body.get("tool_choice") is not None:
        choice, shown_choice = _tool_choice(body["tool_choice"])
    parallel = _field(body, "parallel_tool_calls", bool, "a boolean")
    response_format, shown_format = _response_format(body.get("text"))
    reasoning = _field(body, "reasoning", dict, "an object") or {}
    effort = reasoning.get("effort")
    if effort is not None and not isinstance(effort, str):
        raise bad_request(
            "'reasoning.effort' must be a string.", "invalid_type", "reasoning.effort"
        )
    chat: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    for name, value in (
        ("max_tokens", limit), ("temperature", temperature), ("top_p", top_p),
        ("tools", tools or None), ("tool_choice", choice), ("parallel_tool_calls", parallel),
        ("response_format", response_format), ("reasoning_effort", effort),
    ):  # fmt: skip
        if value is not None:
            chat[name] = value
    chat.update(logprobs := _logprobs(body))
    meta = ResponseMeta(model, instructions, limit, background, store is not False,
                        temperature, top_p, shown_tools, shown_choice, parallel is not False,
                        shown_format, logprobs.get("top_logprobs"))  # fmt: skip
    return ChatRequest(chat, model, messages, stream, limit, background), meta


# -- out: the output items ---------------------------------------------------
#: An event before numbering: its ``type`` and its other fields.
Event = tuple[str, dict[str, Any]]

_PREFIX = {"message": "msg_", "reasoning": "rs_", "function_call": "fc_"}
_DELTA = {
    "output_text": "response.output_text.delta",
    "refusal": "response.refusal.delta",
    "reasoning_text": "response.reasoning_text.delta",
}
_DONE = {
    "output_text": ("response.output_text.done", "text"),
    "refusal": ("response.refusal.done", "refusal"),
    "reasoning_text": ("response.reasoning_text.done", "text"),
}


def _text_part(text: str, logprobs: list[Any] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _part(kind: str, text: str, logprobs: list[Any] | None = None) -> dict[str, Any]:
    """A content part: ``output_text`` (with its token ``logprobs``) or
    ``refusal`` (a message's), ``reasoning_text`` (a reasoning item's)."""
    if kind == "output_text":
        return _text_part(text, logprobs)
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "reasoning_text", "text": text}


def delta_of(entry: Entry) -> dict[str, Any]:
    """A log entry's chat delta: a ``str`` is content, a
    :class:`~trio_stream.core.log.Chunk` its delta.  The fold reads
    entries only through this function."""
    return {"content": entry} if isinstance(entry, str) else entry.delta


def _logprob(token: Any) -> Any:
    """One chat ``logprobs.content`` entry as a Responses ``Logprob``.  The
    fields are the same (``token``, ``logprob``, ``bytes``, ``top_logprobs``
    of ``{token, logprob, bytes}``) but chat's ``bytes`` may be ``null`` (no
    bytes representation) where the Responses API has a list: ``[]`` then;
    ``top_logprobs`` absent or ``null`` is ``[]``.  Anything else is kept as
    sent (an entry that is not an object too)."""
    if not isinstance(token, dict):
        return token
    return {**token, "bytes": token.get("bytes") or [], "top_logprobs": [
        {**top, "bytes": top.get("bytes") or []} if isinstance(top, dict) else top
        for top in token.get("top_logprobs") or ()]}  # fmt: skip


def logprobs_of(entry: Entry, shape: Chunk | None) -> list[Any]:
    """A log entry's token logprobs (its choice's ``logprobs.content``) as
    Responses ``Logprob`` objects (:func:`_logprob`); ``[]`` if it has none.
    A ``str`` entry stands for the log's ``shape`` chunk with its text
    (core/log.py), so it carries the shape's logprobs; ``shape`` is the
    first entry :func:`shape_of` found, None before it.  The fold reads
    logprobs only through this function."""
    chunk = shape if isinstance(entry, str) else entry
    choice = chunk.choice if chunk is not None else None
    logprobs = choice.get("logprobs") if choice is not None else None
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    return [_logprob(t) for t in tokens] if isinstance(tokens, list) else []


def shape_of(entry: Entry) -> Chunk | None:
    """The entry if it sets its log's shape (core/log.py), else None."""
    return entry if isinstance(entry, Chunk) and entry.shape else None


def reasoning_of(delta: dict[str, Any]) -> str:
    """The reasoning text of a chat delta: ``reasoning_content`` (vLLM,
    DeepSeek) or else ``reasoning`` (OpenRouter, newer vLLM); never both,
    as an upstream that sends both sends the same text twice."""
    for name in ("reasoning_content", "reasoning"):
        value = delta.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def _item_status(status: str) -> str:
    return {"queued": "in_progress", "in_progress": "in_progress", "completed": "completed"}.get(
        status, "incomplete"
    )


@dataclass(slots=True)
class _Item:
    """One output item being built: ``message``, ``reasoning`` or ``function_call``."""

    kind: str
    index: int
    id: str
    parts: list[tuple[str, list[str]]] = field(default_factory=list)  # (part type, pieces)
    #: Part index -> its token logprobs so far (output_text parts that have some).
    logprobs: dict[int, list[Any]] = field(default_factory=dict)
    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    status: str | None = None  # set when it is done

    def where(self) -> dict[str, Any]:
        return {"item_id": self.id, "output_index": self.index}

    def json(self, status: str) -> dict[str, Any]:
        status = self.status or status
        if self.kind == "function_call":
            return {"type": "function_call", "id": self.id, "call_id": self.call_id,
                    "name": self.name, "arguments": "".join(self.arguments),
                    "status": status}  # fmt: skip
        content = [_part(kind, "".join(pieces), self.logprobs.get(i))
                   for i, (kind, pieces) in enumerate(self.parts)]  # fmt: skip
        if self.kind == "reasoning":
            return {"type": "reasoning", "id": self.id, "summary": [], "content": content,
                    "status": status}  # fmt: skip
        return {"type": "message", "id": self.id, "role": "assistant", "status": status,
                "content": content}  # fmt: skip


class Output:
    """The output items of one response, folded from its log entries in
    order.  Each step returns the events it makes, unnumbered.

    Text deltas go to a ``message`` item's ``output_text`` part, refusal
    deltas to its ``refusal`` part, reasoning deltas (:func:`reasoning_of`)
    to a ``reasoning`` item's ``reasoning_text`` part, tool-call deltas to
    one ``function_call`` item per tool-call index.  A message or reasoning
    item is closed when another item opens (as OpenAI streams them, one
    after the other); function calls stay open to the end, since an
    upstream may interleave the deltas of parallel calls.
    """

    __slots__ = ("_calls", "_messages", "_open", "_rid", "_shape", "_shaped", "entries", "items")

    def __init__(self, response_id: str) -> None:
        self._rid = response_id.removeprefix("resp_")
        self.items: list[_Item] = []
        self.entries = 0
        self._open: _Item | None = None  # the open message or reasoning item
        self._calls: dict[int, _Item] = {}  # tool-call index -> its item
        self._messages = 0
        self._shape: Chunk | None = None  # the log's shape chunk, once seen
        self._shaped: list[Any] = []  # the logprobs a str entry carries (the shape's)

    def _new(self, kind: str) -> _Item:
        index = len(self.items)
        suffix = f"_{index}"
        if kind == "message":  # the first message keeps the id it always had
            suffix = "" if self._messages == 0 else suffix
            self._messages += 1
        item = _Item(kind, index, _PREFIX[kind] + self._rid + suffix)
        self.items.append(item)
        return item

    def _added(self, item: _Item, events: list[Event]) -> None:
        events.append(("response.output_item.added",
                       {"output_index": item.index, "item": item.json("in_progress")}))  # fmt: skip

    def _sequential(self, kind: str, events: list[Event]) -> _Item:
        item = self._open
        if item is None or item.kind != kind:
            if item is not None:
                self._close(item, "completed", events)
            item = self._open = self._new(kind)
            self._added(item, events)
        return item

    def _part_of(self, item: _Item, kind: str, events: list[Event]) -> int:
        """The index of ``item``'s open part of ``kind``: the last one, or a
        new one (the one before it closed)."""
        if not item.parts or item.parts[-1][0] != kind:
            if item.parts:
                self._close_part(item, events)
            item.parts.append((kind, []))
            where = {**item.where(), "content_index": len(item.parts) - 1}
            events.append(("response.content_part.added", {**where, "part": _part(kind, "")}))
        return len(item.parts) - 1

    def _write(
        self, item: _Item, kind: str, delta: str, events: list[Event], logprobs: list[Any]
    ) -> None:
        index = self._part_of(item, kind, events)
        item.parts[index][1].append(delta)
        fields = {**item.where(), "content_index": index, "delta": delta}
        if kind == "output_text":
            fields["logprobs"] = logprobs
            if logprobs:
                item.logprobs.setdefault(index, []).extend(logprobs)
        events.append((_DELTA[kind], fields))

    def _close_part(self, item: _Item, events: list[Event]) -> None:
        kind, pieces = item.parts[-1]
        text = "".join(pieces)
        where = {**item.where(), "content_index": len(item.parts) - 1}
        done, key = _DONE[kind]
        fields = {**where, key: text}
        logprobs = item.logprobs.get(len(item.parts) - 1)
        if kind == "output_text":
            fields["logprobs"] = logprobs or []
        events.append((done, fields))
        part = _part(kind, text, logprobs)
        events.append(("response.content_part.done", {**where, "part": part}))

    def _close(self, item: _Item, status: str, events: list[Event]) -> None:
        if item.kind == "function_call":
            arguments = "".join(item.arguments)
            events.append(("response.function_call_arguments.done",
                           {**item.where(), "name": item.name,
                            "arguments": arguments}))  # fmt: skip
        elif item.parts:
            self._close_part(item, events)
        item.status = status
        if item is self._open:
            self._open = None
        events.append(("response.output_item.done",
                       {"output_index": item.index, "item": item.json(status)}))  # fmt: skip

    def _call(self, part: dict[str, Any], events: list[Event]) -> None:
        index = int(part.get("index", 0))
        fn = part.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            if self._open is not None:
                self._close(self._open, "completed", events)
            item = self._calls[index] = self._new("function_call")
            item.call_id = part.get("id") or f"call_{self._rid}_{item.index}"
            item.name = fn.get("name") or ""
            self._added(item, events)
        elif fn.get("name"):
            item.name += fn["name"]
        if arguments := fn.get("arguments"):
            item.arguments.append(arguments)
            events.append(("response.function_call_arguments.delta",
                           {**item.where(), "delta": arguments}))  # fmt: skip

    def feed(self, entry: Entry) -> list[Event]:
        """Fold one log entry in; the events it makes."""
        self.entries += 1
        item = self._open
        if isinstance(entry, str) and entry and item is not None and item.kind == "message":
            part = item.parts[-1] if item.parts else None
            if part is not None and part[0] == "output_text":  # the common case, kept short
                index = len(item.parts) - 1
                part[1].append(entry)
                if logprobs := self._shaped:
                    item.logprobs.setdefault(index, []).extend(logprobs)
                fields = {"item_id": item.id, "output_index": item.index,
                          "content_index": index, "delta": entry,
                          "logprobs": logprobs}  # fmt: skip
                return [("response.output_text.delta", fields)]
        if (shape := shape_of(entry)) is not None and self._shape is None:
            self._shape = shape
            self._shaped = logprobs_of(shape, None)
        return self.feed_delta(delta_of(entry), logprobs_of(entry, self._shape))

    def feed_delta(self, delta: dict[str, Any], logprobs: list[Any] | None = None) -> list[Event]:
        """Fold one chat delta in; the events it makes.  Its reasoning comes
        first, then its text (with the chunk's token ``logprobs``), its
        refusal, its tool calls (an upstream that sends reasoning and text in
        one chunk ends its reasoning there).  Logprobs go with the text only:
        a chunk without text shows none (the Responses API has no place for
        them), unless its ``content`` is ``""`` and it has no reasoning (a
        token with no text yet): then an empty text delta carries them."""
        events: list[Event] = []
        if reasoning := reasoning_of(delta):
            self._write(self._sequential("reasoning", events), "reasoning_text", reasoning, events,
                        [])  # fmt: skip
        for key, part in (("content", "output_text"), ("refusal", "refusal")):
            text = delta.get(key)
            if not isinstance(text, str):
                continue
            tokens = (logprobs or []) if key == "content" else []
            if text or (tokens and not reasoning):
                self._write(self._sequential("message", events), part, text, events, tokens)
        for call in delta.get("tool_calls") or ():
            self._call(call, events)
        return events

    def finish(self, status: str) -> list[Event]:
        """Close every open item (``completed`` or ``incomplete``); an answer
        with no output at all is one empty message, as OpenAI's."""
        events: list[Event] = []
        if not self.items:
            self._part_of(self._sequential("message", events), "output_text", events)
        for item in self.items:
            if item.status is None:
                self._close(item, _item_status(status), events)
        return events

    def json(self, status: str) -> list[dict[str, Any]]:
        """The ``output`` list of a response in ``status``."""
        if not self.items and status in ("completed", "incomplete"):
            return [{"type": "message", "id": "msg_" + self._rid, "role": "assistant",
                     "status": status, "content": [_text_part("")]}]  # fmt: skip
        default = _item_status(status)
        return [item.json(default) for item in self.items]


def fold(response_id: str, entries: Sequence[Entry]) -> Output:
    """The :class:`Output` of a log's entries."""
    output = Output(response_id)
    for entry in entries:
        output.feed(entry)
    return output


def saved_output(
    response_id: str, content: str, tool_calls: Sequence[dict[str, Any]],
    reasoning: str | None = None, refusal: str | None = None,
) -> Output:  # fmt: skip
    """The :class:`Output` of a saved row, folded by :meth:`Output.feed_delta`
    as the live log is: its reasoning (a ``reasoning`` item), its text and its
    refusal (the message's ``output_text`` and ``refusal`` parts), then its
    tool calls.  The same items as live for an answer that streamed them in
    this order (the common one); a row keeps each text whole, so a live
    answer that went back to reasoning after its text shows one reasoning
    item here, not two."""
    output = Output(response_id)
    output.feed_delta({"reasoning_content": reasoning or ""})
    output.feed_delta({"content": content})
    output.feed_delta({"refusal": refusal or ""})
    output.feed_delta({"tool_calls": [{**c, "index": i} for i, c in enumerate(tool_calls)]})
    return output


# -- out: the response object ----------------------------------------------
def status_of(outcome: Outcome | None, deltas: int, background: bool) -> str:
    """The response ``status``: ``queued`` (a background response with no
    delta yet), ``in_progress``, or how it ended."""
    if outcome is None:
        return "queued" if background and deltas == 0 else "in_progress"
    if outcome.status is RunStatus.COMPLETED:
        return "incomplete" if outcome.reason == "length" else "completed"
    return "cancelled" if outcome.status is RunStatus.CANCELLED else "failed"


#: The values the Responses API's ``error.code`` may take (OpenAI's
#: ``ResponseError``), of those an upstream error can mean.
RESPONSE_ERROR_CODES = frozenset({
    "server_error", "rate_limit_exceeded", "invalid_prompt", "vector_store_timeout",
    "invalid_image", "invalid_image_format", "invalid_base64_image", "invalid_image_url",
    "image_too_large", "image_too_small", "image_parse_error", "image_content_policy_violation",
    "invalid_image_mode", "image_file_too_large", "unsupported_image_media_type",
    "empty_image_file", "failed_to_download_image", "image_file_not_found",
})  # fmt: skip


def response_error(outcome: Outcome | None) -> dict[str, Any]:
    """The ``error`` of a failed response.

    An error the upstream reported (:attr:`Outcome.error`) keeps its
    ``message``, ``param`` and ``type``; its ``code`` is the upstream's when
    the Responses API has that code, else ``rate_limit_exceeded`` for a rate
    limit (code ``rate_limit_exceeded`` or ``429``), ``invalid_prompt`` for
    a bad request (code ``400``, ``413`` or ``422``, or a type that says
    ``invalid_request``), else ``server_error``: the Responses API's ``code``
    is one of a fixed list (docs/api.md section 8.2).  Any other failure is
    ``server_error`` with trio-stream's message.
    """
    upstream = outcome.error if outcome is not None else None
    if upstream is None:
        message = outcome.message if outcome is not None else ""
        return {"code": "server_error", "message": message or "The upstream failed."}
    code, type_ = upstream.get("code"), upstream.get("type")
    if isinstance(code, str) and code in RESPONSE_ERROR_CODES:
        mapped = str(code)
    elif code in ("rate_limit_exceeded", 429) or type_ == "rate_limit_error":
        mapped = "rate_limit_exceeded"
    elif code in (400, 413, 422) or "invalid_request" in str(type_):
        mapped = "invalid_prompt"
    else:
        mapped = "server_error"
    param, kind = upstream.get("param"), type_
    return {
        "code": mapped, "message": upstream["message"],
        "param": param if isinstance(param, str) else None,
        "type": kind if isinstance(kind, str) else None,
    }  # fmt: skip


@dataclass(frozen=True, slots=True)
class ResponseState:
    """What the response object shows of a run at one moment."""

    id: str
    meta: ResponseMeta
    created: float
    output: Output
    outcome: Outcome | None
    usage: dict[str, Any] | None  # the Responses ``usage`` (None while running)
    status: str | None = None  # overrides status_of (a row or a remote record)


def response_object(s: ResponseState) -> dict[str, Any]:
    """The ``response`` object (``GET /v1/responses/{id}``, the events)."""
    status = s.status or status_of(s.outcome, s.output.entries, s.meta.background)
    error = response_error(s.outcome) if status == "failed" else None
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    obj = {
        "id": s.id,
        "object": "response",
        "created_at": int(s.created),
        "status": status,
        "background": s.meta.background,
        "model": s.meta.model,
        "instructions": s.meta.instructions,
        "max_output_tokens": s.meta.max_output_tokens,
        "output": s.output.json(status),
        "error": error,
        "incomplete_details": incomplete,
        "usage": s.usage,
        "parallel_tool_calls": s.meta.parallel_tool_calls,
        "tool_choice": s.meta.tool_choice,
        "tools": list(s.meta.tools),
        "temperature": s.meta.temperature,
        "top_p": s.meta.top_p,
        "top_logprobs": s.meta.top_logprobs,
        "metadata": {},
    }
    if s.meta.text_format is not None:
        obj["text"] = {"format": s.meta.text_format}
    return obj


# -- out: the events ---------------------------------------------------------
def _event(kind: str, seq: int, fields: dict[str, Any]) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": seq, **fields})
    return b"event: %s\nid: %d\ndata: %s\n\n" % (kind.encode(), seq, data)


class ResponseEvents:
    """Renders one subscriber's events of one response, skipping those at or
    below ``starting_after``.  It folds the log from its first entry (a
    replay too: the numbers depend on everything before them), so
    :meth:`deltas` must be given every entry, in order."""

    def __init__(self, response_id: str, meta: ResponseMeta, created: float,
                 starting_after: int = -1) -> None:  # fmt: skip
        self.id = response_id
        self.meta = meta
        self.created = created
        self.after = starting_after
        self.output = Output(response_id)
        self.seq = 0  # the next event's sequence number

    def _state(self, outcome: Outcome | None = None, usage: dict[str, Any] | None = None,
               status: str | None = None) -> dict[str, Any]:  # fmt: skip
        state = ResponseState(self.id, self.meta, self.created, self.output, outcome, usage, status)
        return response_object(state)

    def _number(self, events: Sequence[Event]) -> bytes:
        seq, after = self.seq, self.after
        self.seq += len(events)
        return b"".join([_event(kind, n, fields) for n, (kind, fields) in enumerate(events, seq)
                         if n > after])  # fmt: skip

    def preamble(self) -> bytes:
        """``response.created`` and ``response.in_progress`` (0 and 1)."""
        created = self._state(status="queued" if self.meta.background else "in_progress")
        progress = self._state(status="in_progress")
        events = [("response.created", {"response": created}),
                  ("response.in_progress", {"response": progress})]  # fmt: skip
        return self._number(events)

    def deltas(self, entries: Sequence[Entry], first_seq: int) -> bytes:
        """The events of ``entries``, whose first is log entry ``first_seq``."""
        assert first_seq == self.output.entries + 1, "entries must come in order from the first"
        feed = self.output.feed
        return self._number([event for entry in entries for event in feed(entry)])

    def trailing(self, outcome: Outcome, usage: dict[str, Any]) -> bytes:
        """The events after the last entry."""
        status = status_of(outcome, self.output.entries, self.meta.background)
        if status == "cancelled":
            message = outcome.message or f"The response was cancelled ({outcome.reason})."
            return self._number([("error", {"code": outcome.reason, "message": message,
                                            "param": None})])  # fmt: skip
        if status == "failed":
            return self._number([("response.failed", {"response": self._state(outcome, usage)})])
        events = self.output.finish(status)
        events.append((f"response.{status}", {"response": self._state(outcome, usage)}))
        return self._number(events)
