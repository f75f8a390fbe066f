"""A run's lifecycle, one table for the whole package -- sans-IO.

Every word for where a run is in its life is defined here, and the code,
the logs, the metrics and docs/design.md use these words and no others.

State table (h11's style: state, event -> next state, and who makes the move)::

    RUNNING  --end(outcome)--> ENDED      Run.end (RunLog.end): the outcome is
                                          fixed, once: completed | cancelled |
                                          failed (RunStatus, its table in
                                          trio_stream.core.log)
    RUNNING  --fence-------->  RUNNING    Run.fence: it outlived its successor's
    ENDED    --fence-------->  ENDED      supersede deadline (FENCED, a flag)
    ENDED    --cleanup------>  FINISHED   RunManager._cleanup, in order: save
                                          (runs.saving.save_run), release its
                                          session (SharedState.release,
                                          SessionTable.release), then
                                          Run.finished() sets Run.done and
                                          SharedState.finished tells the other
                                          nodes (G5)
    FINISHED --forget------->  FORGOTTEN  at once for an attached run (its
                                          request has it); --run-ttl later for a
                                          detached one (runs.expiry.Expiry)

Predicates: a run is *live* from RUNNING until FINISHED
(``RunManager.live`` counts them, ``trio_stream_active_runs``); it is
*settled* (``Run.settled``: nothing about it will change any more) once
FINISHED or FENCED.

Logs and metrics of the moves: ``stream_start`` when a run is RUNNING;
``stream_cancelled`` (and ``trio_stream_cancellations_total``) on a
cancelled or failed end; ``prev_stream_timeout_on_cancel`` on a fence; in
the cleanup ``trio_stream_runs_total{outcome}`` (the RunStatus), and
``stream_end`` -- from the cleanup for a detached run, from its request for
an attached one (rule 4).

Rule 1: a run that produced no event is not saved: there is nothing to keep.
Rule 2: a saved run's status follows its outcome (:data:`SAVED_STATUS`, the
        one mapping between a RunStatus and the ``messages.status`` column,
        both ways): completed -> ``complete``, cancelled -> ``partial``,
        failed -> ``failed``.
Rule 3: a superseded run that finished before its successor's deadline logs
        ``prev_stream_finished_cleanly``; a fenced one does not (its successor
        already logged ``prev_stream_timeout_on_cancel``).
Rule 4: a detached run logs ``stream_end`` from its own cleanup and stays
        readable for ``--run-ttl``; an attached run's ``stream_end`` is logged
        by its request, and it leaves memory at once.

The trio driver (:mod:`trio_stream.runs.manager`) asks :func:`ending` once,
in the one ``finally`` that ends a run, and carries the answer out.  Keeping
the decision here makes it a table that synchronous tests can check case by
case, and lets every backend of the shared state end a run the same way.

This module never imports trio.
"""

from __future__ import annotations

from dataclasses import dataclass

from .log import Outcome, RunStatus

#: Rule 2: how an ended run is saved (the ``status`` column of ``messages``).
SAVED_STATUS = {
    RunStatus.COMPLETED: "complete",
    RunStatus.CANCELLED: "partial",
    RunStatus.FAILED: "failed",
}
#: Rule 2 read back: the RunStatus of a saved row.
STATUS_OF_SAVED = {saved: status for status, saved in SAVED_STATUS.items()}


@dataclass(frozen=True, slots=True)
class Ending:
    save_status: str | None  # None: nothing to save (rule 1)
    clean_supersede: bool  # log prev_stream_finished_cleanly (rule 3)
    log_end: bool  # log stream_end here (rule 4)
    keep: bool  # stay in memory for --run-ttl (rule 4)
    outcome: str  # the runs_total label


def ending(outcome: Outcome, *, events: int, detached: bool, fenced: bool) -> Ending:
    """Decide how a run that ended with ``outcome`` is wound up."""
    return Ending(
        save_status=SAVED_STATUS[outcome.status] if events > 0 else None,
        clean_supersede=outcome.reason == "superseded" and not fenced,
        log_end=detached,
        keep=detached,
        outcome=outcome.status.value,
    )
