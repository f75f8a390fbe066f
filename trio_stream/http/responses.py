"""The Responses API routes (docs/api.md section 8): a thin trio layer.

A response is a run (:mod:`trio_stream.runs.manager`) whose id starts with ``resp_``
and which carries a :class:`~trio_stream.wire.responses.ResponseMeta`.  Every
decision about the run -- sessions, cancellation, saving, expiry, cluster
mode -- is the run manager's, and the ownership trees are the chat
endpoint's own (:func:`trio_stream.http.common.attached` for a foreground
response, :func:`~trio_stream.http.common.follow` for a background one or a
replay).  What differs is only rendering: :class:`ResponseSubscriber` writes
Responses events instead of chat chunks, and the JSON routes answer
``response`` objects (:mod:`trio_stream.wire.responses` builds both).

Routes, all raw ASGI (their rules are in the app's one table,
:func:`trio_stream.http.app.routes`; each handler runs through :func:`answer`):

* ``POST /v1/responses``
* ``GET /v1/responses/{id}`` (``?stream=true&starting_after=N`` to replay and follow)
* ``POST /v1/responses/{id}/cancel``
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import orjson

from ..core.lifecycle import STATUS_OF_SAVED
from ..core.log import Entry, Outcome, RunStatus
from ..errors import (
    ApiError,
    UpstreamReported,
    bad_request,
    not_found,
    unavailable,
)
from ..runs import Run, follow_page
from ..shared import RunRecord, SharedUnavailable
from ..store import Message, StoreUnavailable
from ..wire.request import parse_session_id
from ..wire.responses import (
    ResponseEvents,
    ResponseMeta,
    ResponseState,
    fold,
    parse_responses_request,
    response_object,
    saved_output,
    status_of,
)
from ..wire.usage import Usage
from .asgi import (
    JSON,
    ClientGone,
    Receive,
    Scope,
    Send,
    as_api_error,
    close_headers,
    header,
    send_bytes,
    send_error,
)
from .common import attached, follow, read_request, subscriber
from .service import Service
from .stream import Subscriber


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
    output = fold(run.id, run.log.read(0))
    return response_object(ResponseState(run.id, meta_of(run), run.created, output, outcome, usage))


def saved_object(m: Message) -> dict[str, Any]:
    """The ``response`` object of a response known only by its saved row.
    ``model`` comes from the row's usage record; ``instructions`` and
    ``max_output_tokens`` are not saved (null); a failed one's ``error`` is
    rebuilt from the saved outcome (its message, the upstream's error) as the
    live one is (:func:`~trio_stream.wire.responses.response_error`);
    ``output`` is the row's
    reasoning, text, refusal and tool calls folded as the live log is
    (:func:`~trio_stream.wire.responses.saved_output`)."""
    usage = Usage.from_record(m.usage)
    model = (m.usage or {}).get("model")
    meta = ResponseMeta(model if isinstance(model, str) else "", background=m.detached)
    outcome = Outcome(STATUS_OF_SAVED[m.status], m.reason or "", m.outcome_message or "", m.error)
    figures = usage.responses() if usage else None
    output = saved_output(m.run_id, m.content, m.tool_calls or (), m.reasoning, m.refusal)
    return response_object(ResponseState(m.run_id, meta, m.created, output, outcome, figures))


class ResponseSubscriber(Subscriber):
    """A :class:`~trio_stream.http.stream.Subscriber` that writes Responses events.

    ``starting_after``: the sequence number after which to write (-1: all);
    the log cursor must be 0 (the events are numbered by folding the log
    from its start, see :class:`~trio_stream.wire.responses.ResponseEvents`).
    """

    __slots__ = ("events",)

    def __init__(self, run: Run, send: Send, *, starting_after: int = -1, **kw: Any) -> None:
        super().__init__(run, send, **kw)
        self.events = ResponseEvents(run.id, meta_of(run), run.created, starting_after)

    def preamble(self) -> bytes:
        return self.events.preamble()

    def render(self, entries: list[Entry], first_seq: int) -> bytes:
        return self.events.deltas(entries, first_seq)

    def terminal(self, outcome: Outcome) -> bytes:
        run = self.run
        return self.events.trailing(outcome, run.final_usage().responses())

    async def _answer_json(self, outcome: Outcome) -> None:
        """``stream: false``: the final object, whatever the outcome -- but an
        upstream that refused the request with an HTTP 4xx (before the
        response started) is answered with that status, error and headers,
        as in chat and as OpenAI's Responses API answers a request it
        refuses (docs/api.md section 8.1)."""
        run = self.run
        error = run.error
        if isinstance(error, UpstreamReported) and error.upstream_status and run.log.last_seq == 0:
            await send_error(self._send, error, self.headers)
            return
        await send_bytes(self._send, 200, orjson.dumps(run_object(run)), JSON, self.headers)


async def answer(
    handler: Callable[..., Awaitable[None]], service: Service, scope: Scope, receive: Receive,
    send: Send, *args: str,
) -> None:  # fmt: skip
    """Run one of this module's route handlers (the app's routing table
    names them), answering its errors with the OpenAI error body.

    Cancellation: as ``handler``; a ``Cancelled`` propagates unanswered.
    """
    try:
        await handler(service, scope, receive, send, *args)
    except ClientGone:
        return
    except StoreUnavailable as caught:  # a saved response could not be read: 503, never 500
        service.logger.event("store_unavailable", path=scope.get("path", ""), error=str(caught))
        await send_error(send, as_api_error(caught))
    except (ApiError, SharedUnavailable) as caught:
        exc = as_api_error(caught)
        await send_error(send, exc, close_headers(exc, scope.get("http_version", "1.1")))


async def create(service: Service, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/responses``: a detached run if ``background``, else attached.

    Cancellation: as :func:`~trio_stream.http.chat.chat_completions`: an attached response's run
    is cancelled and saved in its shielded cleanup; a background one is not touched.
    """
    s = service.settings
    caller = service.auth.caller(header(scope, b"authorization"))
    session_id = parse_session_id(header(scope, b"x-session-id"))
    request, meta = parse_responses_request(await read_request(s, scope, receive))
    service.check_model(request.model)
    with service.stream_slot():
        async with service.limits.admission(caller.key, request.model) as admitted:
            run = await service.runs.create(caller.tenant, session_id, request, meta)
            run.meter = admitted.meter(run)
            attached_stream = request.stream and not meta.background
            sub = subscriber(service, run, send, scope, kind=ResponseSubscriber, cursor=0,
                             drives_backpressure=attached_stream, starting_after=-1,
                             rate=admitted.headers)  # fmt: skip
            if meta.background:
                service.runs.start_detached(run)
                if not request.stream:  # answered at once; poll or stream it by id
                    body = orjson.dumps(run_object(run))
                    return await send_bytes(send, 200, body, JSON, sub.headers)
                await follow(service, sub, receive, start_now=True)
                return
            if attached_stream:
                run.window = s.window
            await attached(service, sub, receive, stream=request.stream)
            service.logger.event("stream_end", **run.end_fields())


