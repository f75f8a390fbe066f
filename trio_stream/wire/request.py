"""Parsing and validating client requests -- sans-IO.

Every rejection is an :class:`~trio_stream.errors.ApiError` (HTTP 400) whose
message names the offending field, as OpenAI does.  The request body is kept
as the client sent it, so that fields we do not interpret (``tools``,
``top_p``, ...) still reach an OpenAI-compatible upstream.

This module never imports trio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import ApiError, bad_request

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: The deepest nesting of objects and arrays a request body may have, the body
#: itself counting as 1 (``{"a": [1]}`` is 2 deep).  A body is encoded again
#: for the upstream, and orjson encodes at most 254 levels: a body that passes
#: has room for 4 more around it (an ``ollama`` upstream puts ``top_p`` one
#: level deeper, in ``options``).  docs/api.md section 2.2.
MAX_DEPTH = 250
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    max_tokens: int | None
    detach: bool
    #: Headers for the upstream request: the attempt's ``traceparent`` when
    #: tracing is on (set per attempt by ``runs/routes.py``).
    trace_headers: tuple[tuple[str, str], ...] = ()

    @property
    def client_wants_usage(self) -> bool:
        """The client's ``stream_options.include_usage``: its stream ends with
        a usage chunk.  Whatever it says, an ``openai`` upstream is asked for
        usage (trio-stream saves and counts it: :meth:`upstream_body`), so a
        stream's writer consults this to withhold the usage chunk from a
        client that did not ask for one (``http/stream.py``,
        ``Subscriber.terminal``)."""
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def upstream_body(self) -> dict[str, Any]:
        """The body to forward: the client's minus ``detach`` (ours), always
        streaming, ``stream_options`` as the client sent it (a copy) with
        ``include_usage: true`` set, since trio-stream needs the usage."""
        body = {k: v for k, v in self.body.items() if k != "detach"}
        body["stream"] = True
        options = body.get("stream_options")
        body["stream_options"] = {**(options or {}), "include_usage": True}
        return body


def parse_session_id(value: str | None) -> str | None:
    """Validate an ``X-Session-Id`` header (1-128 of ``A-Za-z0-9._:-``)."""
    if value is None:
        return None
    if not SESSION_ID.fullmatch(value):
        raise bad_request(
            "X-Session-Id must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'.",
            "invalid_session_id",
        )
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object nested at most :data:`MAX_DEPTH` deep,
    else a 400 ``invalid_json``.  Every route that reads a JSON body parses
    it here, so a body that could not be encoded again never starts a run."""
    if not raw.strip():
        raise bad_request("The request body is empty; expected a JSON object.", "invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # orjson decodes 1,024 levels at most
            raise too_deep() from exc
        raise bad_request(f"The request body is not valid JSON: {exc}", "invalid_json") from exc
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", "invalid_json")
    # Each level takes two bytes at least ("[]"): a short body is never too deep.
    if len(raw) > 2 * MAX_DEPTH and nested_too_deep(body):
        raise too_deep()
    return body


def too_deep() -> ApiError:
    return bad_request(
        f"The request body nests objects and arrays more than {MAX_DEPTH} levels deep.",
        "invalid_json",
    )


def nested_too_deep(value: Any) -> bool:
    """Whether a parsed JSON value nests objects and arrays more than
    :data:`MAX_DEPTH` levels deep (``value`` itself counting as the first).

    The test is the one that matters -- can it be encoded again, with
    4 levels to spare? -- made by orjson's own encoder, whose
    limit is 254 levels: one encoding in C costs less than a walk in Python
    or even a count of the brackets (``tests/test_protocol.py`` pins the
    boundary, so an orjson that moved its limit is noticed).  Anything else
    orjson's decoder produces can be encoded again.
    """
    try:
        orjson.dumps([[[[value]]]])  # 254 - MAX_DEPTH levels around it
    except orjson.JSONEncodeError:
        return True
    return False


def _field(
    body: dict[str, Any], name: str, types: type | tuple[type, ...], what: str,
    param: str | None = None,
) -> Any:  # fmt: skip
    """``body[name]`` (``None`` when absent or ``null``) if it is of ``types``
    (a boolean is never a number), else a 400 ``invalid_type`` whose ``param``
    names it (``param``: its full path, default ``name``)."""
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    ) or not isinstance(value, types):
        where = param or name
        raise bad_request(f"'{where}' must be {what}.", "invalid_type", where)
    return value


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise bad_request("'messages' is required.", "missing_required_parameter", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", "invalid_type", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(
                f"'messages[{i}]' must be an object.", "invalid_type", f"messages[{i}]"
            )
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            where = f"messages[{i}].role"
            raise bad_request(f"'{where}' must be one of {sorted(_ROLES)}.", "invalid_type", where)
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            where = f"messages[{i}].content"
            raise bad_request(
                f"'{where}' must be a string, an array or null.", "invalid_type", where
            )
    return messages


