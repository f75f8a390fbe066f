"""One run per session, the trio half: await, fence, release (docs/design.md section 6).

The session table decides (:mod:`trio_stream.core.sessions`, or the Redis
backend's scripts); these steps carry its decisions out around a run: a new
run waits for the runs it superseded and fences the late ones; an ending run
leaves its session by its own id.  Every shared-state step of a cleanup is
shielded and bounded, and a shared state that is down is logged, not raised:
the run still ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Mapping
from typing import TypeVar

import trio

from ..logs import EventLogger
from ..shared import SharedState, SharedUnavailable
from ..tracing import NO_TRACING, Tracing
from .run import Run
from .spans import opening_span

#: The deadline of each shared-state step of a run's cleanup (release, the
#: "finished" notice): a store that is down must not hold a run's cleanup.
SHARED_TIMEOUT = 1.0

T = TypeVar("T")


async def claim(run: Run, shared: SharedState, tracing: Tracing = NO_TRACING) -> None:
    """Register ``run`` and make it its session's current run (G1); its
    predecessors and epoch go on the run.  Raises ``SharedUnavailable`` at
    once while the shared state is known to be down.

    With tracing on, the run's span opens here (its ``traceparent`` goes in
    the shared record), a child of the current request's span; it records
    each predecessor (``supersede``), and ends at once if the claim fails.

    Cancellation: in-process no checkpoint; in cluster mode a ``Cancelled``
    between the two steps leaves the run registered but not claimed.
    """
    with opening_span(tracing, run):
        if not shared.healthy:  # known down: fail now, not at a deadline
            raise SharedUnavailable("unreachable")
        await shared.register(run)
        if run.session_key is not None:
            claimed = await shared.claim(run.session_key, run.id)
            run.epoch, run.predecessors = claimed.epoch, claimed.predecessors
    for prev in run.predecessors:
        run.span.event("supersede", {"trio_stream.predecessor": prev, "reason": "superseded"})


async def await_predecessors(
    run: Run, shared: SharedState, local: Mapping[str, Run], logger: EventLogger, grace: float
) -> None:
    """Wait (up to ``grace`` seconds, ``--supersede-timeout``) for the runs ``run``
    superseded to clean up; fence those that do not (G3).

    Cancellation: a checkpoint while it waits (none if nothing was
    superseded).  A ``Cancelled`` -- the new run was itself cancelled --
    leaves the predecessors unfenced: their own cleanup still releases them.
    """
    if not run.predecessors:
        return
    key = run.session_key
    assert key is not None
    for prev in await shared.wait_finished(run.predecessors, grace):
        # G3: the straggler may neither emit, nor touch the session
        # entry, nor save over this run.
        with contextlib.suppress(SharedUnavailable):
            await shared.fence(key, prev)
        if (straggler := local.get(prev)) is not None:
            straggler.fence()  # on this node it stops emitting now, whatever the backend
            straggler.span.event("fenced", {"reason": "supersede_timeout", "by": run.id})
        run.span.event("fence", {"trio_stream.fenced": prev, "reason": "supersede_timeout"})
        logger.event("prev_stream_timeout_on_cancel", session=run.session_id, trace=prev)


async def release(run: Run, shared: SharedState, logger: EventLogger) -> bool:
    """Leave the session by ``run``'s own id (G2); True if it was fenced.

    Cancellation: shielded (a cleanup step), within :data:`SHARED_TIMEOUT`;
    no checkpoint for a run without a session.
    """
    key = run.session_key
    if key is None:
        return run.log.fenced
    fenced = await shared_step(run.id, shared.release(key, run.id), logger)
    return bool(fenced) or run.log.fenced


async def shared_step(run_id: str, step: Awaitable[T], logger: EventLogger) -> T | None:
    """Await one shared-state step of a cleanup: shielded, bounded by
    :data:`SHARED_TIMEOUT`, and a store that is down is logged
    (``redis_unavailable``), not raised: None then; so is a bug in it
    (``run_crashed``).

    Cancellation: shielded; an outer ``Cancelled`` is delivered at the
    caller's next checkpoint, after the step.
    """
    with trio.CancelScope(shield=True) as cs:
        cs.deadline = trio.current_time() + SHARED_TIMEOUT
        try:
            return await step
        except SharedUnavailable as exc:
            logger.event("redis_unavailable", trace=run_id, error=str(exc))
        except Exception as exc:  # a bug: the run still ends, the server goes on
            logger.event("run_crashed", trace=run_id, error=repr(exc))
    if cs.cancelled_caught:
        logger.event("redis_unavailable", trace=run_id, error="timeout")
    return None
