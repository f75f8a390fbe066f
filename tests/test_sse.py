"""Plain synchronous tests of SSE framing and decoding (trio_stream/wire/sse.py).

The decoder follows the WHATWG "server-sent events" parsing rules; each table
row below names the rule it checks.
"""

from __future__ import annotations

import itertools
import random

import pytest

from trio_stream.wire import sse
from trio_stream.wire.sse import LineDecoder, SSEDecoder, SSEEvent


def feed_all(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return [ev for chunk in chunks for ev in decoder.feed(chunk)]


def split_every_byte(raw: bytes) -> list[bytes]:
    return [raw[i : i + 1] for i in range(len(raw))]


# -- framing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "event_id", "framed"),
    [
        (b"{}", None, b"data: {}\n\n"),
        (b"{}", 7, b"id: 7\ndata: {}\n\n"),
        (b"", 1, b"id: 1\ndata: \n\n"),
        (b"[DONE]", None, b"data: [DONE]\n\n"),
    ],
    ids=["no-id", "with-id", "empty-data", "done"],
)
def test_event_framing(data: bytes, event_id: int | None, framed: bytes) -> None:
    """sse.event writes `id:` (when given) then `data:` and ends with one blank line."""
    assert sse.event(data, event_id) == framed


def test_constants_are_well_formed() -> None:
    """PING is a comment (never an event) and DONE is the OpenAI terminator event."""
    decoder = SSEDecoder()
    assert decoder.feed(sse.PING) == []
    assert decoder.comments == 1
    assert decoder.feed(sse.DONE) == [SSEEvent("[DONE]")]


def test_framing_round_trips_through_the_decoder() -> None:
    """What sse.event frames, SSEDecoder decodes to the same data and id."""
    raw = sse.event(b'{"a":1}', 1) + sse.event(b"x y", 2) + sse.DONE
    assert feed_all([raw]) == [
        SSEEvent('{"a":1}', "1"),
        SSEEvent("x y", "2"),
        SSEEvent("[DONE]", "2"),
    ]


# -- line endings -------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "lines"),
    [
        ([b"a\nb\n"], [b"a", b"b"]),
        ([b"a\r\nb\r\n"], [b"a", b"b"]),
        ([b"a\rb\r"], [b"a", b"b"]),
        ([b"a\r", b"\nb\n"], [b"a", b"b"]),
        ([b"a\r", b"", b"\nb\n"], [b"a", b"b"]),
        ([b"a\r", b"\n", b"\n"], [b"a", b""]),
        ([b"a\r\r\n"], [b"a", b""]),
        ([b"a\n\r\n\r"], [b"a", b"", b""]),
        ([b"ab", b"c\n"], [b"abc"]),
        ([b"a", b"", b"b\n"], [b"ab"]),
        ([b"\n"], [b""]),
        ([b"no end"], []),
    ],
    ids=[
        "lf",
        "crlf",
        "cr",
        "crlf-split",
        "crlf-split-by-empty-feed",
        "crlf-split-then-lf",
        "cr-then-crlf",
        "mixed",
        "line-split",
        "empty-feed-mid-line",
        "blank-line",
        "unterminated",
    ],
)
def test_line_decoder_endings(chunks: list[bytes], lines: list[bytes]) -> None:
    """LF, CRLF and CR all end a line, also when a CRLF is split across feeds
    (even with an empty feed between): one CRLF is never two line ends."""
    decoder = LineDecoder()
    assert [line for chunk in chunks for line in decoder.feed(chunk)] == lines


def test_line_decoder_flush() -> None:
    """flush() returns the unterminated last line once, and nothing when there is none."""
    decoder = LineDecoder()
    assert decoder.feed(b"a\nrest") == [b"a"]
    assert decoder.flush() == [b"rest"]
    assert decoder.flush() == []
    assert decoder.feed(b"x\n") == [b"x"]
    assert decoder.flush() == []


@pytest.mark.parametrize(
    "raw",
    [
        b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n",
        b"id: 1\r\ndata: a\r\n\r\nid: 2\r\ndata: b\r\n\r\n",
        b"id: 1\rdata: a\r\rid: 2\rdata: b\r\r",
    ],
    ids=["lf", "crlf", "cr"],
)
def test_decoder_is_independent_of_line_endings_and_chunking(raw: bytes) -> None:
    """The same events come out for every line ending, fed whole or byte by byte."""
    expected = [SSEEvent("a", "1"), SSEEvent("b", "2")]
    assert feed_all([raw]) == expected
    assert feed_all(split_every_byte(raw)) == expected