def _token_limit(body: dict[str, Any], name: str) -> int | None:
    """An optional integer field in 1..1,000,000 (``max_tokens`` and its
    newer name ``max_completion_tokens``)."""
    value: int | None = _field(body, name, int, "an integer")
    if value is not None and not 1 <= value <= 1_000_000:
        raise bad_request(f"'{name}' must be between 1 and 1000000.", "invalid_value", name)
    return value


#: The standard fields checked by type only (their values are the upstream's to judge).
_TYPED: tuple[tuple[str, type | tuple[type, ...], str], ...] = (
    ("temperature", (int, float), "a number"),
    ("top_p", (int, float), "a number"),
    ("presence_penalty", (int, float), "a number"),
    ("frequency_penalty", (int, float), "a number"),
    ("seed", int, "an integer"),
    ("logprobs", bool, "a boolean"),
    ("logit_bias", dict, "an object"),
    ("user", str, "a string"),
    ("response_format", dict, "an object"),
    ("parallel_tool_calls", bool, "a boolean"),
    ("tool_choice", (str, dict), "a string or an object"),
)


def _check_standard(body: dict[str, Any]) -> None:
    """The standard OpenAI fields that trio-stream does not interpret but
    passes on: 400 naming the first one of the wrong type (``invalid_type``)
    or out of range (``invalid_value``: ``top_logprobs``).  ``tools`` and
    ``tool_choice`` are checked in shape only (an array of objects with a
    string ``type``; a ``function`` tool with a ``function`` object naming
    it; a string or an object)."""
    for name, types, what in _TYPED:
        _field(body, name, types, what)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise bad_request("'stop' must be a string or an array of strings.", "invalid_type", "stop")
    top = _field(body, "top_logprobs", int, "an integer")
    if top is not None and not 0 <= top <= 20:
        raise bad_request(
            "'top_logprobs' must be between 0 and 20.", "invalid_value", "top_logprobs"
        )
    tools = _field(body, "tools", list, "an array")
    for i, tool in enumerate(tools or ()):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(f"'{where}' must be an object.", "invalid_type", where)
        kind = _field(tool, "type", str, "a string", f"{where}.type")
        if kind is None:
            raise bad_request(
                f"'{where}.type' is required.", "missing_required_parameter", f"{where}.type"
            )
        if kind == "function":
            fn = tool.get("function")
            if not isinstance(fn, dict):
                raise bad_request(
                    f"'{where}.function' must be an object.", "invalid_type", f"{where}.function"
                )
            if not isinstance(fn.get("name"), str):
                raise bad_request(
                    f"'{where}.function.name' must be a string.",
                    "invalid_type",
                    f"{where}.function.name",
                )


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body."""
    body = parse_json_object(raw)
    messages = _check_messages(body.get("messages"))
    model = _field(body, "model", str, "a string") or "mock"
    stream = _field(body, "stream", bool, "a boolean") or False
    detach = _field(body, "detach", bool, "a boolean") or False
    # Both are checked, wherever they come from; max_tokens wins when both are set.
    max_tokens = _token_limit(body, "max_tokens")
    completion_tokens = _token_limit(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = completion_tokens
    options = _field(body, "stream_options", dict, "an object")
    if options is not None:
        _field(options, "include_usage", bool, "a boolean", "stream_options.include_usage")
    n = _field(body, "n", int, "an integer")
    if n not in (None, 1):
        raise bad_request("Only 'n': 1 is supported.", "invalid_value", "n")
    _check_standard(body)
    return ChatRequest(body, model, messages, stream, max_tokens, detach)