def _query(scope: Scope) -> tuple[bool, int]:
    """``stream`` and ``starting_after`` (-1 if absent) of the query string."""
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    stream = (query.get("stream") or ["false"])[-1].lower()
    if stream not in ("true", "false"):
        raise bad_request("'stream' must be true or false.", "invalid_value", "stream")
    raw = (query.get("starting_after") or [""])[-1]
    if raw and (not raw.isdigit() or len(raw) > 12):
        raise bad_request(
            "'starting_after' must be a non-negative integer.", "invalid_value", "starting_after"
        )
    return stream == "true", int(raw) if raw else -1


def _check_id(response_id: str) -> None:
    if not response_id.startswith("resp_"):
        raise not_found(f"No response {response_id!r}.")


async def retrieve(
    service: Service, scope: Scope, receive: Receive, send: Send, response_id: str
) -> None:
    """``GET /v1/responses/{id}``: the object, or with ``stream=true`` the
    events after ``starting_after`` and then live ones.

    Cancellation: checkpoints throughout; a ``Cancelled`` ends this read or subscription only,
    never the response's run.
    """
    tenant = service.auth.tenant(header(scope, b"authorization"))
    stream, after = _query(scope)
    _check_id(response_id)
    run = service.runs.get(tenant, response_id)
    if not stream:
        body = orjson.dumps(await _object(service, tenant, response_id, run))
        return await send_bytes(send, 200, body, JSON)
    remote = run is None
    if run is None:  # only a detached run's log is shared (docs/api.md section 7)
        record = await service.runs.cluster.remote(tenant, response_id)
        if record is None or not record.detached:
            raise not_found(f"No response {response_id!r} in memory to stream.")
        run = service.runs.cluster.mirror(record)
    with service.stream_slot():  # from the log's start: the numbers depend on all before them
        sub = subscriber(service, run, send, scope, kind=ResponseSubscriber, cursor=0,
                         drives_backpressure=False, starting_after=after)  # fmt: skip
        await follow(service, sub, receive, start_now=True, remote=remote)


async def _object(
    service: Service, tenant: str, response_id: str, run: Run | None
) -> dict[str, Any]:
    """The object from memory, another node, or the saved row; else 404."""
    if run is not None:
        return run_object(run)
    record = await service.runs.cluster.remote(tenant, response_id)
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
    mirror = service.runs.cluster.mirror(record)
    follow_page(mirror, page)
    outcome = mirror.log.outcome
    if outcome is None and record.status != "running":
        outcome = Outcome(RunStatus(record.status), record.reason or "")
    usage = mirror.final_usage().responses() if outcome is not None else None
    status = status_of(outcome, mirror.log.last_seq, record.detached)
    output = fold(record.id, mirror.log.read(0))
    state = ResponseState(record.id, meta_of(mirror), record.created, output, outcome, usage,
                          status)  # fmt: skip
    return response_object(state)


async def cancel(
    service: Service, scope: Scope, receive: Receive, send: Send, response_id: str
) -> None:
    """``POST /v1/responses/{id}/cancel``: cancel (reason ``stopped``) and
    answer the object.  Idempotent: an ended response is answered as it is.

    Cancellation: checkpoints while it asks the shared state and waits (bounded) for the owner's
    cleanup.  A ``Cancelled`` after the cancel was sent leaves the run cancelled; only the
    answer is lost.
    """
    tenant = service.auth.tenant(header(scope, b"authorization"))
    _check_id(response_id)
    run = service.runs.get(tenant, response_id)
    if run is not None:
        service.runs.cancel(run, "stopped")
    elif (record := await service.runs.cluster.remote(tenant, response_id)) is not None:
        if await service.runs.cancel_id(response_id, "stopped"):
            # Answer the final object: wait (bounded) for the owner's cleanup.
            wait = service.runs.shared.wait_finished
            try:
                await wait([response_id], service.settings.supersede_timeout)
            except SharedUnavailable as exc:
                raise unavailable(str(exc)) from exc
        if record.detached or await service.store.get(tenant, response_id) is None:
            record = await service.runs.cluster.remote(tenant, response_id) or record
            body = orjson.dumps(await _remote_object(service, record))
            return await send_bytes(send, 200, body, JSON)
    body = orjson.dumps(await _object(service, tenant, response_id, run))
    await send_bytes(send, 200, body, JSON)