# -- fields -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "events"),
    [
        (b"data: a\ndata: b\n\n", [SSEEvent("a\nb")]),
        (b"data:a\n\n", [SSEEvent("a")]),
        (b"data:  a\n\n", [SSEEvent(" a")]),
        (b"data\n\n", [SSEEvent("")]),
        (b"data:\ndata:\n\n", [SSEEvent("\n")]),
        (b"data: a:b: c\n\n", [SSEEvent("a:b: c")]),
        (b"event: add\ndata: x\n\n", [SSEEvent("x", event="add")]),
        (b"event: add\ndata: x\n\ndata: y\n\n", [SSEEvent("x", event="add"), SSEEvent("y")]),
        (b"event: add\n\ndata: y\n\n", [SSEEvent("y")]),
        (b"unknown: v\ndata: x\n\n", [SSEEvent("x")]),
        (b"Data: x\n\n", []),
        (b"id: 5\n\n", []),
        (b"\n\n\n", []),
    ],
    ids=[
        "multi-line-data-joined-by-lf",
        "no-space-after-colon",
        "only-one-space-stripped",
        "field-without-colon",
        "empty-data-lines",
        "colons-in-value",
        "event-type",
        "event-type-reset-after-dispatch",
        "event-type-reset-by-empty-dispatch",
        "unknown-field-ignored",
        "field-names-are-case-sensitive",
        "no-data-no-event",
        "blank-lines-alone",
    ],
)
def test_field_rules(raw: bytes, events: list[SSEEvent]) -> None:
    """WHATWG field parsing: data lines join with LF, one leading space is
    stripped, an event needs a data field, the event type lasts one event."""
    assert feed_all([raw]) == events


