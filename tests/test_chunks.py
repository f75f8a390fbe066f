"""Plain synchronous tests of OpenAI chunk encoding (trio_stream/wire/chunks.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from trio_stream.core.log import Chunk, Entry, Outcome, RunLog, RunStatus
from trio_stream.errors import INTERNAL_MESSAGE
from trio_stream.wire.chunks import ChunkEncoder, cancel_error
from trio_stream.wire.sse import SSEDecoder, SSEEvent

CID = "chatcmpl-abc"
MODEL = 'm "quoted"'
CREATED = 1_700_000_000

CALL_START = Chunk.of(
    {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}}]}
)
CALL_ARGS = Chunk.of({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]})


def encoder(coalesce: bool) -> ChunkEncoder:
    return ChunkEncoder(CID, MODEL, CREATED, coalesce=coalesce)


def decode(raw: bytes) -> list[SSEEvent]:
    return SSEDecoder().feed(raw)


def chunks(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """(event id, parsed chunk) for each event; every event must carry an id."""
    out = []
    for ev in decode(raw):
        assert ev.id is not None
        out.append((int(ev.id), orjson.loads(ev.data)))
    return out


def assert_openai_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    """Check the chat.completion.chunk envelope; return the single choice."""
    assert chunk["id"] == CID
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["created"] == CREATED
    assert chunk["model"] == MODEL
    (choice,) = chunk["choices"]
    assert choice["index"] == 0
    assert set(choice) == {"index", "delta", "finish_reason"}
    return dict(choice)


def render(entries: Sequence[Entry], first_seq: int, coalesce: bool) -> list[tuple[int, Any]]:
    """(event id, delta) pairs of one render call, checking each envelope."""
    out = []
    for seq, chunk in chunks(encoder(coalesce).render(entries, first_seq)):
        choice = assert_openai_chunk(chunk)
        assert choice["finish_reason"] is None
        out.append((seq, choice["delta"]))
    return out


ROLE = {"role": "assistant"}


@pytest.mark.parametrize(
    ("entries", "first_seq", "coalesce", "expected"),
    [
        (
            ["a", "b", "c"],
            1,
            True,
            [(3, {**ROLE, "content": "abc"})],
        ),
        (
            ["a", "b", "c"],
            1,
            False,
            [(1, {**ROLE, "content": "a"}), (2, {"content": "b"}), (3, {"content": "c"})],
        ),
        (
            ["d", "e"],
            4,
            True,
            [(5, {"content": "de"})],
        ),
        (
            ["d", "e"],
            4,
            False,
            [(4, {"content": "d"}), (5, {"content": "e"})],
        ),
        (
            ["a", CALL_START, CALL_ARGS, "b", "c"],
            1,
            True,
            [
                (1, {**ROLE, "content": "a"}),
                (2, CALL_START.delta),
                (3, CALL_ARGS.delta),
                (5, {"content": "bc"}),
            ],
        ),
        (
            [CALL_START, "a"],
            1,
            True,
            [(1, {**ROLE, **CALL_START.delta}), (2, {"content": "a"})],
        ),
        (
            [CALL_START, CALL_ARGS],
            7,
            True,
            [(7, CALL_START.delta), (8, CALL_ARGS.delta)],
        ),
        (["x"], 1, True, [(1, {**ROLE, "content": "x"})]),
        ([], 3, True, []),
    ],
    ids=[
        "coalesced-from-1",
        "separate-from-1",
        "coalesced-later",
        "separate-later",
        "tool-deltas-split-runs",
        "tool-delta-first-gets-role",
        "tool-deltas-never-merged",
        "single",
        "empty",
    ],
)
def test_render(
    entries: list[Entry], first_seq: int, coalesce: bool, expected: list[tuple[int, Any]]
) -> None:
    """Each event's id is the last sequence number it carries; only the event
    holding seq 1 has role=assistant; coalesce merges adjacent text deltas and
    never tool deltas; every event is a valid OpenAI chunk."""
    assert render(entries, first_seq, coalesce) == expected


def test_render_escapes_json() -> None:
    """Content with quotes, backslashes, newlines and non-ASCII stays valid
    JSON and one SSE event (no raw newline in the data line)."""
    text = 'he said "hi"\\\n\r\t é 😀 </script>'
    raw = encoder(True).render([text, "!"], 2)
    assert raw.count(b"\n\n") == 1
    assert render([text, "!"], 2, True) == [(3, {"content": text + "!"})]


def test_render_batch_is_one_bytes_object_even_uncoalesced() -> None:
    """coalesce=False still returns the whole batch as one bytes (one send)."""
    raw = encoder(False).render(["a", "b"], 1)
    assert isinstance(raw, bytes)
    assert [ev.id for ev in decode(raw)] == ["1", "2"]


@pytest.mark.parametrize("reason", ["stop", "length", "tool_calls"])
def test_finish(reason: str) -> None:
    """finish() is one chunk with an empty delta and the finish_reason, then [DONE]."""
    events = decode(encoder(True).finish(reason))
    assert [ev.data for ev in events][-1] == "[DONE]"
    (last,) = events[:-1]
    choice = assert_openai_chunk(orjson.loads(last.data))
    assert choice == {"index": 0, "delta": {}, "finish_reason": reason}


@pytest.mark.parametrize(
    ("outcome", "error"),
    [
        (
            Outcome(RunStatus.CANCELLED, "superseded"),
            ("stream_cancelled", "superseded", "The run was cancelled (superseded)."),
        ),
        (
            Outcome(RunStatus.CANCELLED, "stopped", "Stopped by the user."),
            ("stream_cancelled", "stopped", "Stopped by the user."),
        ),
        (
            Outcome(RunStatus.FAILED, "upstream_error"),
            ("upstream_error", "upstream_error", "The upstream failed."),
        ),
        (
            Outcome(RunStatus.FAILED, "upstream_error", "HTTP 500"),
            ("upstream_error", "upstream_error", "HTTP 500"),
        ),
        # A crash is the server's fault: never an upstream error (issue 18).
        (
            Outcome(RunStatus.FAILED, "internal_error", INTERNAL_MESSAGE),
            ("server_error", "internal_error", INTERNAL_MESSAGE),
        ),
        (
            Outcome(RunStatus.FAILED, "internal_error"),
            ("server_error", "internal_error", INTERNAL_MESSAGE),
        ),
    ],
    ids=[
        "cancelled-default", "cancelled-message", "failed-default", "failed-message",
        "crashed", "crashed-default",
    ],
)  # fmt: skip
def test_terminal_error_event(outcome: Outcome, error: tuple[str, str, str]) -> None:
    """A run that ended early ends its stream with exactly one OpenAI error
    event (type, code, message) and no [DONE]."""
    assert cancel_error(outcome) == error
    (ev,) = decode(encoder(True).terminal(outcome))
    type_, code, message = error
    assert orjson.loads(ev.data) == {
        "error": {"message": message, "type": type_, "param": None, "code": code}
    }


def test_terminal_completed_is_finish() -> None:
    """A completed run's terminal bytes are exactly finish(reason)."""
    enc = encoder(True)
    assert enc.terminal(Outcome(RunStatus.COMPLETED, "length")) == enc.finish("length")


def completed_log(entries: Sequence[Entry], reason: str = "stop") -> RunLog:
    log = RunLog()
    for entry in entries:
        log.append(entry)
    log.end(Outcome(RunStatus.COMPLETED, reason))
    return log


def test_completion_object_text() -> None:
    """stream:false answers one chat.completion object with the whole text
    (and logprobs null, as OpenAI's non-streamed answer has it)."""
    obj = orjson.loads(encoder(True).completion(completed_log(["Hel", "lo"], "length")))
    assert obj == {
        "id": CID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
    }


@pytest.mark.parametrize(
    ("entries", "content"),
    [([CALL_START, CALL_ARGS], None), (["ok", CALL_START, CALL_ARGS], "ok")],
    ids=["tool-only-content-null", "text-and-tools"],
)
def test_completion_object_tool_calls(entries: list[Entry], content: str | None) -> None:
    """Tool-call deltas are merged into message.tool_calls; content is null
    when the model produced only tool calls."""
    obj = orjson.loads(encoder(True).completion(completed_log(entries, "tool_calls")))
    (choice,) = obj["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x":'}}
        ],
    }
