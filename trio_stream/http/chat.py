"""The streaming endpoints, as raw ASGI: the per-request ownership tree.

``POST /v1/chat/completions`` for an **attached** run::

    request task
    └── request nursery  (one per request)
        ├── reader   RunManager.drive(run)    upstream -> run log
        ├── writer   Subscriber.write_*       run log -> client
        └── watcher  watch_disconnect         ASGI receive() -> run.cancel

The three are siblings that die together: the writer ending (terminal frame
sent, or the client stalled) cancels the nursery; the watcher seeing
``http.disconnect`` cancels the run and the nursery; the reader's cleanup is
shielded with a deadline, so the nursery exits only after the run is saved.

A **detached** run's reader lives in the run manager's nursery instead; the
request nursery then holds only the writer and the watcher, and the watcher's
disconnect ends this subscription, never the run.
"""

from __future__ import annotations

import trio

from ..config import Settings
from ..errors import ApiError, bad_request, body_timeout, not_found
from ..runs import Run
from ..shared import SharedUnavailable
from ..wire.request import parse_chat_request, parse_session_id
from .asgi import (
    ClientGone,
    Receive,
    Scope,
    Send,
    as_api_error,
    close_headers,
    header,
    read_body,
    send_error,
)
from .service import Service
from .stream import ClientStalled, Subscriber, watch_disconnect
from .transport import direct_body


def _is_h2(scope: Scope) -> bool:
    return scope.get("http_version") == "2"


def _response_headers(run: Run) -> tuple[tuple[bytes, bytes], ...]:
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

    Cancellation: a checkpoint per body chunk; the deadline here is its own (408).  An outer
    ``Cancelled`` leaves the body partly read.
    """
    s = settings
    with trio.move_on_after(s.body_timeout):
        return await read_body(receive, scope, s.max_body_bytes)
    raise body_timeout(s.body_timeout)


async def chat_completions(service: Service, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/chat/completions``: one run, streamed or answered whole.

    Cancellation: checkpoints throughout.  A ``Cancelled`` from the server (shutdown, the
    connection closing) cancels the request nursery: an attached run is cancelled and its
    shielded cleanup still saves it before this returns; a detached run is not touched.
    """
    s = service.settings
    try:
        tenant = service.auth.tenant(header(scope, b"authorization"))
        session_id = parse_session_id(header(scope, b"x-session-id"))
        request = parse_chat_request(await read_request(s, scope, receive))
        with service.stream_slot():
            run = await service.runs.create(tenant, session_id, request)
            sub = Subscriber(
                run, send, cursor=0, stall_timeout=s.stall_timeout, pinger=service.pinger,
                headers=_response_headers(run), flow_controlled=_is_h2(scope),
                direct=direct_body(scope),
                drives_backpressure=request.stream and not request.detach,
                event_interval=s.event_interval_ms / 1000,
            )  # fmt: skip
            if request.stream and not request.detach:
                run.window = s.window
            if request.detach:
                service.runs.start_detached(run)
                await _follow(service, sub, receive, stream=request.stream)
            else:
                await _attached(service, sub, receive, stream=request.stream)
                service.logger.event("stream_end", **run.end_fields())
    except ClientGone:
        return
    except (ApiError, SharedUnavailable) as caught:
        exc = as_api_error(caught)
        await send_error(send, exc, close_headers(exc, scope.get("http_version", "1.1")))


async def _attached(service: Service, sub: Subscriber, receive: Receive, *, stream: bool) -> None:
    run = sub.run
    async with trio.open_nursery() as nursery:

        def on_disconnect() -> None:
            reason = "client_stalled" if sub.stalled() else "client_disconnect"
            service.runs.cancel(run, reason)
            nursery.cancel_scope.cancel()

        nursery.start_soon(service.runs.drive, run)
        nursery.start_soon(watch_disconnect, receive, on_disconnect)
        # The writer runs in the request task itself, as the nursery's body.
        try:
            await (sub.write_sse() if stream else sub.write_json())
        except ClientStalled:
            service.runs.cancel(run, "client_stalled")
        nursery.cancel_scope.cancel()


async def _follow(
    service: Service, sub: Subscriber, receive: Receive | None = None, *, stream: bool = True,
    start_now: bool = False, remote: bool = False,
) -> None:  # fmt: skip
    """Write a run to a subscriber that does not own it (detached or replay).

    ``remote``: ``sub.run`` is a mirror of a run another process owns; a
    feeder task beside the writer fills it from the shared log.
    """
    async with trio.open_nursery() as nursery:
        if receive is not None:
            nursery.start_soon(watch_disconnect, receive, nursery.cancel_scope.cancel)
        if remote:
            nursery.start_soon(service.runs.cluster.feed, sub.run, 0)
        try:
            await (sub.write_sse(start_now=start_now) if stream else sub.write_json())
        except ClientStalled:
            service.logger.event("subscriber_stalled", trace=sub.run.id)
        nursery.cancel_scope.cancel()


async def run_events(
    service: Service, scope: Scope, receive: Receive, send: Send, run_id: str
) -> None:
    """``GET /v1/runs/{id}/events``: replay after a cursor, then follow live.

    Cancellation: checkpoints throughout; a ``Cancelled`` ends this subscription only -- the run
    (local or remote) goes on, and a mirror of a remote run is dropped.
    """
    s = service.settings
    try:
        tenant = service.auth.tenant(header(scope, b"authorization"))
        run = service.runs.get(tenant, run_id)
        remote = run is None
        if run is None:
            # Another process's run: a detached one is followed from its
            # shared log; an attached one's text never leaves its process.
            record = await service.runs.cluster.remote(tenant, run_id)
            if record is None or not record.detached:
                raise not_found(f"No run {run_id!r}.")
            run = service.runs.cluster.mirror(record)
        cursor = _cursor(scope)
        with service.stream_slot():
            sub = Subscriber(
                run, send, cursor=min(cursor, run.log.last_seq) if run.settled else cursor,
                stall_timeout=s.stall_timeout, pinger=service.pinger,
                headers=_response_headers(run), drives_backpressure=False,
                flow_controlled=_is_h2(scope), direct=direct_body(scope),
                event_interval=s.event_interval_ms / 1000,
            )  # fmt: skip
            await _follow(service, sub, receive, start_now=True, remote=remote)
    except (ApiError, SharedUnavailable) as caught:
        exc = as_api_error(caught)
        await send_error(send, exc, close_headers(exc, scope.get("http_version", "1.1")))


def _cursor(scope: Scope) -> int:
    """``Last-Event-ID`` header, else ``?after=N``, else 0."""
    raw = header(scope, b"last-event-id")
    if raw is None:
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "after":
                raw = value
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or len(raw) > 12:
        raise bad_request(
            "Last-Event-ID / 'after' must be a non-negative integer.", "invalid_cursor"
        )
    return int(raw)
