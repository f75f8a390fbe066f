"""What a run's and an attempt's spans say (docs/api.md section 10): their
attributes, events and status, decided from the run -- the tracing seam
(:mod:`trio_stream.tracing`) only records them.

Called only when tracing is on: with it off a run's span is the shared
no-op (``NO_SPAN``) and these helpers return at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from ..core.log import RunStatus
from ..tracing import NO_SPAN, Span, Tracing
from ..wire.usage import Usage
from .run import Run


def run_attributes(run: Run) -> dict[str, Any]:
    """A run span's attributes at its start."""
    attributes: dict[str, Any] = {
        "trio_stream.run.id": run.id,
        "trio_stream.run.detached": run.detached,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": run.request.model,
    }
    if run.session_id is not None:
        attributes["trio_stream.session.id"] = run.session_id
    if run.request.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = run.request.max_tokens
    return attributes


def usage_attributes(usage: Usage | None) -> dict[str, Any]:
    if usage is None:
        return {}
    return {
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
    }


def end_run_span(run: Run) -> None:
    """End the run span with the run's outcome (after its cleanup):
    completed ``ok``; failed ``error`` (the reason); cancelled unset, with
    the reason.  Idempotent; nothing for the no-op span."""
    span = run.span
    if span is NO_SPAN:
        return
    outcome = run.log.outcome
    if outcome is None:  # not driven to an end (cannot happen after the cleanup)
        span.end("error", "the run did not end")
        return
    attributes: dict[str, Any] = {
        "trio_stream.run.status": outcome.status.value,
        "trio_stream.run.reason": outcome.reason,
        "trio_stream.run.events": run.log.last_seq,
        "trio_stream.run.fenced": run.log.fenced,
        **usage_attributes(run.final_usage()),
    }
    if run.served_by is not None:
        attributes["trio_stream.upstream.member"] = run.served_by
    if outcome.status is RunStatus.COMPLETED:
        attributes["gen_ai.response.finish_reasons"] = (outcome.reason,)
    span.set(attributes)
    if outcome.status is RunStatus.COMPLETED:
        span.end("ok")
    elif outcome.status is RunStatus.FAILED:
        span.end(
            "error", f"{outcome.reason}: {outcome.message}" if outcome.message else outcome.reason
        )
    else:
        span.end()


def end_attempt_span(span: Span, run: Run, outcome: str, *, won: bool) -> None:
    """End an upstream attempt's client span.  ``outcome``: ``served`` (it
    won and its stream was read), or how it ended before its first token
    (a failure class, ``hedge_lost``, ``cancelled``)."""
    if span is NO_SPAN:
        return
    attributes: dict[str, Any] = {"trio_stream.attempt.outcome": outcome}
    ended = run.log.outcome
    if won:
        attributes.update(usage_attributes(run.final_usage()))  # reported, else counted
        if ended is not None and ended.status is RunStatus.COMPLETED:
            attributes["gen_ai.response.finish_reasons"] = (ended.reason,)
    span.set(attributes)
    if won and ended is not None and ended.status is RunStatus.COMPLETED:
        span.end("ok")
    elif outcome in ("served", "hedge_lost", "cancelled"):
        span.end()
    else:
        span.end("error", outcome)


@contextmanager
def opening_span(tracing: Tracing, run: Run) -> Iterator[None]:
    """Open ``run``'s span (tracing on: a child of the current request's
    span) around its registration, and end it if the block raises: the run
    then never existed, and nothing else would end its span."""
    if tracing.enabled:
        run.span = tracing.run(run_attributes(run))
    try:
        yield
    except BaseException:
        run.span.end("error", "the run could not be registered")
        raise


#: :func:`traced` of an untraced run: one shared, stateless context manager.
_UNTRACED: AbstractContextManager[None] = nullcontext()


def traced(run: Run) -> AbstractContextManager[None]:
    """The reader's block (``drive``): ``run``'s span is the current span of
    the task (its log lines carry its ids), and is ended on every exit --
    after the run's cleanup, which the block ends with.

    With tracing off (``NO_SPAN``: ``use`` does nothing, ``end_run_span``
    returns at once) the block is the shared :data:`_UNTRACED`: the reader
    then holds no two generator context managers while it waits (about
    0.7 KB per open stream, ``tools/measure_idle.py``)."""
    if run.span is NO_SPAN:
        return _UNTRACED
    return _traced(run)


@contextmanager
def _traced(run: Run) -> Iterator[None]:
    """:func:`traced` of a traced run."""
    try:
        with run.span.use():
            yield
    finally:
        end_run_span(run)
