"""Plain synchronous tests of the run log and its state machine (trio_stream/core/log.py)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest

from trio_stream.core.lifecycle import SAVED_STATUS
from trio_stream.core.log import (
    Chunk,
    Entry,
    IllegalTransition,
    LogClosed,
    Outcome,
    RunLog,
    RunStatus,
    merge,
)

TERMINAL = (RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED)
REASONS = {
    RunStatus.RUNNING: "running",
    RunStatus.COMPLETED: "stop",
    RunStatus.CANCELLED: "superseded",
    RunStatus.FAILED: "upstream_error",
}


def log_in(status: RunStatus) -> RunLog:
    log = RunLog()
    log.append("x")
    if status is not RunStatus.RUNNING:
        log.end(Outcome(status, REASONS[status]))
    return log


def outcome(status: RunStatus) -> Outcome:
    return Outcome(status, REASONS[status])


# Every (from, to) pair: legal exactly when from is RUNNING and to is terminal.
MOVES = list(itertools.product(RunStatus, RunStatus))
LEGAL = [(a, b) for a, b in MOVES if a is RunStatus.RUNNING and b in TERMINAL]
ILLEGAL = [m for m in MOVES if m not in LEGAL]


def move_id(move: tuple[RunStatus, RunStatus]) -> str:
    return f"{move[0].value}->{move[1].value}"


@pytest.mark.parametrize("move", LEGAL, ids=move_id)
def test_legal_moves(move: tuple[RunStatus, RunStatus]) -> None:
    """Rule 1: RUNNING moves to each terminal state, keeping the outcome."""
    source, target = move
    log = log_in(source)
    log.end(outcome(target))
    assert log.status is target
    assert log.outcome == outcome(target)


@pytest.mark.parametrize("move", ILLEGAL, ids=move_id)
def test_illegal_moves_raise_and_change_nothing(move: tuple[RunStatus, RunStatus]) -> None:
    """Rule 1: a run leaves RUNNING exactly once; every other move (including
    RUNNING->RUNNING and any move out of a terminal state) raises
    IllegalTransition and leaves the outcome as it was."""
    source, target = move
    log = log_in(source)
    before = log.outcome
    with pytest.raises(IllegalTransition, match=f"{source.value} -> {target.value}"):
        log.end(outcome(target))
    assert log.outcome == before
    assert log.status is source


def test_every_status_has_a_saved_status() -> None:
    """Each terminal state maps to the messages table's status, and RUNNING to none."""
    assert SAVED_STATUS == {
        RunStatus.COMPLETED: "complete",
        RunStatus.CANCELLED: "partial",
        RunStatus.FAILED: "failed",
    }


@pytest.mark.parametrize("status", TERMINAL, ids=lambda s: s.value)
def test_append_after_end_raises(status: RunStatus) -> None:
    """Rule 2: after the run ends nothing more is appended, so saved content is fixed."""
    log = log_in(status)
    with pytest.raises(LogClosed):
        log.append("late")
    with pytest.raises(LogClosed):
        log.append(Chunk.of({"refusal": "no"}))
    assert log.content == "x"
    assert log.last_seq == 1


def test_append_after_fence_raises_but_finish_is_still_allowed() -> None:
    """Rule 4: a fenced run can append nothing; it still records how it ended
    (its cleanup needs an outcome to save)."""
    log = log_in(RunStatus.RUNNING)
    log.fence()
    assert log.fenced
    with pytest.raises(LogClosed):
        log.append("late")
    assert log.last_seq == 1
    log.end(outcome(RunStatus.CANCELLED))
    assert log.status is RunStatus.CANCELLED


def test_sequence_numbers_start_at_one_without_gaps() -> None:
    """Rule 3: append returns 1, 2, 3 ...; entry n is read(n - 1)[0]."""
    log = RunLog()
    entries: list[Entry] = ["a", Chunk.of({"refusal": "r"}), "b", "c"]
    assert [log.append(e) for e in entries] == [1, 2, 3, 4]
    assert log.last_seq == 4
    for n, entry in enumerate(entries, start=1):
        assert log.read(n - 1)[0] == entry


@pytest.mark.parametrize(
    ("cursor", "limit", "expected"),
    [
        (0, None, ["a", "b", "c"]),
        (1, None, ["b", "c"]),
        (3, None, []),
        (10, None, []),
        (0, 2, ["a", "b"]),
        (1, 1, ["b"]),
        (2, 5, ["c"]),
        (3, 1, []),
    ],
    ids=[
        "from-start",
        "after-1",
        "at-end",
        "past-end",
        "limited",
        "limited-mid",
        "limit-past-end",
        "limited-at-end",
    ],
)
def test_read_cursor(cursor: int, limit: int | None, expected: list[str]) -> None:
    """Rule 3: read(cursor) is what comes after the last seen sequence number,
    at most `limit` entries; a cursor at or past the end reads nothing."""
    log = RunLog()
    for e in "abc":
        log.append(e)
    assert log.read(cursor, limit) == expected


