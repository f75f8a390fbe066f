"""What a faithful relay delivers, computed from a transcript (issue 20).

The rule of issue 20 is "relay everything; rewrite only what trio-stream owns".
Given a :class:`~tests.transcript_format.Transcript`, this module computes:

* :func:`expected_chunks` -- the ``chat.completion.chunk`` objects a client
  should receive, in the upstream's order.  For an OpenAI-compatible upstream
  they are the upstream's own objects (error events left out: they end the
  stream as trio-stream's error frame, see :func:`midstream_error`).  For
  Ollama they are its NDJSON lines translated as issue 20 item 7 asks
  (:func:`ollama_chunk`).
* :func:`chunk_differences` -- a field-by-field comparison of expected and
  received chunks that ignores exactly the keys in :data:`REWRITES`.
* :func:`aggregate` -- the non-streamed answer (``stream: false``) in the
  shape of OpenAI's ``chat.completion``, built from the same chunks.
* :func:`http_error` / :func:`midstream_error` -- the upstream's error,
  whatever its dialect, as one :class:`UpstreamError` (the identity that
  issue 20 item 5 says must survive).

Pure: no trio, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import orjson

from tests.transcript_format import Transcript, body_objects

#: Chunk-level keys trio-stream may rewrite (issue 20: "the chunk's id,
#: created and model are yours to decide, documented").  The SSE ``id:``
#: line is trio-stream's own and never part of the chunk JSON, so it needs
#: no entry here.  A relay that rewrites less passes with a smaller set.
REWRITES: frozenset[str] = frozenset({"id", "created", "model"})

#: Chunk-level keys that only make sense on the wire and are left out of the
#: non-streamed answer (OpenAI's ``chat.completion`` has no such field).
STREAM_ONLY: frozenset[str] = frozenset({"obfuscation"})

#: Ollama final-line fields with no place in an OpenAI chunk: a translating
#: relay cannot deliver them (durations in ns; ``load_duration`` etc.).
OLLAMA_UNMAPPED: frozenset[str] = frozenset(
    {"total_duration", "load_duration", "prompt_eval_duration", "eval_duration", "created_at"}
)


# -- errors ---------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamError:
    """An upstream error in any dialect, with what identifies it."""

    message: str
    type: str | None
    code: str | int | None
    param: str | None
    #: ``"openai"`` ({"error": {...}}, also vLLM >= 0.10.1 and OpenRouter),
    #: ``"vllm-flat"`` ({"object": "error", ...}), ``"openrouter-chunk"`` (a chunk
    #: with a top-level error and finish_reason "error"), ``"openrouter-finish"``
    #: (a chunk with finish_reason "error" and no error object: the error is
    #: what its choice says), ``"ollama"`` ({"error": "..."}).
    dialect: str
    #: The error object's other keys a relay must keep (``native_finish_reason``).
    extra: Mapping[str, Any] = dataclass_field(default_factory=dict)


def as_error(obj: Mapping[str, Any]) -> UpstreamError | None:
    """The error ``obj`` carries, or None when it is an ordinary chunk/line."""
    err = obj.get("error")
    if obj.get("object") == "error" and "message" in obj:
        return UpstreamError(
            str(obj["message"]), obj.get("type"), obj.get("code"), obj.get("param"), "vllm-flat"
        )
    if isinstance(err, str):
        return UpstreamError(err, None, None, None, "ollama")
    if isinstance(err, Mapping):
        dialect = "openrouter-chunk" if "choices" in obj else "openai"
        return UpstreamError(
            str(err.get("message", "")), err.get("type"), err.get("code"), err.get("param"), dialect
        )
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and choices[0].get("finish_reason") == "error":
        # docs/api.md 2.2.1: the message says what the choice said; its
        # native_finish_reason is kept as a key of the error.
        native = choices[0].get("native_finish_reason")
        said = f' (native_finish_reason "{native}")' if native is not None else ""
        message = f'The upstream ended its answer with finish_reason "error"{said}.'
        extra = {"native_finish_reason": native} if native is not None else {}
        return UpstreamError(message, None, None, None, "openrouter-finish", extra)
    return None


def http_error(t: Transcript) -> UpstreamError | None:
    """The error of an answer with an HTTP error status (None for 2xx)."""
    if t.status < 400:
        return None
    (obj,) = body_objects(t)
    return as_error(obj)


def midstream_error(t: Transcript) -> UpstreamError | None:
    """The error event that ends a 2xx stream, if any."""
    if t.status >= 400:
        return None
    errors = [e for obj in body_objects(t) if (e := as_error(obj)) is not None]
    assert len(errors) <= 1, "a transcript carries at most one error event"
    return errors[0] if errors else None


def retry_after(t: Transcript) -> str | None:
    """The ``Retry-After`` a relay must pass on (issue 20 item 5), as sent."""
    return t.header("retry-after")


def ratelimit_headers(t: Transcript) -> list[tuple[str, str]]:
    """The ``x-ratelimit-*`` headers, in order, as sent."""
    return [(k, v) for k, v in t.headers if k.lower().startswith("x-ratelimit-")]


# -- chunks ---------------------------------------------------------------------


def ollama_chunk(line: Mapping[str, Any], *, first: bool, tool_called: bool) -> dict[str, Any]:
    """One Ollama ``/api/chat`` line as the OpenAI chunk issue 20 item 7 asks for.

    ``message.content`` -> ``delta.content`` and ``message.thinking`` ->
    ``delta.reasoning_content`` when non-empty; ``message.tool_calls`` ->
    ``delta.tool_calls`` with Ollama's own ``id`` and ``function.index`` and the
    ``arguments`` object as compact JSON text (as Ollama's own OpenAI layer,
    ollama/openai/openai.go, does); the ``done`` line -> ``finish_reason``
    (``done_reason``, with ``stop`` read as ``tool_calls`` when a tool was
    called, again as openai.go does) and ``usage`` from ``prompt_eval_count``
    and ``eval_count``.  ``id``/``created``/``model`` are trio-stream's
    (:data:`REWRITES`); the model name is kept as Ollama sent it.
    """
    message = line.get("message") or {}
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if message.get("content"):
        delta["content"] = message["content"]
    if message.get("thinking"):
        delta["reasoning_content"] = message["thinking"]
    if calls := message.get("tool_calls"):
        delta["tool_calls"] = [_ollama_call(i, c) for i, c in enumerate(calls)]
    finish: str | None = None
    chunk: dict[str, Any] = {"object": "chat.completion.chunk", "model": line.get("model")}
    if line.get("done"):
        finish = str(line.get("done_reason") or "stop")
        if finish == "stop" and tool_called:
            finish = "tool_calls"
    chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    if line.get("done"):
        prompt, completion = line.get("prompt_eval_count", 0), line.get("eval_count", 0)
        chunk["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    return chunk


def _ollama_call(position: int, call: Mapping[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    out: dict[str, Any] = {"index": fn.get("index", position)}
    if "id" in call:
        out["id"] = call["id"]
    out["type"] = "function"
    args = fn.get("arguments", {})
    text = args if isinstance(args, str) else orjson.dumps(args).decode()
    out["function"] = {"name": fn.get("name", ""), "arguments": text}
    return out


def expected_chunks(t: Transcript) -> list[dict[str, Any]]:
    """The chunk objects a faithful relay delivers for ``t``, in order.

    Empty for an HTTP error answer.  Error events are not chunks: OpenAI's and
    vLLM's carry no choices, and OpenRouter's error chunk (whose only choice
    says ``finish_reason: "error"`` with an empty delta, with or without a
    top-level ``error``) is delivered as trio-stream's error frame, which
    keeps its ``code`` and ``message`` or its ``native_finish_reason``
    (:func:`midstream_error`).
    """
    if t.status >= 400:
        return []
    objects = [obj for obj in body_objects(t) if as_error(obj) is None]
    if t.body_format != "ndjson":
        return objects
    out: list[dict[str, Any]] = []
    tool_called = False
    for i, line in enumerate(objects):
        tool_called = tool_called or bool((line.get("message") or {}).get("tool_calls"))
        out.append(ollama_chunk(line, first=i == 0, tool_called=tool_called))
    return out


def comparable(chunk: Mapping[str, Any], rewrites: Iterable[str] = REWRITES) -> dict[str, Any]:
    """``chunk`` without the keys a relay may rewrite."""
    drop = set(rewrites)
    return {k: v for k, v in chunk.items() if k not in drop}


def _diff(path: str, want: Any, got: Any, out: list[str]) -> None:
    if isinstance(want, dict) and isinstance(got, dict):
        for key in [*want, *(k for k in got if k not in want)]:
            where = f"{path}.{key}"
            if key not in got:
                out.append(f"{where}: missing (upstream sent {want[key]!r})")
            elif key not in want:
                out.append(f"{where}: added ({got[key]!r}, upstream sent no such key)")
            else:
                _diff(where, want[key], got[key], out)
    elif isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            out.append(f"{path}: {len(got)} items, upstream sent {len(want)}")
        for i, (w, g) in enumerate(zip(want, got, strict=False)):
            _diff(f"{path}[{i}]", w, g, out)
    elif type(want) is not type(got) or want != got:
        out.append(f"{path}: {got!r}, upstream sent {want!r}")


_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any] | None:
    """``a`` then ``b`` as one chunk, when the merge is exact; else None.

    Issue 20 item 1: coalescing may merge entries "only where the merge is
    exact (text fields concatenate; logprobs lists concatenate; other fields:
    do not merge across them)".  So: one choice each; every key outside the
    choice's ``delta`` and ``logprobs`` equal (``finish_reason``, ``usage``,
    ``stop_reason``, ...); the same delta keys, the text ones (``content``,
    ``reasoning_content``, ``reasoning``, ``refusal``) strings in both and
    concatenated, the others equal; ``logprobs`` both null, or both objects
    with the same keys whose lists concatenate.
    """
    if a.keys() != b.keys() or any(a[k] != b[k] for k in a if k != "choices"):
        return None
    ca, cb = a.get("choices"), b.get("choices")
    if not (isinstance(ca, list) and isinstance(cb, list) and len(ca) == len(cb) == 1):
        return None
    x, y = ca[0], cb[0]
    if x.keys() != y.keys() or any(x[k] != y[k] for k in x if k not in ("delta", "logprobs")):
        return None
    dx, dy = x.get("delta") or {}, y.get("delta") or {}
    if dx.keys() != dy.keys():
        return None
    delta: dict[str, Any] = {}
    for key, value in dx.items():
        if key in _TEXT_FIELDS and isinstance(value, str) and isinstance(dy[key], str):
            delta[key] = value + dy[key]
        elif value == dy[key]:
            delta[key] = value
        else:
            return None
    choice = {**x, "delta": delta}
    if "logprobs" in x:
        lx, ly = x["logprobs"], y["logprobs"]
        if lx is None and ly is None:
            pass
        elif isinstance(lx, Mapping) and isinstance(ly, Mapping) and lx.keys() == ly.keys():
            merged: dict[str, Any] = {}
            for key in lx:
                if isinstance(lx[key], list) and isinstance(ly[key], list):
                    merged[key] = [*lx[key], *ly[key]]
                elif lx[key] == ly[key]:
                    merged[key] = lx[key]
                else:
                    return None
            choice["logprobs"] = merged
        else:
            return None
    return {**a, "choices": [choice]}


def regroup(
    expected: list[dict[str, Any]],
    received: list[dict[str, Any]],
    rewrites: Iterable[str] = REWRITES,
) -> list[dict[str, Any]]:
    """``expected`` with consecutive chunks merged (exactly, :func:`merge`)
    wherever that makes them line up with ``received``: what a relay that
    coalesces is allowed to deliver.  Greedy: for each received chunk, the
    next expected one absorbs its successors while it differs from the
    received one and the merge stays exact.  Exact for a faithful relay; for
    an unfaithful one, the differences after the first real one may be
    reported against shifted chunks."""
    drop = tuple(rewrites)
    out: list[dict[str, Any]] = []
    i = 0
    for got in received:
        if i >= len(expected):
            break
        current, i = expected[i], i + 1
        target = comparable(got, drop)
        while comparable(current, drop) != target and i < len(expected):
            merged = merge(current, expected[i])
            if merged is None:
                break
            current, i = merged, i + 1
        out.append(current)
    out.extend(expected[i:])
    return out


def chunk_differences(
    expected: list[dict[str, Any]],
    received: list[dict[str, Any]],
    rewrites: Iterable[str] = REWRITES,
    *,
    coalescing: bool = False,
) -> list[str]:
    """Every field where ``received`` differs from ``expected`` (empty: faithful).

    Keys in ``rewrites`` are ignored at the chunk's top level only; a
    ``null`` and an absent key differ (a faithful relay keeps both as sent);
    ``1`` and ``1.0`` differ, as do ``True`` and ``1``; key order is not
    compared (JSON objects are unordered).  With ``coalescing``, consecutive
    expected chunks may arrive merged where the merge is exact (:func:`regroup`).
    """
    if coalescing:
        expected = regroup(expected, received, rewrites)
    out: list[str] = []
    if len(expected) != len(received):
        out.append(f"{len(received)} chunks received, upstream sent {len(expected)}")
    drop = tuple(rewrites)
    for i, (want, got) in enumerate(zip(expected, received, strict=False)):
        _diff(f"chunk[{i}]", comparable(want, drop), comparable(got, drop), out)
    return out


# -- the non-streamed answer ----------------------------------------------------
_CHOICE_KNOWN = {"index", "delta", "logprobs", "finish_reason"}
_CHUNK_KNOWN = {"id", "object", "created", "model", "choices", "usage"}


def _merge_tool_call(calls: dict[int, dict[str, Any]], part: Mapping[str, Any]) -> None:
    call = calls.setdefault(part.get("index", 0), {"function": {}})
    for key in ("id", "type"):
        if part.get(key) is not None and key not in call:
            call[key] = part[key]
    fn = part.get("function") or {}
    for key in ("name", "arguments"):
        if fn.get(key) is not None:
            call["function"][key] = call["function"].get(key, "") + fn[key]


def _tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    return {
        "id": call.get("id"),
        "type": call.get("type", "function"),
        "function": {"name": fn.get("name", ""), "arguments": fn.get("arguments", "")},
    }


def _merge_detail(details: dict[int, dict[str, Any]], item: Mapping[str, Any]) -> None:
    index = item.get("index", len(details))
    into = details.setdefault(index, {})
    for key, value in item.items():
        if key in ("text", "summary", "data") and isinstance(value, str):
            into[key] = into.get(key, "") + value
        elif value is not None or key not in into:
            into[key] = value


def aggregate(t: Transcript) -> dict[str, Any]:
    """The answer ``stream: false`` should give, in OpenAI's ``chat.completion`` shape.

    From :func:`expected_chunks`, merged the way issue 20 item 2 says:

    * ``message.content``, ``reasoning_content``, ``reasoning``, ``refusal``:
      each the concatenation of its deltas, present when any delta had the
      key as a string; ``content`` is ``null`` when it is empty and the answer
      is a refusal or tool calls (as OpenAI answers), else ``""`` or the text.
    * ``message.tool_calls``: merged by ``index`` (``id``/``type`` from the
      first fragment having them, ``function.name``/``arguments`` concatenated).
    * ``message.reasoning_details`` (OpenRouter): merged by ``index``, the
      ``text``/``summary``/``data`` strings concatenated, other keys the last
      non-null value (the signature arrives last).
    * ``logprobs``: ``{"content": [...]}`` (and ``"refusal": [...]`` when sent),
      the per-chunk lists concatenated; ``null`` when no chunk had logprobs.
    * ``finish_reason``: the last non-null one; every other choice key (vLLM's
      ``stop_reason``, OpenRouter's ``native_finish_reason``): its last value,
      preferring non-null.
    * ``usage``: the last non-null usage object, with every field as sent.
    * chunk-level extras (``system_fingerprint``, ``service_tier``, ``provider``):
      the last non-null value; :data:`STREAM_ONLY` keys are left out.
    * ``id``/``created``/``model``: the upstream's (they are in :data:`REWRITES`).

    ``usage`` is None when the upstream sent none; trio-stream then answers
    with its own counted usage (docs/api.md), so compare usage only when this
    gives one.
    """
    chunks = expected_chunks(t)
    texts: dict[str, list[str]] = {}
    calls: dict[int, dict[str, Any]] = {}
    details: dict[int, dict[str, Any]] = {}
    logprobs: dict[str, list[Any]] | None = None
    choice_extra: dict[str, Any] = {}
    chunk_extra: dict[str, Any] = {}
    finish: str | None = None
    usage: Any = None
    head: dict[str, Any] = {}
    for chunk in chunks:
        for key in ("id", "created", "model"):
            if key in chunk and key not in head:
                head[key] = chunk[key]
        for key, value in chunk.items():
            if key in _CHUNK_KNOWN or key in STREAM_ONLY:
                continue
            if value is not None or key not in chunk_extra:
                chunk_extra[key] = value
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            for field in _TEXT_FIELDS:
                if isinstance(delta.get(field), str):
                    texts.setdefault(field, []).append(delta[field])
            for part in delta.get("tool_calls") or []:
                _merge_tool_call(calls, part)
            for item in delta.get("reasoning_details") or []:
                _merge_detail(details, item)
            lp = choice.get("logprobs")
            if isinstance(lp, Mapping):
                logprobs = logprobs or {}
                for key in ("content", "refusal"):
                    if isinstance(lp.get(key), list):
                        logprobs.setdefault(key, []).extend(lp[key])
            if choice.get("finish_reason") is not None:
                finish = choice["finish_reason"]
            for key, value in choice.items():
                if key not in _CHOICE_KNOWN and (value is not None or key not in choice_extra):
                    choice_extra[key] = value
    message: dict[str, Any] = {"role": "assistant"}
    joined = {field: "".join(parts) for field, parts in texts.items()}
    content = joined.get("content", "")
    if not content and (joined.get("refusal") or calls):
        message["content"] = None
    else:
        message["content"] = content
    for field in ("reasoning_content", "reasoning", "refusal"):
        if field in joined:
            message[field] = joined[field]
    if details:
        message["reasoning_details"] = [details[i] for i in sorted(details)]
    if calls:
        message["tool_calls"] = [_tool_call(calls[i]) for i in sorted(calls)]
    if logprobs is not None:
        logprobs.setdefault("content", [])
    choice_out: dict[str, Any] = {
        "index": 0,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish,
        **choice_extra,
    }
    answer: dict[str, Any] = {**head, "object": "chat.completion", "choices": [choice_out]}
    answer.update(chunk_extra)
    answer["usage"] = usage
    return answer
