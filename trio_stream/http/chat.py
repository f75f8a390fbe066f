"""The chat completion and run routes, as raw ASGI.

``POST /v1/chat/completions`` creates a run and writes it to its client;
``GET /v1/runs/{id}/events`` replays a run after a cursor and follows it.
Their ownership trees (the request nursery of an attached run, and of a
subscription that does not own its run) are in :mod:`.common`, shared with
the Responses API routes.
"""

from __future__ import annotations

from ..errors import ApiError, bad_request, not_found
from ..shared import SharedUnavailable
from ..wire.request import parse_chat_request, parse_session_id
from .asgi import ClientGone, Receive, Scope, Send, as_api_error, close_headers, header, send_error
from .common import attached, follow, read_request, subscriber
from .service import Service
from .stream import Subscriber


async def chat_completions(service: Service, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/chat/completions``: one run, streamed or answered whole.

    Cancellation: checkpoints throughout.  A ``Cancelled`` from the server (shutdown, the
    connection closing) cancels the request nursery: an attached run is cancelled and its
    shielded cleanup still saves it before this returns; a detached run is not touched.
    """
    s = service.settings
    try:
        caller = service.auth.caller(header(scope, b"authorization"))
        session_id = parse_session_id(header(scope, b"x-session-id"))
        request = parse_chat_request(await read_request(s, scope, receive))
        service.check_model(request.model)
        with service.stream_slot():
            async with service.limits.admission(caller.key, request.model) as admitted:
                run = await service.runs.create(caller.tenant, session_id, request)
                run.meter = admitted.meter(run)
                attached_stream = request.stream and not request.detach
                sub = subscriber(
                    service, run, send, scope, kind=Subscriber, cursor=0,
                    drives_backpressure=attached_stream, rate=admitted.headers,
                )  # fmt: skip
                if attached_stream:
                    run.window = s.window
                if request.detach:
                    service.runs.start_detached(run)
                    await follow(service, sub, receive, stream=request.stream)
                else:
                    await attached(service, sub, receive, stream=request.stream)
                    service.logger.event("stream_end", **run.end_fields())
    except ClientGone:
        return
    except (ApiError, SharedUnavailable) as caught:
        exc = as_api_error(caught)
        await send_error(send, exc, close_headers(exc, scope.get("http_version", "1.1")))


async def run_events(
    service: Service, scope: Scope, receive: Receive, send: Send, run_id: str
) -> None:
    """``GET /v1/runs/{id}/events``: replay after a cursor, then follow live.

    Cancellation: checkpoints throughout; a ``Cancelled`` ends this subscription only -- the run
    (local or remote) goes on, and a mirror of a remote run is dropped.
    """
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
            if run.settled:
                cursor = min(cursor, run.log.last_seq)
            sub = subscriber(
                service, run, send, scope, kind=Subscriber, cursor=cursor, drives_backpressure=False
            )
            await follow(service, sub, receive, start_now=True, remote=remote)
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