def test_read_rejects_negative_cursor() -> None:
    """A negative cursor is a caller bug, not an empty read."""
    with pytest.raises(ValueError, match="cursor"):
        RunLog().read(-1)


def test_read_works_after_end() -> None:
    """A finished run is replayed whole: reading does not depend on the status."""
    log = log_in(RunStatus.CANCELLED)
    assert log.read(0) == ["x"]


def test_content_is_text_entries_only() -> None:
    """content joins the text deltas in order and skips tool deltas."""
    log = RunLog()
    entries: list[Entry] = ["Hel", Chunk.of({"refusal": "?"}), "lo", " world"]
    for e in entries:
        log.append(e)
    assert log.content == "Hello world"


def call(index: int, **fields: object) -> Chunk:
    return Chunk.of({"tool_calls": [{"index": index, **fields}]})


def test_tool_calls_are_merged_by_index() -> None:
    """Tool-call deltas merge per index: id/type from the first, name and
    arguments concatenated in arrival order, calls sorted by index."""
    log = RunLog()
    entries: list[Entry] = [
        call(1, id="b", type="function", function={"name": "g", "arguments": ""}),
        call(0, id="a", type="function", function={"name": "f"}),
        call(0, function={"arguments": '{"x"'}),
        "text",
        call(1, function={"arguments": "{}"}),
        call(0, function={"arguments": ": 1}"}),
    ]
    for e in entries:
        log.append(e)
    assert log.tool_calls == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    assert log.content == "text"


def test_tool_call_defaults() -> None:
    """A call without index is index 0; without type it is a "function" call."""
    log = RunLog()
    log.append(Chunk.of({"tool_calls": [{"function": {"name": "f"}}]}))
    assert log.tool_calls == [
        {"id": None, "type": "function", "function": {"name": "f", "arguments": ""}}
    ]


def test_no_tool_calls() -> None:
    """A run without tool deltas (or with non-call deltas) has no tool calls."""
    log = RunLog()
    log.append("a")
    log.append(Chunk.of({"refusal": "no"}))
    assert log.tool_calls == []


def lp(*tokens: str) -> dict[str, list[dict[str, object]]]:
    return {"content": [{"token": t, "logprob": -1.0} for t in tokens]}


def chunk(delta: Mapping[str, object], **choice: object) -> Chunk:
    body = {"object": "chat.completion.chunk", "system_fingerprint": "fp",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None,
                         **choice}]}  # fmt: skip
    return Chunk(body)


def test_merge_is_exact_or_nothing() -> None:
    """Issue 20 item 1's coalescing rule: two entries merge only when nothing
    is lost -- text fields concatenate, logprobs lists concatenate, every
    other field must be equal in both (finish_reason, usage, obfuscation,
    a tool-call fragment, a different delta key: never merged across)."""
    a = chunk({"reasoning_content": "Hm"}, logprobs=lp("H"))
    b = chunk({"reasoning_content": "m."}, logprobs=lp("m"))
    merged = merge(a, b, None)
    assert isinstance(merged, Chunk)
    assert merged.delta == {"reasoning_content": "Hmm."}
    assert merged.choice is not None
    assert merged.choice["logprobs"] == lp("H", "m")
    assert merged.body["system_fingerprint"] == "fp"
    assert merge("a", "b", None) == "ab"
    shape = chunk({"content": "He"})
    shape = Chunk(shape.body, shape=True)
    assert merge(shape, "llo", shape) == "Hello"
    text = chunk({"content": "x"})
    for other in (
        chunk({"content": "y"}, finish_reason="stop"),
        chunk({"content": "y"}, stop_reason=None),
        chunk({"refusal": "y"}),
        chunk({"content": "y"}, logprobs=lp("y")),
        Chunk({**chunk({"content": "y"}).body, "obfuscation": "abc"}),
        Chunk({**chunk({"content": "y"}).body, "usage": {"prompt_tokens": 1}}),
        "y",
    ):
        assert merge(text, other, None) is None, other
    call = {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}
    other_call = {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}
    assert merge(chunk(call), chunk(other_call), None) is None


def test_answer_aggregates_what_the_chunks_carried() -> None:
    """RunLog.answer(): texts per field concatenated, logprobs lists joined,
    the refusal kept (content null), other choice/chunk fields their last
    non-null value, the tail's fields too."""
    log = RunLog()
    log.append(chunk({"role": "assistant", "content": ""}))
    log.append(chunk({"refusal": "I can"}, logprobs=lp("I")))
    log.append(chunk({"refusal": "not."}, logprobs=lp("not")))
    log.append(chunk({}, finish_reason="stop", stop_reason=None))
    log.set_tail((Chunk({"choices": [], "usage": {"prompt_tokens": 1}, "service_tier": "x"}),))
    answer = log.answer()
    assert answer.message == {"role": "assistant", "content": None, "refusal": "I cannot."}
    assert answer.logprobs == lp("I", "not")
    assert answer.finish_reason == "stop"
    assert answer.choice_extra == {"stop_reason": None}
    assert answer.chunk_extra == {"system_fingerprint": "fp", "service_tier": "x"}
    assert log.usage == {"prompt_tokens": 1}
    assert log.finished
