"""The pure decision of how a run ends (trio_stream.core.lifecycle), case by case."""

from __future__ import annotations

import pytest

from trio_stream.core.lifecycle import ending
from trio_stream.core.log import Outcome, RunStatus

DONE = Outcome(RunStatus.COMPLETED, "stop")
SUPERSEDED = Outcome(RunStatus.CANCELLED, "superseded")
FAILED = Outcome(RunStatus.FAILED, "upstream_error")


@pytest.mark.parametrize(
    ("outcome", "status"),
    [(DONE, "complete"), (SUPERSEDED, "partial"), (FAILED, "failed")],
)
def test_saved_status_follows_the_outcome(outcome: Outcome, status: str) -> None:
    """Rule 2: completed -> complete, cancelled -> partial, failed -> failed."""
    assert ending(outcome, events=3, detached=False, fenced=False).save_status == status


def test_a_run_without_events_is_not_saved() -> None:
    """Rule 1: nothing produced, nothing saved, whatever the outcome."""
    for outcome in (DONE, SUPERSEDED, FAILED):
        assert ending(outcome, events=0, detached=True, fenced=False).save_status is None


def test_only_an_unfenced_superseded_run_finished_cleanly() -> None:
    """Rule 3: a fenced straggler never logs prev_stream_finished_cleanly."""
    assert ending(SUPERSEDED, events=1, detached=False, fenced=False).clean_supersede
    assert not ending(SUPERSEDED, events=1, detached=False, fenced=True).clean_supersede
    assert not ending(DONE, events=1, detached=False, fenced=False).clean_supersede


def test_detached_runs_log_their_end_and_stay_readable() -> None:
    """Rule 4: the cleanup of a detached run logs stream_end and keeps it for
    --run-ttl; an attached run leaves memory at once."""
    detached = ending(DONE, events=1, detached=True, fenced=False)
    attached = ending(DONE, events=1, detached=False, fenced=False)
    assert (detached.log_end, detached.keep) == (True, True)
    assert (attached.log_end, attached.keep) == (False, False)
    assert attached.outcome == "completed"
