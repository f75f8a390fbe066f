"""Saving a run: once, with retries while the database cannot be reached -- trio layer.

What a finished run saves (its status, whether at all) is the lifecycle
table's decision (:func:`trio_stream.core.lifecycle.ending`); this module only
carries it out against a :class:`~trio_stream.store.Store`.
"""

from __future__ import annotations

import trio

from ..core.lifecycle import ending
from ..logs import EventLogger
from ..metrics import Metrics
from ..store import AlreadySaved, Message, Store, StoreUnavailable, retry_delay
from .run import Run


async def save_run(run: Run, store: Store, metrics: Metrics, logger: EventLogger) -> str:
    """Save the run's message once; retry while the database cannot be
    reached, until the enclosing deadline (the cleanup's ``--save-timeout``).

    A retried insert whose first attempt had landed finds its row
    (``AlreadySaved`` after a retry): that is this run's own row, saved
    once.  A save that does not land -- an error, or the deadline -- logs
    ``save_failed`` and counts in ``trio_stream_save_failures_total``.

    Cancellation: checkpoints while it saves (each attempt waits on the
    store); a run with nothing to save returns at once, without one.  A
    ``Cancelled`` -- the caller's deadline -- ends the retries: the save
    counts as failed (``save_failed``), and a row already handed to the
    store's committer may still land with its batch.

    Returns what happened, for the run span's ``save`` event: ``saved``,
    ``duplicate`` (the row was there: another node saved it), ``failed``,
    ``nothing`` (nothing to save) or ``not_stored`` (``"store": false``).
    """
    outcome = run.log.outcome
    assert outcome is not None
    status = ending(outcome, events=run.log.last_seq, detached=run.detached, fenced=False)
    if status.save_status is None:
        return _saved(run, "nothing", outcome.reason)  # nothing produced, nothing to save
    if run.response is not None and not run.response.store:
        return _saved(run, "not_stored", outcome.reason)  # "store": false
    usage = {**run.final_usage().record(), "model": run.request.model}
    answer = run.log.answer()
    reasoning = answer.message.get("reasoning_content", answer.message.get("reasoning"))
    message = Message(
        run.id, run.tenant, run.session_id, run.log.content, run.log.tool_calls or None,
        status.save_status, outcome.reason, run.log.last_seq, run.detached, run.created,
        usage, reasoning, answer.message.get("refusal"), answer.logprobs is not None,
        outcome.message or None, outcome.error, run.served_by,
    )  # fmt: skip
    settled = False
    result = "saved"
    error = "no answer within --save-timeout"
    attempt = 0
    try:
        while True:
            try:
                await store.save(message)
            except StoreUnavailable as exc:
                attempt += 1
                error = str(exc)
                logger.event("save_retry", trace=run.id, attempt=attempt, error=error)
                await trio.sleep(retry_delay(attempt))
                continue
            except AlreadySaved:
                if not attempt:
                    result = "duplicate"
                    logger.event("save_duplicate_refused", trace=run.id)
            except Exception as exc:  # database trouble must not take the server down
                error = repr(exc)
                break
            settled = True
            break
    finally:  # also when the deadline cancels a wait
        if not settled:
            metrics.save_failures.inc()
            logger.event("save_failed", trace=run.id, error=error)
        _saved(run, result if settled else "failed", outcome.reason)  # a deadline too
    return result if settled else "failed"


def _saved(run: Run, result: str, reason: str) -> str:
    """The run span's ``save`` event (a no-op with tracing off)."""
    run.span.event("save", {"trio_stream.save": result, "reason": reason})
    return result
