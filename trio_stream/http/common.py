"""What the chat and Responses handlers share: reading a request body, the
one :class:`~trio_stream.http.stream.Subscriber` factory, and the two
ownership trees of a streaming request (:func:`attached`, :func:`follow`).

``POST /v1/chat/completions`` for an **attached** run::

    request task
    └── request nursery  (one per request)
        ├── reader   RunManager.drive(run)    upstream -> run log
        ├── writer   Subscriber.write_*       run log -> client
        └── watcher  watch_disconnect         ASGI receive() -> run.cancel

A **detached** run's reader lives in the run manager's nursery instead; the
request nursery (:func:`follow`) then holds only the writer and the watcher,
and the watcher's disconnect ends this subscription, never the run.
"""

from __future__ import annotations

from typing import Any, TypeVar

import trio

from ..config import Settings
from ..errors import body_timeout
from ..limits.headers import RateHeaders
from ..runs import Run
from .asgi import Receive, Scope, Send, read_body
from .service import Service
from .stream import ClientStalled, Subscriber, watch_disconnect
from .transport import direct_body

S = TypeVar("S", bound=Subscriber)

#: The names of a request nursery's tasks.  trio builds ``f"{module}.{qualname}"``
#: anew per spawn when it is not given a name (a string per task, per open
#: stream); these are those same names, made once.
READER_TASK = "trio_stream.runs.manager.RunManager.drive"
WATCHER_TASK = "trio_stream.http.stream.watch_disconnect"
FEEDER_TASK = "trio_stream.runs.cluster.Cluster.feed"


def is_h2(scope: Scope) -> bool:
    """Is the request HTTP/2 (hypercorn owns its framing and flow control)?"""
    return scope.get("http_version") == "2"


def response_headers(run: Run) -> tuple[tuple[bytes, bytes], ...]:
    """``x-run-id`` and, for a run of a session, ``x-session-id``."""
    headers = [(b"x-run-id", run.id.encode())]
    if run.session_id is not None:
        headers.append((b"x-session-id", run.session_id.encode()))
    return tuple(headers)


async def read_request(settings: Settings, scope: Scope, receive: Receive) -> bytes:
    """The request body, all of it within ``--body-timeout`` of this call (else
    408) and at most ``--max-body-bytes`` (else 413).

    One deadline for the whole body, not one per chunk: a client that sends a
    byte every second for ever is cut at the same moment as one that stopped.
    The call comes as soon as the request's head is read, so the deadline
    counts from the request's start.

    The deadline is armed only before a read that may wait (``read_body``'s
    ``before_wait``), at the same instant: a body already queued with its head
    -- nearly every request -- reads under a scope without one.  An armed
    deadline stays in trio's deadline heap, holding its exited scope, until it
    is due (``--body-timeout``), for every request (docs/design.md section 16).

    Cancellation: a checkpoint per body chunk; the deadline here is its own (408).  An outer
    ``Cancelled`` leaves the body partly read.
    """
    s = settings
    deadline = trio.current_time() + s.body_timeout
    with trio.CancelScope() as guard:

        def arm() -> None:
            guard.deadline = deadline

        return await read_body(receive, scope, s.max_body_bytes, arm)
    raise body_timeout(s.body_timeout)


def subscriber(
    service: Service, run: Run, send: Send, scope: Scope, *, cursor: int,
    drives_backpressure: bool, kind: type[S], rate: RateHeaders = (), **extra: Any,
) -> S:  # fmt: skip
    """The writer of ``run`` to this request's client: the one place a
    subscriber (``kind``: :class:`~trio_stream.http.stream.Subscriber` or a
    subclass; ``extra``: the subclass's own arguments) is built from the
    service's settings and the request's scope.  ``rate``: a limited key's
    ``x-ratelimit-*`` headers, sent with the run's answer."""
    s = service.settings
    service.tracing.subscribe(run.span)  # this request's span links to the run's
    return kind(
        run, send, cursor=cursor, stall_timeout=s.stall_timeout, pinger=service.pinger,
        headers=response_headers(run) + rate, flow_controlled=is_h2(scope),
        direct=direct_body(scope), bursts=service.bursts,
        drives_backpressure=drives_backpressure, event_interval=s.event_interval_ms / 1000,
        **extra,
    )  # fmt: skip


async def _attached(service: Service, sub: Subscriber, receive: Receive, *, stream: bool) -> None:
    """The request nursery of an attached run: its reader (``drive``), the
    disconnect watcher and the writer (this task), siblings that die together
    (docs/design.md section 4).

    Cancellation: a ``Cancelled`` cancels the three: the run is cancelled
    and saved in its shielded cleanup before this returns.
    """
    run = sub.run
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.runs.drive, run, name=READER_TASK)
        # What a disconnect does, as a function and its arguments (held in the
        # watcher's frame), not a closure: no function and four cells per stream.
        nursery.start_soon(
            watch_disconnect, receive, _disconnected, service, sub, nursery.cancel_scope,
            name=WATCHER_TASK,
        )  # fmt: skip
        # The writer runs in the request task itself, as the nursery's body.
        try:
            await (sub.write_sse() if stream else sub.write_json())
        except ClientStalled:
            service.runs.cancel(run, "client_stalled")
        nursery.cancel_scope.cancel()


def _disconnected(service: Service, sub: Subscriber, scope: trio.CancelScope) -> None:
    """An attached run's client left (or stalled): cancel the run, then the request nursery."""
    reason = "client_stalled" if sub.stalled() else "client_disconnect"
    service.runs.cancel(sub.run, reason)
    scope.cancel()


async def follow(
    service: Service, sub: Subscriber, receive: Receive | None = None, *, stream: bool = True,
    start_now: bool = False, remote: bool = False,
) -> None:  # fmt: skip
    """Write a run to a subscriber that does not own it (detached or replay).

    ``remote``: ``sub.run`` is a mirror of a run another process owns; a
    feeder task beside the writer fills it from the shared log.

    Cancellation: a ``Cancelled`` ends this subscription (writer, watcher,
    feeder); the run itself is not touched.
    """
    async with trio.open_nursery() as nursery:
        if receive is not None:
            nursery.start_soon(
                watch_disconnect, receive, nursery.cancel_scope.cancel, name=WATCHER_TASK
            )
        if remote:
            nursery.start_soon(service.runs.cluster.feed, sub.run, 0, name=FEEDER_TASK)
        try:
            await (sub.write_sse(start_now=start_now) if stream else sub.write_json())
        except ClientStalled:
            service.logger.event("subscriber_stalled", trace=sub.run.id)
        nursery.cancel_scope.cancel()


#: :func:`_attached` by its public name.  The function keeps its underscore
#: because an open stream's frames are pinned by name (tests/test_idle_memory.py).
attached = _attached
