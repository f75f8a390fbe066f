"""The Responses API routes (docs/api.md section 8): a thin trio layer.

A response is a run (:mod:`trio_stream.runs`) whose id starts with ``resp_``
and which carries a :class:`~trio_stream.responses_wire.ResponseMeta`.  Every
decision about the run -- sessions, cancellation, saving, expiry, cluster
mode -- is the run manager's, and the ownership trees are the chat
endpoint's own (:func:`trio_stream.endpoints._attached` for a foreground
response, :func:`~trio_stream.endpoints._follow` for a background one or a
replay).  What differs is only rendering: :class:`ResponseSubscriber` writes
Responses events instead of chat chunks, and the JSON routes answer
``response`` objects (:mod:`trio_stream.responses_wire` builds both).

Routes, all raw ASGI (``TrioStreamApp`` hands over every path under
``/v1/responses``):

* ``POST /v1/responses``
* ``GET /v1/responses/{id}`` (``?stream=true&starting_after=N`` to replay and follow)
* ``POST /v1/responses/{id}/cancel``
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs

import orjson

from .asgi import (
    JSON,
    ClientGone,
    Receive,
    Scope,
    Send,
    close_headers,
    header,
    send_bytes,
    send_error,
)
from .endpoints import _attached, _follow, _is_h2, _response_headers, read_request
from .errors import (
    ApiError,
    bad_request,
    method_not_allowed,
    not_found,
    store_unavailable,
    unavailable,
    unknown_route,
)
from .protocol import parse_session_id
from .responses_wire import (
    ResponseEvents,
    ResponseMeta,
    ResponseState,
    log_cursor,
    parse_responses_request,
    response_object,
    status_of,
)
from .runlog import Entry, Outcome, RunStatus
from .runs import Run, follow_page
from .service import Service
from .shared import RunRecord, SharedUnavailable
from .store import Message, StoreUnavailable
from .stream import Subscriber
from .transport import direct_body
from .usage import Usage

_ONE = re.compile(r"/v1/responses/([^/]+)")
_CANCEL = re.compile(r"/v1/responses/([^/]+)/cancel")


def meta_of(run: Run) -> ResponseMeta:
    """The run's response metadata (a mirror of a remote run has only its record's)."""
    return run.response or ResponseMeta(run.request.model, background=run.detached)


def run_object(run: Run) -> dict[str, Any]:
    """The ``response`` object of a run held in memory.  A completed run shows
    ``completed`` once its cleanup is done (saved, and the upstream's usage in)."""
    outcome = run.log.outcome
    if outcome is not None and outcome.status is RunStatus.COMPLETED and not run.done.is_set():
        outcome = None
    usage = run.final_usage().responses() if outcome is not None else None
    log = run.log
    state = ResponseState(
        run.id, meta_of(run), run.created, log.content, log.last_seq, outcome, usage
    )
    return response_object(state)


_SAVED = {"complete": RunStatus.COMPLETED, "partial": RunStatus.CANCELLED,
          "failed": RunStatus.FAILED}  # fmt: skip


def saved_object(m: Message) -> dict[str, Any]:
    """The ``response`` object of a response known only by its saved row.
    ``model`` comes from the row's usage record; ``instructions`` and
    ``max_output_tokens`` are not saved (null)."""
    usage = Usage.from_record(m.usage)
    model = (m.usage or {}).get("model")
    meta = ResponseMeta(model if isinstance(model, str) else "", background=m.detached)
    outcome = Outcome(_SAVED[m.status], m.reason or "")
    figures = usage.responses() if usage else None
    return response_object(
        ResponseState(m.run_id, meta, m.created, m.content, m.events, outcome, figures)
    )


class ResponseSubscriber(Subscriber):
    """A :class:`~trio_stream.stream.Subscriber` that writes Responses events.

    ``starting_after``: the sequence number after which to write (-1: all);
    the log cursor must be :func:`~trio_stream.responses_wire.log_cursor` of it.
    """

    def __init__(self, run: Run, send: Send, *, starting_after: int = -1, **kw: Any) -> None:
        super().__init__(run, send, **kw)
        self.events = ResponseEvents(run.id, meta_of(run), run.created, starting_after)

    def preamble(self) -> bytes:
        return self.events.preamble()

    def render(self, entries: list[Entry], first_seq: int) -> bytes:
        return self.events.deltas(entries, first_seq)

    def terminal(self, outcome: Outcome) -> bytes:
        run = self.run
        usage = run.final_usage().responses()
        return self.events.trailing(run.log.content, run.log.last_seq, outcome, usage)

    async def _answer_json(self, outcome: Outcome) -> None:
        """``stream: false``: the final object, whatever the outcome."""
        await send_bytes(self._send, 200, orjson.dumps(run_object(self.run)), JSON, self.headers)


async def handle(service: Service, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one request to a path under ``/v1/responses``."""
    path, method = scope["path"], scope["method"]
    allow = b"POST"
    try:
        if path == "/v1/responses":
            if method == "POST":
                return await create(service, scope, receive, send)
        elif m := _CANCEL.fullmatch(path):
            if method == "POST":
                return await cancel(service, scope, send, m[1])
        elif m := _ONE.fullmatch(path):
            allow = b"GET"
            if method == "GET":
                return await retrieve(service, scope, receive, send, m[1])
        else:
            raise unknown_route(path)
        raise method_not_allowed(method, path)
    except ClientGone:
        return
    except StoreUnavailable as exc:  # a saved response could not be read: 503, never 500
        service.logger.event("store_unavailable", path=path, error=str(exc))
        await send_error(send, store_unavailable())
    except ApiError as exc:
        extra = close_headers(exc, scope.get("http_version", "1.1"))
        if exc.status == 405:
            extra = ((b"allow", allow), *extra)
        await send_error(send, exc, extra)


def _subscriber(service: Service, run: Run, send: Send, scope: Scope, *, cursor: int,
                starting_after: int, attached_stream: bool) -> ResponseSubscriber:  # fmt: skip
    s = service.settings
    return ResponseSubscriber(
        run, send, starting_after=starting_after, cursor=cursor, stall_timeout=s.stall_timeout,
        pinger=service.pinger, headers=_response_headers(run), flow_controlled=_is_h2(scope),
        direct=direct_body(scope),
        drives_backpressure=attached_stream, event_interval=s.event_interval_ms / 1000,
    )  # fmt: skip


async def create(service: Service, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/responses``: a detached run if ``background``, else attached."""
    s = service.settings
    tenant = service.auth.tenant(header(scope, b"authorization"))
    session_id = parse_session_id(header(scope, b"x-session-id"))
    request, meta = parse_responses_request(await read_request(s, scope, receive))
    with service.stream_slot():
        run = await service.runs.create(tenant, session_id, request, meta)
        attached_stream = request.stream and not meta.background
        sub = _subscriber(service, run, send, scope, cursor=0, starting_after=-1,
                          attached_stream=attached_stream)  # fmt: skip
        if meta.background:
            service.runs.start_detached(run)
            if not request.stream:  # answered at once; poll or stream it by id
                body = orjson.dumps(run_object(run))
                return await send_bytes(send, 200, body, JSON, sub.headers)
            await _follow(service, sub, receive, start_now=True)
            return
        if attached_stream:
            run.window = s.window
        await _attached(service, sub, receive, stream=request.stream)
        service.logger.event("stream_end", **service.runs.end_fields(run))


def _query(scope: Scope) -> tuple[bool, int]:
    """``stream`` and ``starting_after`` (-1 if absent) of the query string."""
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    stream = (query.get("stream") or ["false"])[-1].lower()
    if stream not in ("true", "false"):
        raise bad_request("'stream' must be true or false.", "invalid_value")
    raw = (query.get("starting_after") or [""])[-1]
    if raw and (not raw.isdigit() or len(raw) > 12):
        raise bad_request("'starting_after' must be a non-negative integer.", "invalid_value")
    return stream == "true", int(raw) if raw else -1


def _check_id(response_id: str) -> None:
    if not response_id.startswith("resp_"):
        raise not_found(f"No response {response_id!r}.")


async def retrieve(
    service: Service, scope: Scope, receive: Receive, send: Send, response_id: str
) -> None:
    """``GET /v1/responses/{id}``: the object, or with ``stream=true`` the
    events after ``starting_after`` and then live ones."""
    tenant = service.auth.tenant(header(scope, b"authorization"))
    stream, after = _query(scope)
    _check_id(response_id)
    run = service.runs.get(tenant, response_id)
    if not stream:
        body = orjson.dumps(await _object(service, tenant, response_id, run))
        return await send_bytes(send, 200, body, JSON)
    remote = run is None
    if run is None:  # only a detached run's log is shared (docs/api.md section 7)
        record = await service.runs.remote(tenant, response_id)
        if record is None or not record.detached:
            raise not_found(f"No response {response_id!r} in memory to stream.")
        run = service.runs.mirror(record)
    cursor = log_cursor(after)
    with service.stream_slot():
        if run.settled:
            cursor = min(cursor, run.log.last_seq)
        sub = _subscriber(service, run, send, scope, cursor=cursor, starting_after=after,
                          attached_stream=False)  # fmt: skip
        await _follow(service, sub, receive, start_now=True, remote=remote)


async def _object(
    service: Service, tenant: str, response_id: str, run: Run | None
) -> dict[str, Any]:
    """The object from memory, another node, or the saved row; else 404."""
    if run is not None:
        return run_object(run)
    record = await service.runs.remote(tenant, response_id)
    if record is not None and (record.detached or record.status == "running"):
        return await _remote_object(service, record)
    saved = await service.store.get(tenant, response_id)
    if saved is None:
        raise not_found(f"No response {response_id!r}.")
    return saved_object(saved)


async def _remote_object(service: Service, record: RunRecord) -> dict[str, Any]:
    """A response another node owns, from its shared log (a detached one) or
    its record (an attached one, whose text is only on its node)."""
    try:
        page = await service.runs.shared.read_log(record.id, 0, wait=False)
    except SharedUnavailable as exc:
        raise unavailable(str(exc)) from exc
    mirror = service.runs.mirror(record)
    follow_page(mirror, page)
    outcome = mirror.log.outcome
    if outcome is None and record.status != "running":
        outcome = Outcome(RunStatus(record.status), record.reason or "")
    usage = mirror.final_usage().responses() if outcome is not None else None
    status = status_of(outcome, mirror.log.last_seq, record.detached)
    log = mirror.log
    state = ResponseState(record.id, meta_of(mirror), record.created, log.content, log.last_seq,
                          outcome, usage, status)  # fmt: skip
    return response_object(state)


async def cancel(service: Service, scope: Scope, send: Send, response_id: str) -> None:
    """``POST /v1/responses/{id}/cancel``: cancel (reason ``stopped``) and
    answer the object.  Idempotent: an ended response is answered as it is."""
    tenant = service.auth.tenant(header(scope, b"authorization"))
    _check_id(response_id)
    run = service.runs.get(tenant, response_id)
    if run is not None:
        service.runs.cancel(run, "stopped")
    elif (record := await service.runs.remote(tenant, response_id)) is not None:
        if await service.runs.cancel_id(response_id, "stopped"):
            # Answer the final object: wait (bounded) for the owner's cleanup.
            wait = service.runs.shared.wait_finished
            try:
                await wait([response_id], service.settings.supersede_timeout)
            except SharedUnavailable as exc:
                raise unavailable(str(exc)) from exc
        if record.detached or await service.store.get(tenant, response_id) is None:
            record = await service.runs.remote(tenant, response_id) or record
            body = orjson.dumps(await _remote_object(service, record))
            return await send_bytes(send, 200, body, JSON)
    body = orjson.dumps(await _object(service, tenant, response_id, run))
    await send_bytes(send, 200, body, JSON)
