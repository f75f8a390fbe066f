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

from .errors import ApiError, bad_request

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

    @property
    def include_usage(self) -> bool:
        """``stream_options.include_usage``: end the stream with a usage chunk."""
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def upstream_body(self) -> dict[str, Any]:
        """The body to forward: ours minus our extensions, always streaming."""
        body = {k: v for k, v in self.body.items() if k not in ("detach", "stream_options")}
        body["stream"] = True
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


def _field(body: dict[str, Any], name: str, types: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad_request(f"'{name}' must be {what}.", "invalid_type")
    if not isinstance(value, types):
        raise bad_request(f"'{name}' must be {what}.", "invalid_type")
    return value


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise bad_request("'messages' is required.", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", "invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"'messages[{i}]' must be an object.", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise bad_request(
                f"'messages[{i}].role' must be one of {sorted(_ROLES)}.", "invalid_type"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(
                f"'messages[{i}].content' must be a string, an array or null.", "invalid_type"
            )
    return messages


def _token_limit(body: dict[str, Any], name: str) -> int | None:
    """An optional integer field in 1..1,000,000 (``max_tokens`` and its
    newer name ``max_completion_tokens``)."""
    value: int | None = _field(body, name, int, "an integer")
    if value is not None and not 1 <= value <= 1_000_000:
        raise bad_request(f"'{name}' must be between 1 and 1000000.", "invalid_value")
    return value


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body."""
    body = parse_json_object(raw)
    messages = _check_messages(body.get("messages"))
    model = _field(body, "model", str, "a string") or "mock"
    stream = _field(body, "stream", bool, "a boolean") or False
    detach = _field(body, "detach", bool, "a boolean") or False
    _field(body, "temperature", (int, float), "a number")
    # Both are checked, wherever they come from; max_tokens wins when both are set.
    max_tokens = _token_limit(body, "max_tokens")
    completion_tokens = _token_limit(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = completion_tokens
    options = _field(body, "stream_options", dict, "an object")
    if options is not None:
        _field(options, "include_usage", bool, "a boolean")
    n = _field(body, "n", int, "an integer")
    if n not in (None, 1):
        raise bad_request("Only 'n': 1 is supported.", "invalid_value")
    return ChatRequest(body, model, messages, stream, max_tokens, detach)