@pytest.mark.parametrize(
    ("raw", "ids"),
    [
        (b"id: 1\ndata: a\n\ndata: b\n\n", ["1", "1"]),
        (b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n", ["1", "2"]),
        (b"id: 1\ndata: a\n\nid\ndata: b\n\n", ["1", ""]),
        (b"id: 1\ndata: a\n\nid: x\0y\ndata: b\n\n", ["1", "1"]),
        (b"id: 3\n\ndata: a\n\n", ["3"]),
    ],
    ids=["persists", "replaced", "reset-by-empty-id", "nul-ignored", "set-without-dispatch"],
)
def test_last_event_id(raw: bytes, ids: list[str | None]) -> None:
    """The last event id persists across events until an `id` field changes it;
    an id containing NUL is ignored."""
    assert [ev.id for ev in feed_all([raw])] == ids


@pytest.mark.parametrize(
    ("value", "retry"),
    [
        (b"3000", 3000),
        (b"0", 0),
        (b"", None),
        (b"3.5", None),
        (b"-1", None),
        (b" 30", 30),
        (b"1e3", None),
        ("²".encode(), None),
        ("٣".encode(), None),
    ],
    ids=[
        "digits",
        "zero",
        "empty",
        "decimal",
        "negative",
        "one-space-stripped",
        "exponent",
        "superscript-digit",
        "arabic-indic-digit",
    ],
)
def test_retry_only_accepts_ascii_digits(value: bytes, retry: int | None) -> None:
    """`retry` is honoured only when its value is all ASCII digits; anything
    else (including Unicode digits) is ignored and never raises."""
    (ev,) = feed_all([b"retry:" + value + b"\ndata: x\n\n"])
    assert ev.retry == retry


def test_comments_are_counted_and_ignored() -> None:
    """A line starting with ':' is a comment: counted, never an event, and it
    does not end or disturb the event around it."""
    decoder = SSEDecoder()
    assert decoder.feed(b": ping\n\n:\ndata: a\n: mid\ndata: b\n\n") == [SSEEvent("a\nb")]
    assert decoder.comments == 3


def test_data_without_blank_line_is_not_dispatched() -> None:
    """An event is dispatched only by its blank line: a stream that ends before
    it yields nothing for that event, however it was split."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"data: b") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [SSEEvent("a\nb")]
    assert decoder.feed(b"data: never") == []


def test_invalid_utf8_is_replaced_not_raised() -> None:
    """Bytes that are not UTF-8 decode with U+FFFD instead of raising."""
    (ev,) = feed_all([b"data: \xff\xfe ok\n\n"])
    assert ev.data == "\ufffd\ufffd ok"


def test_multibyte_character_split_across_feeds() -> None:
    """A UTF-8 character split between two feeds decodes whole."""
    raw = "data: héllo €\n\n".encode()
    assert feed_all(split_every_byte(raw)) == [SSEEvent("héllo €")]


# -- the upstream's bytes decoder (SSEDataDecoder) ----------------------------

CORPUS = [
    b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n",
    b"id: 1\r\ndata: a\r\n\r\nid: 2\r\ndata: b\r\n\r\n",
    b"id: 1\rdata: a\r\rid: 2\rdata: b\r\r",
    b"data: a\ndata: b\n\n",
    b"data:a\n\ndata:  a\n\ndata\n\ndata:\ndata:\n\ndata: a:b: c\n\n",
    b"event: add\ndata: x\n\nevent: add\n\ndata: y\n\n",
    b"unknown: v\ndata: x\n\nData: x\n\nid: 5\n\n\n\n\n",
    b": ping\n\n:\ndata: a\n: mid\ndata: b\n\n",
    b"retry: 10\ndata: r\r\n\r\ndata: [DONE]\n\n",
    b'data: {"choices":[{"delta":{"content":"h\\u00e9"}}]}\n\ndata: [DONE]\n\n',
    "data: héllo €\r\n\r\n: c\rdata: \n\n".encode(),
    b"data: a\n\ndata: b\n\ndata: c\n\ndata: unfinished\n",
]


def data_of(raw: bytes, pieces: list[int]) -> list[bytes | bytearray]:
    """SSEDataDecoder's output for ``raw`` cut at ``pieces``."""
    decoder = sse.SSEDataDecoder()
    cuts = [0, *sorted(pieces), len(raw)]
    return [d for a, b in itertools.pairwise(cuts) for d in decoder.feed(raw[a:b])]


@pytest.mark.parametrize("raw", CORPUS)
def test_data_decoder_agrees_with_the_event_decoder(raw: bytes) -> None:
    """The upstream's bytes decoder yields exactly the data of the events the
    reference SSEDecoder dispatches (same line endings, joins, comments and
    dropped events), whole, byte by byte, and cut at 200 random places."""
    expected = [ev.data.encode() for ev in feed_all([raw])]
    assert data_of(raw, []) == expected
    assert data_of(raw, list(range(1, len(raw)))) == expected
    rng = random.Random(raw)
    for _ in range(200):
        cuts = rng.sample(range(1, len(raw)), rng.randint(1, min(4, len(raw) - 1)))
        assert data_of(raw, cuts) == expected, cuts


def test_data_decoder_one_token_per_feed() -> None:
    """The usual upstream read (one whole ``data:`` event) gives its data, and
    a following piece that is not one whole event still parses from a clean
    state."""
    decoder = sse.SSEDataDecoder()
    assert decoder.feed(b'data: {"a":1}\n\n') == [b'{"a":1}']
    assert decoder.feed(b"data: \n\n") == [b""]
    assert decoder.feed(b"data: x\n\ndata: y\n\n") == [b"x", b"y"]
    assert decoder.feed(b"data: [DONE]\n\n") == [b"[DONE]"]
    assert decoder.feed(b"data: part") == []
    assert decoder.feed(b"ial\n\n") == [b"partial"]


def test_data_decoder_crlf_split_between_feeds() -> None:
    """A CR ending one piece and the LF starting the next are one line
    ending, not two (which would dispatch an event early); an empty piece
    keeps the CR pending."""
    decoder = sse.SSEDataDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [b"a\nb"]
    assert decoder.feed(b"\ndata: c\n\n") == [b"c"]


def test_data_decoder_counts_comments() -> None:
    """Comments are counted and never become data."""
    decoder = sse.SSEDataDecoder()
    assert decoder.feed(b": ping\n: ping\ndata: a\n\n") == [b"a"]
    assert decoder.comments == 2


def test_data_decoder_accepts_bytearray() -> None:
    """h11 hands body data over as ``bytearray``: it decodes like bytes."""
    decoder = sse.SSEDataDecoder()
    assert decoder.feed(bytearray(b"data: a\n\n")) == [b"a"]
    assert decoder.feed(bytearray(b"data: b\r\n\r\n")) == [b"b"]
