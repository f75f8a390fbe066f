"""What happens when a run ends -- sans-IO.

The trio driver (:mod:`trio_stream.runs.manager`) asks :func:`ending` once, in the one
``finally`` that ends a run, and carries the answer out: save (or not), with
which status, which log lines, which counters.  Keeping the decision here makes
it a table that synchronous tests can check case by case, and lets every
backend of the shared state end a run the same way.

Rule 1: a run that produced no event is not saved: there is nothing to keep.
Rule 2: a saved run's status follows its outcome: completed -> ``complete``,
        cancelled -> ``partial``, failed -> ``failed``.
Rule 3: a superseded run that finished before its successor's deadline logs
        ``prev_stream_finished_cleanly``; a fenced one does not (its successor
        already logged ``prev_stream_timeout_on_cancel``).
Rule 4: a detached run logs ``stream_end`` from its own cleanup and stays
        readable for ``--run-ttl``; an attached run's ``stream_end`` is logged
        by its request, and it leaves memory at once.

This module never imports trio.
"""

from __future__ import annotations

from dataclasses import dataclass

from .log import SAVED_STATUS, Outcome


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
