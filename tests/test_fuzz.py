"""Property-based fuzzing of the sans-IO decoders and request parsing (issue 6, item 5).

Every property runs with a fixed budget, ``derandomize=True`` (the same
examples on every run, so CI is deterministic) and ``database=None`` (no
``.hypothesis`` directory is written).  To hunt for new failures locally, run
with ``--hypothesis-seed=<n>`` after switching ``derandomize`` off.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_stream.core.log import Chunk, Entry, RunLog
from trio_stream.errors import ApiError, UpstreamError
from trio_stream.upstream import Finish, ResponseModel, UpstreamItem, mocktext
from trio_stream.upstream.wire import StreamState, ollama_items, openai_items
from trio_stream.wire import sse
from trio_stream.wire.chunks import ChunkEncoder
from trio_stream.wire.request import ChatRequest, parse_chat_request
from trio_stream.wire.sse import LineDecoder, SSEDecoder, SSEEvent
from trio_stream.wire.usage import Usage

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- strategies ---------------------------------------------------------------

#: Text that UTF-8 can encode (no lone surrogates), like anything off the wire.
text = st.text(st.characters(codec="utf-8"), max_size=40)
#: Text that fits on one SSE data line.
line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=40)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)

#: Bytes rich in the characters that matter to line splitting.
line_soup = st.lists(
    st.sampled_from([b"a", b"xyz", b"\r", b"\n", b"\r\n", b"\xff", b" ", b"\xc3\xa9"]),
    max_size=40,
).map(b"".join)


@st.composite
def chunked(draw: st.DrawFn, raw: bytes) -> list[bytes]:
    """``raw`` cut at arbitrary points; a point cut twice gives an empty piece."""
    points = draw(st.lists(st.tuples(st.integers(0, len(raw)), st.booleans()), max_size=12))
    cuts = sorted(p for p, twice in points for _ in range(1 + twice))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def decode_events(chunks: Sequence[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return [ev for chunk in chunks for ev in decoder.feed(chunk)]


# -- (1) SSEDecoder ------------------------------------------------------------

framed_events = st.lists(
    st.tuples(line_text, st.none() | st.integers(0, 2**63), st.booleans()), max_size=8
)


@FUZZ
@given(events=framed_events, eol=st.sampled_from([b"\n", b"\r\n", b"\r"]), data=st.data())
def test_sse_round_trip(
    events: list[tuple[str, int | None, bool]], eol: bytes, data: st.DataObject
) -> None:
    """Events framed by sse.event (with pings between, any line ending), cut
    into arbitrary byte chunks, decode back to the same data, each with the
    last id sent so far (ids persist), and the pings are counted as comments."""
    raw = b"".join(
        (sse.PING if ping else b"") + sse.event(d.encode(), i) for d, i, ping in events
    ).replace(b"\n", eol)
    decoder = SSEDecoder()
    decoded = [ev for chunk in data.draw(chunked(raw)) for ev in decoder.feed(chunk)]
    expected, last_id = [], None
    for d, i, _ in events:
        last_id = last_id if i is None else str(i)
        expected.append(SSEEvent(d, last_id))
    assert decoded == expected
    assert decoder.comments == sum(ping for _, _, ping in events)


sse_lines = st.lists(
    st.tuples(
        st.sampled_from(["data", "id", "event", "retry", "", ":", "x", "data:", "retry: "]),
        st.sampled_from(["", ":", ": "]),
        text | st.sampled_from(["0", "12", "²", "٣", "\0", "[DONE]"]),
        st.sampled_from(["\n", "\r\n", "\r", "\n\n"]),
    ).map("".join),
    max_size=12,
).map(lambda lines: "".join(lines).encode("utf-8"))


@FUZZ
@given(raw=st.binary(max_size=200) | line_soup | sse_lines, data=st.data())
def test_sse_decoder_never_raises_and_ignores_chunking(raw: bytes, data: st.DataObject) -> None:
    """Arbitrary bytes never make SSEDecoder raise, and how they are cut into
    feeds never changes the events that come out."""
    whole = decode_events([raw])
    assert decode_events(data.draw(chunked(raw))) == whole
    for ev in whole:
        assert isinstance(ev.data, str)
        assert ev.retry is None or ev.retry >= 0


# -- (2) LineDecoder -----------------------------------------------------------


def reference_lines(raw: bytes) -> tuple[list[bytes], list[bytes]]:
    """(terminated lines, unterminated tail) by bytes.splitlines, which splits
    on exactly LF, CRLF and CR."""
    lines, tail = [], []
    for line in raw.splitlines(keepends=True):
        if line.endswith(b"\r\n"):
            lines.append(line[:-2])
        elif line.endswith((b"\r", b"\n")):
            lines.append(line[:-1])
        else:
            tail.append(line)
    return lines, tail


@FUZZ
@given(raw=st.binary(max_size=200) | line_soup, data=st.data())
def test_line_decoder_is_chunking_invariant(raw: bytes, data: st.DataObject) -> None:
    """However a byte stream is cut into feeds (empty feeds and a CRLF split
    in two included), LineDecoder yields the lines bytes.splitlines finds,
    and flush() yields the unterminated tail."""
    decoder = LineDecoder()
    lines = [line for chunk in data.draw(chunked(raw)) for line in decoder.feed(chunk)]
    assert (lines, decoder.flush()) == reference_lines(raw)


# -- (3) parse_chat_request ----------------------------------------------------

ROLES = ["system", "developer", "user", "assistant", "tool", "function", "robot", ""]

messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(ROLES) | json_values,
            "content": text | json_values,
            "name": json_values,
        },
    )
    | json_values,
    max_size=4,
)

request_bodies = st.fixed_dictionaries(
    {},
    optional={
        "messages": messages | json_values,
        "model": text | json_values,
        "stream": st.booleans() | json_values,
        "detach": st.booleans() | json_values,
        "temperature": st.floats(0, 2) | json_values,
        "max_tokens": st.integers(-3, 2_000_000) | json_values,
        "max_completion_tokens": st.integers(-3, 2_000_000) | json_values,
        "n": st.integers(0, 3) | json_values,
        "stream_options": json_values,
        "tools": json_values,
    },
)


def parse(raw: bytes) -> ChatRequest | ApiError:
    try:
        return parse_chat_request(raw)
    except ApiError as exc:
        return exc


def check_parse(raw: bytes) -> None:
    request = parse(raw)
    if isinstance(request, ApiError):
        assert request.status == 400
        assert request.type == "invalid_request_error"
        assert orjson.loads(request.body())["error"]["message"] == request.message
        return
    assert isinstance(request, ChatRequest)
    assert request.messages
    assert all(isinstance(m, dict) for m in request.messages)
    assert request.max_tokens is None or 1 <= request.max_tokens <= 1_000_000
    body = request.upstream_body()
    assert body["stream"] is True
    assert "detach" not in body
    options = request.body.get("stream_options") or {}
    assert body["stream_options"] == {**options, "include_usage": True}
    orjson.dumps(body)
    orjson.dumps({"options": body})  # an ollama upstream nests some fields one level deeper
    mocktext.prompt_base(request.messages)  # the mock can answer it


@FUZZ
@given(body=request_bodies | json_values)
def test_parse_chat_request_on_json_values(body: Any) -> None:
    """Any JSON value is either a ChatRequest (that the mock can answer and
    whose upstream body drops our extensions) or an ApiError 400 with an
    OpenAI error body -- never another exception."""
    check_parse(orjson.dumps(body))


def nested_in(leaf: Any, kinds: list[bool]) -> bytes:
    """JSON of ``leaf`` inside one array (True) or object (False) per entry
    of ``kinds``: written by hand, since no encoder writes past its limit."""
    head = b"".join(b"[" if is_array else b'{"k":' for is_array in kinds)
    tail = b"".join(b"]" if is_array else b"}" for is_array in reversed(kinds))
    return head + orjson.dumps(leaf) + tail


#: Where deep nesting can hide in a body that is otherwise valid (issue 18).
DEEP_SHAPES = {
    "content": b'{"messages": [{"role": "user", "content": [@]}]}',
    "name": b'{"messages": [{"role": "user", "content": "x", "name": @}]}',
    "tools": b'{"messages": [{"role": "user"}], "tools": @}',
    "top_p": b'{"messages": [{"role": "user"}], "top_p": @}',
}
deep_bodies = st.builds(
    lambda shape, kinds, leaf: DEEP_SHAPES[shape].replace(b"@", nested_in(leaf, kinds)),
    st.sampled_from(sorted(DEEP_SHAPES)),
    st.lists(st.booleans(), min_size=240, max_size=260),
    json_scalars,
)


@FUZZ
@given(raw=deep_bodies)
def test_parse_chat_request_on_deep_nesting(raw: bytes) -> None:
    """Nesting around the limit (250 levels), in any field: a request that
    parses can be encoded again for every upstream and hashed by the mock;
    any other is a 400 (before issue 18, parsing let through bodies that no
    encoder could write back)."""
    check_parse(raw)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_parse_chat_request_on_bytes(raw: bytes) -> None:
    """Arbitrary bytes are a ChatRequest or an ApiError 400, never anything else."""
    check_parse(raw)


# -- (4) upstream wire decoders ------------------------------------------------

# Well-formed shapes with junk at the leaves: deep enough to reach every
# check, which a purely random JSON value almost never does.
function_parts = st.fixed_dictionaries(
    {}, optional={"name": text | json_scalars, "arguments": text | json_values}
)
openai_tool_calls = (
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "index": st.integers(0, 3) | json_scalars,
                "id": text | json_scalars,
                "type": st.just("function") | json_scalars,
                "function": function_parts | json_scalars,
            },
        )
        | json_scalars,
        max_size=3,
    )
    | json_scalars
)
openai_delta = st.fixed_dictionaries(
    {},
    optional={
        "role": st.just("assistant") | json_scalars,
        "content": text | json_scalars,
        "tool_calls": openai_tool_calls,
        "refusal": json_scalars,
    },
)
openai_chunks = st.one_of(
    # a well-formed envelope around a junky delta
    st.fixed_dictionaries(
        {
            "choices": st.tuples(
                st.fixed_dictionaries(
                    {"delta": openai_delta},
                    optional={"finish_reason": st.sampled_from(["stop", "length"]) | json_scalars},
                )
            ).map(list)
        }
    ),
    # a junky envelope
    st.fixed_dictionaries(
        {},
        optional={
            "choices": st.lists(
                st.fixed_dictionaries({}, optional={"delta": json_values}) | json_scalars,
                max_size=2,
            )
            | json_values,
            "usage": json_values,
        },
    ),
    st.builds(lambda err: {"error": err}, json_values),
)

ollama_tool_calls = (
    st.lists(
        st.fixed_dictionaries({}, optional={"function": function_parts | json_scalars})
        | json_scalars,
        max_size=3,
    )
    | json_scalars
)
ollama_lines = st.one_of(
    # a well-formed line around a junky message
    st.fixed_dictionaries(
        {
            "message": st.fixed_dictionaries(
                {}, optional={"content": text | json_scalars, "tool_calls": ollama_tool_calls}
            )
        },
        optional={"done": st.booleans(), "done_reason": st.just("length") | json_scalars},
    ),
    # a junky line
    st.fixed_dictionaries(
        {}, optional={"message": json_values, "done": json_scalars, "done_reason": json_scalars}
    ),
    st.builds(lambda err: {"error": err}, json_values),
)


def check_items(items: list[UpstreamItem]) -> None:
    """Accepted items are what the rest of the pipeline can take: non-empty
    text, tool deltas the run log merges and the encoder renders, usage with
    whole non-negative counts, at most one Finish, last, and at most one
    ResponseModel (a non-empty name), first, and only with an entry after it."""
    log = RunLog()
    for i, item in enumerate(items):
        if isinstance(item, ResponseModel):
            assert i == 0
            assert isinstance(item.name, str)
            assert item.name
            assert any(isinstance(x, str | Chunk) for x in items[1:])
            continue
        if isinstance(item, Finish):
            assert i == len(items) - 1
            assert isinstance(item.reason, str)
            continue
        if isinstance(item, Usage):
            assert min(item.prompt_tokens, item.completion_tokens, item.total_tokens) >= 0
            continue
        assert isinstance(item, Chunk) or (isinstance(item, str) and item)
        log.append(item)
    assert isinstance(log.tool_calls, list)
    rendered = ChunkEncoder("c", "m", 0, coalesce=True).render(log.read(0), 1)
    for ev in SSEDecoder().feed(rendered):
        orjson.loads(ev.data)


def check_openai(data: str) -> None:
    try:
        items = openai_items(data, StreamState())
    except UpstreamError:
        return
    check_items(items)


def check_ollama(line: bytes) -> None:
    try:
        items = ollama_items(line, StreamState())
    except UpstreamError:
        return
    check_items(items)


@FUZZ
@given(
    data=text
    | openai_chunks.map(lambda c: orjson.dumps(c).decode())
    | json_values.map(lambda v: orjson.dumps(v).decode())
)
def test_openai_items_never_raise_anything_but_upstream_error(data: str) -> None:
    """Any SSE data string is either items the pipeline can take or an
    UpstreamError -- never another exception."""
    check_openai(data)


@FUZZ
@given(
    line=st.binary(max_size=200) | ollama_lines.map(orjson.dumps) | json_values.map(orjson.dumps)
)
def test_ollama_items_never_raise_anything_but_upstream_error(line: bytes) -> None:
    """Any NDJSON line is either items the pipeline can take or an
    UpstreamError -- never another exception."""
    check_ollama(line)


# -- (5) ChunkEncoder.render ---------------------------------------------------


def render_batches(
    entries: list[Entry], batch_sizes: list[int], coalesce: bool
) -> list[tuple[int, dict[str, Any]]]:
    """Render ``entries`` as a writer does (batch by batch, each from the
    cursor after the previous one): (event id, delta) per event."""
    encoder = ChunkEncoder("chatcmpl-x", "m", 0, coalesce=coalesce)
    out, cursor = [], 0
    for size in [*batch_sizes, len(entries)]:
        batch = entries[cursor : cursor + size]
        if not batch:
            continue
        for ev in SSEDecoder().feed(encoder.render(batch, cursor + 1)):
            assert ev.id is not None
            (choice,) = orjson.loads(ev.data)["choices"]
            out.append((int(ev.id), choice["delta"]))
        cursor += len(batch)
    return out


def check_render(entries: list[Entry], batch_sizes: list[int]) -> None:
    results = {c: render_batches(entries, batch_sizes, c) for c in (True, False)}
    for coalesce, events in results.items():
        ids = [seq for seq, _ in events]
        assert ids == sorted(set(ids)), "event ids strictly increase"
        assert ids[-1:] == ([len(entries)] if entries else [])
        assert [("role" in delta) for _, delta in events] == [i == 0 for i in range(len(events))], (
            "role only on the event holding seq 1"
        )
        tool_events = [
            {k: v for k, v in delta.items() if k != "role"}
            for _, delta in events
            if "content" not in delta
        ]
        chunks = [e.delta for e in entries if isinstance(e, Chunk)]
        if not coalesce:
            assert tool_events == chunks, "without coalescing, one event per chunk"
        assert "".join(d["refusal"] for d in tool_events) == "".join(
            d["refusal"] for d in chunks
        ), "coalesced chunks only merge exactly: their texts concatenate, in order"
    contents = {c: "".join(d.get("content", "") for _, d in ev) for c, ev in results.items()}
    expected = "".join(e for e in entries if isinstance(e, str))
    assert contents[True] == contents[False] == expected
    assert len(results[False]) == len(entries)


batches = st.lists(st.integers(1, 6), max_size=6)


@FUZZ
@given(entries=st.lists(text.filter(bool), max_size=20), batch_sizes=batches)
def test_render_coalesce_preserves_content(entries: list[str], batch_sizes: list[int]) -> None:
    """For any string deltas rendered in any batches, coalesce=True and False
    deliver the same concatenated content; event ids strictly increase and end
    at the last sequence number; only the first event carries the role."""
    check_render(list(entries), batch_sizes)


@FUZZ
@given(
    entries=st.lists(
        text.filter(bool) | st.builds(lambda s: Chunk.of({"refusal": s}), text), max_size=20
    ),
    batch_sizes=batches,
)
def test_render_with_tool_deltas(entries: list[Entry], batch_sizes: list[int]) -> None:
    """Mixed with other chunks (refusal deltas), the same holds; without
    coalescing every chunk is its own event, and with it consecutive chunks
    merge only exactly (their refusal texts concatenate, in order)."""
    check_render(entries, batch_sizes)


@pytest.mark.parametrize(
    "raw",
    [b'{"messages": [{"role": []}]}', b'{"messages": [{"role": {"a": 1}}]}'],
    ids=["role-list", "role-object"],
)
def test_regression_unhashable_role(raw: bytes) -> None:
    """Found by test_parse_chat_request_on_json_values: an unhashable role
    raised TypeError (an HTTP 500) instead of ApiError 400."""
    check_parse(raw)
