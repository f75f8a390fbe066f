"""Plain synchronous tests of the load generator's sans-IO half.

``trio_stream/load/accounting.py`` (replies, outcomes, integrity, the report)
and ``trio_stream/load/plan.py`` (config, scenario plan, budget).  SSE bodies
are produced by the server's own encoder (``trio_stream/wire/chunks.py``), so the
parser is checked against exactly what the server sends, coalesced or not.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from trio_stream.core.log import Outcome as RunOutcome
from trio_stream.core.log import RunStatus
from trio_stream.load.accounting import (
    Integrity,
    Reply,
    RequestRecord,
    ServerFigures,
    Tally,
    build_report,
    check_reply,
    classify,
    count_anomalies,
    parse_metrics,
    percentile,
)
from trio_stream.load.accounting import (
    RequestOutcome as Outcome,
)
from trio_stream.load.display import report_table
from trio_stream.load.plan import (
    DEFAULT_REQUESTS,
    SCENARIOS,
    Budget,
    LoadConfig,
    chat_body,
    messages_for,
    plan_unit,
)
from trio_stream.upstream import mocktext
from trio_stream.wire import sse
from trio_stream.wire.chunks import ChunkEncoder

CONFIG = LoadConfig(max_tokens=40, seed=7)
MESSAGES = messages_for(CONFIG, 3)
N = CONFIG.max_tokens
TOKENS = list(mocktext.tokens(MESSAGES, N))
TEXT = "".join(TOKENS)
BASE = mocktext.prompt_base(MESSAGES)


def sse_body(tokens: Sequence[str], *, coalesce: bool, ending: bytes | None = None) -> bytes:
    """The SSE bytes the server writes for ``tokens``, then ``ending`` (default: finish + DONE)."""
    encoder = ChunkEncoder("chatcmpl-x", "mock", 0, coalesce=coalesce)
    head = encoder.render(list(tokens), 1)
    if ending is None:
        ending = encoder.terminal(RunOutcome(RunStatus.COMPLETED, "length"))
    return head + ending


def cancelled_ending(reason: str) -> bytes:
    encoder = ChunkEncoder("chatcmpl-x", "mock", 0, coalesce=True)
    return encoder.terminal(RunOutcome(RunStatus.CANCELLED, reason, "gone"))


def fed(body: bytes, *, pieces: int = 1, tally: Tally | None = None) -> Reply:
    """A reply fed ``body`` in ``pieces`` slices, at times 1.0, 2.0, ..."""
    reply = Reply(tally or Tally(), started=0.0)
    size = max(1, -(-len(body) // pieces))
    for i, start in enumerate(range(0, len(body), size)):
        reply.feed(body[start : start + size], float(i + 1))
    return reply


def record(reply: Reply, **kw: Any) -> RequestRecord:
    return RequestRecord(3, MESSAGES, N, reply, **kw)


# -- percentiles ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, 0.0),
        ([5.0], 99, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([float(i) for i in range(1, 101)], 90, 90.1),
        ([float(i) for i in range(1, 101)], 99, 99.01),
    ],
    ids=["empty", "single", "median-between", "p0", "p100", "p90", "p99"],
)
def test_percentile_interpolates_like_numpy(values: list[float], q: float, expected: float) -> None:
    """Percentiles interpolate linearly between ranks (numpy's default), and
    an empty sample reports 0.0 rather than failing the report."""
    assert percentile(values, q) == pytest.approx(expected)


# -- integrity --------------------------------------------------------------------------


def test_exact_reply_and_exact_prefix_are_clean() -> None:
    """The whole reply (complete) and any token-aligned prefix (cut early)
    count as checked with no anomaly."""
    assert check_reply(TEXT, MESSAGES, N, complete=True) == Integrity(checked_requests=1)
    for k in (0, 1, 17, N):
        prefix = "".join(TOKENS[:k])
        assert check_reply(prefix, MESSAGES, N, complete=False) == Integrity(checked_requests=1)


@pytest.mark.parametrize(
    ("tokens", "complete", "expected"),
    [
        (TOKENS[:5] + TOKENS[6:], True, Integrity(lost=1)),
        (TOKENS[:5] + TOKENS[6:20], False, Integrity(lost=1)),
        (TOKENS[:30], True, Integrity(lost=N - 30)),
        ([*TOKENS[:6], TOKENS[5], *TOKENS[6:]], True, Integrity(duplicated=1)),
        ([*TOKENS[:4], TOKENS[5], TOKENS[4], *TOKENS[6:]], True, Integrity(reordered=1)),
        ([*TOKENS[:10], " zzzz", *TOKENS[10:]], True, Integrity(foreign=1)),
        ([*TOKENS, " " + mocktext.word(BASE + N)], True, Integrity(foreign=1)),
        ([" " + TOKENS[0], *TOKENS[1:]], True, Integrity()),
    ],
    ids=[
        "lost-middle",
        "lost-middle-of-prefix",
        "complete-but-short",
        "duplicated",
        "reordered",
        "foreign-word",
        "beyond-reply",
        "extra-space-only",
    ],
)
def test_anomalies_are_counted(tokens: list[str], complete: bool, expected: Integrity) -> None:
    """Each kind of damage is counted as exactly that kind, and any damage
    marks the request mismatched."""
    found = check_reply("".join(tokens), MESSAGES, N, complete=complete)
    expected.mismatched = 1
    expected.checked_requests = 1
    assert found == expected


def test_prefix_cut_inside_a_word_is_a_mismatch() -> None:
    """A cut request's text must end where a token ends: half a word is not
    a prefix of the reply, even though the characters match."""
    text = TEXT[: len(TOKENS[0]) + 3]
    assert check_reply(text, MESSAGES, N, complete=False).mismatched == 1


def test_a_reply_to_other_messages_is_foreign() -> None:
    """Request A's text checked against request B's reply is caught: replies differ."""
    other = mocktext.expected_text(messages_for(CONFIG, 4), N)
    assert other != TEXT
    found = check_reply(other, MESSAGES, N, complete=True)
    assert found.mismatched == 1
    assert found.foreign + found.lost > 0


@given(
    dropped=st.sets(st.integers(0, N - 1)),
    doubled=st.sets(st.integers(0, N - 1)),
)
def test_lost_and_duplicated_counts_are_exact(dropped: set[int], doubled: set[int]) -> None:
    """Dropping any set of tokens and repeating any other set (in place)
    reports exactly that many lost and duplicated, and nothing reordered."""
    indices: list[int | None] = []
    for i in range(N):
        if i in dropped:
            continue
        indices.append(BASE + i)
        if i in doubled:
            indices.append(BASE + i)
    found = count_anomalies(indices, BASE, N, complete=True)
    assert (found.lost, found.duplicated, found.reordered) == (
        len(dropped),
        len(doubled - dropped),
        0,
    )


# -- replies ----------------------------------------------------------------------------


@pytest.mark.parametrize("coalesce", [False, True])
@pytest.mark.parametrize("pieces", [1, 7, 10_000])
def test_reply_counts_tokens_and_events_however_split(coalesce: bool, pieces: int) -> None:
    """Tokens are words and events are SSE data events (not [DONE], not
    pings), whatever the TCP segmentation; the text is the reply exactly."""
    body = sse.PING + sse_body(TOKENS, coalesce=coalesce)
    tally = Tally()
    reply = fed(body, pieces=pieces, tally=tally)
    events = 1 + 1 if coalesce else N + 1  # content event(s) + the finish chunk
    assert (reply.done, reply.text, reply.tokens, reply.events) == (True, TEXT, N, events)
    assert (tally.tokens, tally.events) == (N, events)
    assert reply.last_id == str(N)


def test_reply_timing_first_token_and_gaps() -> None:
    """TTFT is the first content event's time; gaps are measured between
    content events only, and never across a reconnect."""
    tally = Tally()
    reply = Reply(tally, started=0.5)
    encoder = ChunkEncoder("chatcmpl-x", "mock", 0, coalesce=False)
    reply.feed(encoder.render(TOKENS[:1], 1), 1.0)
    reply.feed(encoder.render(TOKENS[1:2], 2), 1.25)
    reply.reconnect()
    reply.feed(encoder.render(TOKENS[2:3], 3), 9.0)
    reply.feed(encoder.render(TOKENS[3:4], 4), 9.5)
    assert reply.first_token_at == 1.0
    assert list(tally.gaps) == [0.25, 0.5]
    assert reply.text == "".join(TOKENS[:4])


def test_reply_stops_counting_after_an_error_event() -> None:
    """An error event ends the reply: it is recorded, and anything after it
    (a server bug) is ignored rather than counted."""
    body = sse_body(TOKENS[:5], coalesce=False, ending=cancelled_ending("superseded"))
    reply = fed(body + sse_body(TOKENS[5:6], coalesce=False))
    assert reply.error is not None
    assert reply.error["code"] == "superseded"
    assert (reply.tokens, reply.events, reply.finished) == (5, 6, True)


def test_reply_flags_garbage() -> None:
    """A data event that is not a chunk or an error object is a protocol error."""
    reply = fed(b'data: {"choices": 3}\n\n')
    assert reply.protocol_error == "bad_event"
    assert classify(record(reply, status=200)) == Outcome("failed", "bad_event")


# -- outcomes ---------------------------------------------------------------------------


def _reply(body: bytes) -> Reply:
    return fed(body)


DONE_BODY = sse_body(TOKENS, coalesce=True)
PARTIAL_BODY = sse_body(TOKENS[:5], coalesce=True, ending=b"")


@pytest.mark.parametrize(
    ("body", "kw", "expected"),
    [
        (DONE_BODY, {"status": 200, "problem": "timeout"}, Outcome("failed", "timeout")),
        (b"", {"cut": True}, Outcome("cancelled", "client_disconnect")),
        (b"", {}, Outcome("failed", "no_response")),
        (b"", {"status": 429}, Outcome("failed", "http_429")),
        (DONE_BODY, {"status": 200}, Outcome("ok")),
        (
            PARTIAL_BODY + cancelled_ending("stopped"),
            {"status": 200},
            Outcome("cancelled", "stopped"),
        ),
        (
            PARTIAL_BODY + b'data: {"error":{"type":"upstream_error","code":null}}\n\n',
            {"status": 200},
            Outcome("failed", "upstream_error"),
        ),
        (PARTIAL_BODY, {"status": 200, "cut": True}, Outcome("cancelled", "client_disconnect")),
        (PARTIAL_BODY, {"status": 200}, Outcome("failed", "truncated")),
    ],
    ids=[
        "1-problem",
        "2-cut-before-head",
        "2-no-head",
        "3-status",
        "4-done",
        "5-cancelled",
        "6-upstream-error",
        "7-cut",
        "8-truncated",
    ],
)
def test_classify_follows_the_table(body: bytes, kw: dict[str, Any], expected: Outcome) -> None:
    """Every row of the outcome table in accounting's docstring, in order."""
    assert classify(record(_reply(body), **kw)) == expected


def test_tally_counts_outcomes_and_checks_only_answered_requests() -> None:
    """ok/failed/cancelled add up to total; cancellations are keyed by code,
    failures by kind; only 200 answers are integrity-checked."""
    tally = Tally()
    tally.finish(record(fed(DONE_BODY, tally=tally), status=200))
    cut = fed(PARTIAL_BODY, tally=tally)
    tally.finish(record(cut, status=200, cut=True))
    tally.finish(record(Reply(tally, 0.0), status=503))
    superseded = fed(PARTIAL_BODY + cancelled_ending("superseded"), tally=tally)
    tally.finish(record(superseded, status=200))
    assert (tally.total, tally.ok, tally.cancelled, tally.failed) == (4, 1, 2, 1)
    assert tally.cancelled_by == {"client_disconnect": 1, "superseded": 1}
    assert tally.errors == {"http_503": 1}
    assert tally.integrity == Integrity(checked_requests=3)
    assert tally.tokens == N + 5 + 5
    assert len(tally.ttft) == 3


# -- server figures and the report -------------------------------------------------------

METRICS = """\
# HELP trio_stream_tasks_living trio's tasks_living at scrape time.
# TYPE trio_stream_tasks_living gauge
trio_stream_tasks_living 17.0
process_resident_memory_bytes 5.4525952e+07
trio_stream_active_streams 0.0
trio_stream_runs_total{outcome="completed"} 3.0
"""


def test_parse_metrics_reads_our_figures_and_tolerates_absence() -> None:
    """The figures come from the exposition text; a server without them
    (a peer with no /metrics) reports None, and NaN is treated as absent."""
    assert parse_metrics(METRICS) == ServerFigures(17, 54_525_952, 0, None)
    assert parse_metrics("") == ServerFigures()
    assert parse_metrics("trio_stream_tasks_living NaN\n").tasks_living is None


REPORT_SHAPE: dict[str, Any] = {
    "scenario": str,
    "http2": bool,
    "concurrency": int,
    "wall_s": float,
    "requests": {"total": int, "ok": int, "failed": int, "cancelled": int},
    "tokens": int,
    "events": int,
    "tokens_per_s": float,
    "events_per_s": float,
    "ttft_ms": {"p50": float, "p90": float, "p99": float, "max": float},
    "gap_ms": {"p50": float, "p99": float},
    "integrity": {"lost": int, "duplicated": int, "reordered": int, "checked_requests": int},
    "server": {
        "tasks_living_before": (int, type(None)),
        "tasks_living_after": (int, type(None)),
        "rss_before": (int, type(None)),
        "rss_after": (int, type(None)),
    },
    "client": {"cpu_s": float, "cpu_percent": float},
    "errors": dict,
}


def assert_shape(value: Any, shape: Any, where: str = "report") -> None:
    if isinstance(shape, dict):
        assert isinstance(value, dict), where
        for key, sub in shape.items():
            assert key in value, f"{where}.{key} missing"
            assert_shape(value[key], sub, f"{where}.{key}")
    else:
        assert isinstance(value, shape), where
        assert shape is not int or not isinstance(value, bool), where


def test_report_has_the_documented_shape() -> None:
    """The report keeps every key and type other tools parse (keys may be
    added, never renamed), with rates over wall time and CPU % of wall."""
    tally = Tally()
    tally.finish(record(fed(DONE_BODY, tally=tally), status=200))
    tally.side_error("cancel_http_404")
    report = build_report(
        scenario="steady", http2=False, concurrency=4, wall_s=2.0, tally=tally,
        before=ServerFigures(10, 1000), after=ServerFigures(), cpu_s=0.5,
    )  # fmt: skip
    assert_shape(report, REPORT_SHAPE)
    assert report["tokens_per_s"] == N / 2
    assert report["client"] == {"cpu_s": 0.5, "cpu_percent": 25.0}
    assert report["server"]["tasks_living_after"] is None
    assert report["errors"] == {"cancel_http_404": 1}
    assert report["ttft_ms"]["p50"] == 1000.0  # the body arrived at t=1.0


def test_report_table_renders_the_figures() -> None:
    """The rich table shows the counts and flags a clean integrity check."""
    tally = Tally()
    tally.finish(record(fed(DONE_BODY, tally=tally), status=200))
    report = build_report(
        scenario="mixed", http2=True, concurrency=1, wall_s=1.0, tally=tally,
        before=ServerFigures(), after=ServerFigures(), cpu_s=0.1,
    )  # fmt: skip
    out = io.StringIO()
    Console(file=out, width=120).print(report_table(report))
    text = out.getvalue()
    assert "mixed, HTTP/2" in text
    assert "1 / 0 / 0  (of 1)" in text
    assert "0 / 0 / 0  (1 checked)" in text


# -- the plan ---------------------------------------------------------------------------


def test_plan_is_a_pure_function_of_seed_and_number() -> None:
    """Request n of a seed always gets the same unit, so runs are
    reproducible however requests interleave; other seeds differ."""
    config = LoadConfig(scenario="mixed", seed=3)
    units = [plan_unit(config, n) for n in range(200)]
    assert units == [plan_unit(config, n) for n in range(200)]
    assert units != [plan_unit(config.replace(seed=4), n) for n in range(200)]
    assert {u.kind for u in units} == set(SCENARIOS) - {"mixed"}


@pytest.mark.parametrize("scenario", ["disconnect", "stop", "resume"])
def test_cut_points_stay_inside_the_reply(scenario: str) -> None:
    """Disconnects happen before the last token (0 = before any), and stops
    and drops within the first half, so they act on a running stream."""
    config = LoadConfig(scenario=scenario, max_tokens=20)
    cuts = {plan_unit(config, n).cut_after for n in range(300)}
    low = 0 if scenario == "disconnect" else 1
    high = 19 if scenario == "disconnect" else 10
    assert min(cuts) == low
    assert max(cuts) == high


def test_budget_by_count_and_by_deadline() -> None:
    """--requests caps the numbers handed out (a group may get fewer);
    --duration stops new units at the deadline; neither means 100."""
    budget = Budget(5, None)
    assert [budget.next(0.0) for _ in range(3)] == [0, 1, 2]
    assert budget.extend(3) == [3, 4]
    assert budget.next(0.0) is None
    timed = Budget(None, deadline=10.0)
    assert timed.next(9.9) == 0
    assert timed.next(10.0) is None
    assert LoadConfig().request_limit == DEFAULT_REQUESTS
    assert LoadConfig(duration=1.0).request_limit is None


def test_config_validation_names_every_problem() -> None:
    """An invalid config is refused with every problem named at once."""
    with pytest.raises(ValueError, match="scenario") as info:
        LoadConfig(scenario="nope", concurrency=0, max_tokens=0).validate()
    assert "--concurrency" in str(info.value)
    assert "--max-tokens" in str(info.value)


def test_each_request_gets_its_own_reply() -> None:
    """Messages differ per request, so replies differ and a reply delivered
    to the wrong request cannot pass the check."""
    texts = {mocktext.expected_text(messages_for(CONFIG, n), 8) for n in range(50)}
    assert len(texts) == 50
    assert b'"detach":true' in chat_body(CONFIG, MESSAGES, detach=True)
    assert b"detach" not in chat_body(CONFIG, MESSAGES, detach=False)
