"""The HTTP application: one routing table, raw-ASGI streams and Quart's JSON routes.

Every route is one line of :func:`routes`.  Quart serves the JSON routes and
the playground.  The streaming routes (chat completions, a run's events, the
Responses API) are matched in :meth:`TrioStreamApp.__call__` before Quart
sees the request and run as raw ASGI endpoints (:mod:`trio_stream.http.chat`,
:mod:`trio_stream.http.responses`), because:

* their writer, upstream reader and disconnect watcher must be sibling tasks
  in a nursery *we* own (quart-trio iterates a body generator in a nursery of
  its own, so ours would have to yield inside a nursery it opened: trio
  issues #264 and #638, PEP 789; docs/design.md section 4);
* quart-trio cuts every response body off after ``RESPONSE_TIMEOUT``;
* it is the hot path, and the raw endpoint makes one ASGI send per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .. import metrics as metrics_mod
from ..core.lifecycle import STATUS_OF_SAVED
from ..errors import (
    ApiError,
    ambiguous_framing,
    body_timeout,
    error_body,
    method_not_allowed,
    not_found,
    unknown_route,
)
from ..limits import LimitsUnavailable
from ..shared import SharedUnavailable
from ..store import Message, StoreUnavailable
from ..wire.request import parse_session_id
from . import responses
from .asgi import (
    Receive,
    Scope,
    Send,
    as_api_error,
    close_headers,
    framing_conflict,
    send_error,
)
from .chat import chat_completions, run_events
from .limits import limits_unavailable, usage_row
from .playground import PREFIX, playground_views
from .routing import RawRoutes, Route, allow
from .service import Service

_JSON = "application/json"


class TrioStreamApp(QuartTrio):
    """The ASGI app.  ``service`` must be open for as long as it serves."""

    def __init__(self, service: Service) -> None:
        super().__init__("trio_stream")
        self.service = service
        self.config["RESPONSE_TIMEOUT"] = 60  # JSON answers only; streams bypass Quart
        self.config["MAX_CONTENT_LENGTH"] = service.settings.max_body_bytes
        # A Quart route's body must arrive within --body-timeout of its first
        # read; werkzeug's RequestTimeout then becomes our 408 (http_error).
        self.config["BODY_TIMEOUT"] = service.settings.body_timeout
        _error_handlers(self)
        table = routes(self)
        self.raw_routes = RawRoutes(table)
        self._traced = service.tracing.enabled
        for route in table:
            if route.view is not None:
                self.add_url_rule(route.rule, view_func=route.view, methods=[route.method])

    def __call__(  # type: ignore[override]
        self, scope: Scope, receive: Receive, send: Send
    ) -> Coroutine[Any, Any, None]:
        """Route a request: the handler's coroutine, for the server to await.

        A plain function, not ``async def``: the request task then awaits the
        handler itself, and this dispatch costs no coroutine frame for as long
        as the request lives (one open stream holds its request task's whole
        chain of frames).  With tracing on, the handler runs inside the
        request's server span (:meth:`Tracing.serve`: one frame more).
        """
        if self._traced and scope["type"] == "http":
            rule = self.raw_routes.rule(scope["path"])
            return self.service.tracing.serve(scope, receive, send, self._route, rule)
        return self._route(scope, receive, send)

    def _route(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        """:meth:`__call__`'s dispatch: the handler's coroutine."""
        if scope["type"] == "http":
            send = self.service.rated(scope, send)  # a limited key's x-ratelimit-* headers
            if framing_conflict(scope):  # before any route reads a body it cannot trust
                error = ambiguous_framing()
                return send_error(send, error, close_headers(error, scope["http_version"]))
            if found := self.raw_routes.match(scope["path"]):
                methods, args = found
                handler = methods.get(scope["method"])
                if handler is not None:
                    return handler(self.service, scope, receive, send, *args)
                error = method_not_allowed(scope["method"], scope["path"])
                return send_error(send, error, allow(methods))
        return super().__call__(scope, receive, send)  # type: ignore[arg-type]


def routes(app: TrioStreamApp) -> list[Route]:
    """The app's one routing table: every route, raw or Quart's."""
    json = _json_views(app.service)
    page, asset = playground_views()
    create, retrieve, cancel = (
        partial(responses.answer, handler)
        for handler in (responses.create, responses.retrieve, responses.cancel)
    )
    return [
        # Streams, as raw ASGI (matched before Quart: see the module docstring)
        Route("POST", "/v1/chat/completions", raw=chat_completions),
        Route("GET", "/v1/runs/<run_id>/events", raw=run_events),
        Route("POST", "/v1/responses", raw=create),
        Route("GET", "/v1/responses/<response_id>", raw=retrieve),
        Route("POST", "/v1/responses/<response_id>/cancel", raw=cancel),
        # JSON, served by Quart
        Route("GET", "/healthz", view=json["healthz"]),
        Route("GET", "/metrics", view=json["metrics"]),
        Route("GET", "/v1/models", view=json["models"]),
        Route("GET", "/v1/usage", view=json["usage"]),
        Route("GET", "/v1/runs/<run_id>", view=json["get_run"]),
        Route("POST", "/v1/runs/<run_id>/cancel", view=json["cancel_run"]),
        Route("POST", "/v1/sessions/<session_id>/interrupt", view=json["interrupt"]),
        Route("GET", "/v1/sessions/<session_id>/messages", view=json["messages"]),
        # The browser playground (static files, served by Quart)
        Route("GET", "/", view=page),
        Route("GET", PREFIX + "<name>", view=asset),
    ]  # fmt: skip


def _json(body: bytes, status: int = 200) -> Response:
    return Response(body, status=status, content_type=_JSON)


def _error_handlers(app: TrioStreamApp) -> None:
    """Every error a Quart route raises, answered with the OpenAI error body."""
    service = app.service

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        response = _json(exc.body(), exc.status)
        for name, value in (*exc.headers, *close_headers(exc, request.http_version)):
            response.headers[name.decode()] = value.decode()
        return response

    @app.errorhandler(SharedUnavailable)
    async def shared_unavailable(exc: SharedUnavailable) -> Response:
        return await api_error(as_api_error(exc))

    @app.errorhandler(StoreUnavailable)
    async def store_error(exc: StoreUnavailable) -> Response:
        """Any route that reads saved messages: 503 + Retry-After, never 500."""
        service.logger.event("store_unavailable", path=request.path, error=str(exc))
        return await api_error(as_api_error(exc))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        if code == 404:
            return await api_error(unknown_route(request.path))
        if code == 408:  # werkzeug's RequestTimeout: Quart's BODY_TIMEOUT passed
            return await api_error(body_timeout(service.settings.body_timeout))
        if code == 405:  # RFC 9110: a 405 carries Allow (werkzeug's headers have it)
            response = await api_error(method_not_allowed(request.method, request.path))
            response.headers.update((k, v) for k, v in exc.get_headers() if k.lower() == "allow")
            return response
        type_ = "invalid_request_error" if code < 500 else "server_error"
        return _json(error_body(exc.description or exc.name, type_, None), code)


def _json_views(service: Service) -> dict[str, Callable[..., Coroutine[Any, Any, Any]]]:
    """The JSON routes' views, by name (their rules are in :func:`routes`)."""

    def tenant() -> str:
        caller = service.auth.caller(request.headers.get("authorization"))
        g.key = caller.key
        return caller.tenant

    async def healthz() -> Response:
        if not service.runs.shared.healthy:  # cluster mode with Redis unreachable
            return _json(b'{"status":"degraded"}', 503)
        return _json(b'{"status":"ok"}')

    async def metrics() -> Response:
        return Response(service.metrics.render(), content_type=metrics_mod.CONTENT_TYPE)

    async def models() -> dict[str, Any]:
        tenant()
        return {"object": "list", "data": await service.models()}

    async def saved_run(owner: str, run_id: str) -> dict[str, Any]:
        """A run no longer in memory, as its saved row shows it (404 if none)."""
        saved = await saved_public(owner, run_id)
        if saved is None:
            raise not_found(f"No run {run_id!r}.")
        return saved

    async def saved_public(owner: str, run_id: str) -> dict[str, Any] | None:
        saved = await service.store.get(owner, run_id)
        if saved is None:
            return None
        return {
            "id": saved.run_id,
            "session_id": saved.session_id,
            "status": STATUS_OF_SAVED[saved.status].value,
            "reason": saved.reason,
            "content": saved.content,
            "events": saved.events,
            "detached": saved.detached,
            "served_by": saved.served_by,
        }

    async def get_run(run_id: str) -> dict[str, Any]:
        owner = tenant()
        run = service.runs.get(owner, run_id)
        if run is not None:
            return run.public()
        record = await service.runs.cluster.remote(owner, run_id)
        if record is not None and (record.detached or record.status == "running"):
            return await service.runs.cluster.remote_public(record)
        return await saved_run(owner, run_id)

    async def cancel_run(run_id: str) -> dict[str, Any]:
        """Idempotent: a run that already ended (even one gone from memory) is
        answered as it is, unchanged."""
        owner = tenant()
        run = service.runs.get(owner, run_id)
        if run is not None:
            service.runs.cancel(run, "stopped")
            return run.public()
        record = await service.runs.cluster.remote(owner, run_id)
        if record is None:
            return await saved_run(owner, run_id)
        if await service.runs.cancel_id(run_id, "stopped"):
            # Answer the final object: wait (bounded) for the owner's cleanup;
            # for a detached run, for its log's end (shipped after it).
            timeout = service.settings.supersede_timeout
            if record.detached:
                mirror = service.runs.cluster.mirror(record)
                with trio.move_on_after(timeout):
                    await service.runs.cluster.feed(mirror, 0)
                end = mirror.log.outcome  # None: not in time; or Redis went away
                if end is not None and end.reason != "shared_state_unavailable":
                    return mirror.public()
            else:
                await service.runs.shared.wait_finished([run_id], timeout)
            record = await service.runs.cluster.remote(owner, run_id) or record
        if not record.detached and (saved := await saved_public(owner, run_id)) is not None:
            return saved  # an attached run's text is only in its row
        # A detached run's log; or an attached run with nothing saved (it
        # produced nothing, or its owner has not finished): its record.
        return await service.runs.cluster.remote_public(record)

    async def known_session(owner: str, session_id: str) -> list[Message]:
        """A session is known while it has a live run or saved messages (404 otherwise)."""
        parse_session_id(session_id)
        rows = await service.store.session_messages(owner, session_id)
        if not rows and not await service.runs.cluster.session_known(owner, session_id):
            raise not_found(f"No session {session_id!r}.")
        return rows

    async def interrupt(session_id: str) -> dict[str, Any]:
        owner = tenant()
        await known_session(owner, session_id)
        run_id = await service.runs.cluster.current(owner, session_id)
        interrupted = run_id is not None and await service.runs.cancel_id(run_id, "interrupted")
        return {"interrupted": interrupted, "run_id": run_id}

    async def messages(session_id: str) -> dict[str, Any]:
        rows = await known_session(tenant(), session_id)
        return {"object": "list", "data": [m.public() for m in rows]}

    async def usage() -> dict[str, Any]:
        """The caller's own usage by UTC day and model (a ``[[key]]`` key's;
        an ``--api-key`` key has no name to keep it under: an empty list)."""
        tenant()
        key = g.key
        if key is None:
            return {"object": "list", "key": None, "data": []}
        try:
            rows = await service.limits.limiter.usage(key.name)
        except LimitsUnavailable as exc:
            raise limits_unavailable() from exc
        return {"object": "list", "key": key.name, "data": [usage_row(r) for r in rows]}

    views = (healthz, metrics, models, get_run, cancel_run, interrupt, messages, usage)
    return {view.__name__: view for view in views}
