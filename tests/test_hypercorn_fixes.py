"""trio_stream.hypercorn_fixes: a process-wide patch, applied only where it belongs.

The patch replaces a private method of hypercorn, so it is applied only to
the release it was written for.  A canary drives hypercorn's *own* method and
fails as soon as that method no longer has the bug: on an upgrade, it says
whether the fix (and its version pin) can go.  The fixed method itself is
tested in ``tests/test_stall.py``.
"""

from __future__ import annotations

import io

import pytest
import trio
import trio.testing
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, StreamBuffer
from hypercorn.trio.worker_context import EventWrapper

from trio_stream import EventLogger, RecordingSink, hypercorn_fixes


def recording_logger() -> tuple[EventLogger, RecordingSink]:
    sink = RecordingSink()
    return EventLogger(sink=sink, stream=io.StringIO()), sink


async def test_canary_hypercorn_pop_still_resumes_a_writer_on_a_zero_byte_pop() -> None:
    """hypercorn's own StreamBuffer.pop (unpatched) still has the bug the fix
    exists for: with the client's window at 0, a 0-byte pop resumes a writer
    paused at the high-water mark, although nothing was drained.  If this
    fails, hypercorn fixed it: drop the fix (or re-pin FIXED_VERSION)."""
    assert hypercorn_fixes.original_pop.__module__ == "hypercorn.protocol.h2"
    buffer = StreamBuffer(EventWrapper)
    pushed = trio.Event()

    async def writer() -> None:
        await buffer.push(b"x" * BUFFER_HIGH_WATER)  # pauses: the buffer is full
        pushed.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert not pushed.is_set()
            assert await hypercorn_fixes.original_pop(buffer, 0) == b""  # window 0
            await trio.testing.wait_all_tasks_blocked()
            assert pushed.is_set(), (
                "hypercorn's StreamBuffer.pop no longer resumes the writer on a 0-byte pop: "
                "trio_stream.hypercorn_fixes may be unneeded"
            )
            nursery.cancel_scope.cancel()
    assert len(buffer.buffer) == BUFFER_HIGH_WATER  # resumed, yet nothing drained


def test_fix_is_not_applied_to_another_hypercorn_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """On any hypercorn other than FIXED_VERSION, apply() leaves hypercorn's
    StreamBuffer.pop as it is, says so (False), and logs
    hypercorn_fix_skipped with the version found."""
    monkeypatch.setattr(StreamBuffer, "pop", hypercorn_fixes.original_pop)
    monkeypatch.setattr(hypercorn_fixes, "hypercorn_version", lambda: "0.19.0")
    logger, sink = recording_logger()
    assert hypercorn_fixes.apply(logger) is False
    assert StreamBuffer.pop is hypercorn_fixes.original_pop
    assert not hypercorn_fixes.applied()
    (record,) = sink.events("hypercorn_fix_skipped")
    assert (record["hypercorn"], record["written_for"]) == ("0.19.0", hypercorn_fixes.FIXED_VERSION)


def test_fix_is_applied_to_its_hypercorn_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """On FIXED_VERSION, apply() installs the fix, idempotently, and logs nothing."""
    monkeypatch.setattr(StreamBuffer, "pop", hypercorn_fixes.original_pop)
    monkeypatch.setattr(hypercorn_fixes, "hypercorn_version", lambda: hypercorn_fixes.FIXED_VERSION)
    logger, sink = recording_logger()
    assert hypercorn_fixes.apply(logger) is True
    assert hypercorn_fixes.apply(logger) is True
    assert hypercorn_fixes.applied()
    assert not sink.records
