"""The HTTP application: a quart-trio app with two raw-ASGI streaming routes.

Quart serves the JSON routes.  The two streaming routes
(``POST /v1/chat/completions`` and ``GET /v1/runs/{id}/events``) are matched in
:meth:`TrioStreamApp.__call__` before Quart sees the request and run as raw
ASGI endpoints (:mod:`trio_stream.endpoints`), because:

* their writer, upstream reader and disconnect watcher must be sibling tasks
  in a nursery *we* own (quart-trio iterates a body generator in a nursery of
  its own, so ours would have to yield inside a nursery it opened: trio
  issues #264 and #638, PEP 789; docs/design.md section 4);
* quart-trio cuts every response body off after ``RESPONSE_TIMEOUT``;
* it is the hot path, and the raw endpoint makes one ASGI send per batch.
"""

from __future__ import annotations

import re
from collections.abc import Coroutine
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import metrics as metrics_mod
from . import responses
from .asgi import Receive, Scope, Send, close_headers, framing_conflict, send_error
from .endpoints import chat_completions, run_events
from .errors import (
    ApiError,
    ambiguous_framing,
    body_timeout,
    error_body,
    method_not_allowed,
    not_found,
    store_unavailable,
    unknown_route,
)
from .playground import add_playground
from .protocol import parse_session_id
from .service import Service
from .store import Message, StoreUnavailable

_EVENTS = re.compile(r"/v1/runs/([^/]+)/events")
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
        _routes(self)
        add_playground(self)  # GET /: the browser playground

    def __call__(  # type: ignore[override]
        self, scope: Scope, receive: Receive, send: Send
    ) -> Coroutine[Any, Any, None]:
        """Route a request: the handler's coroutine, for the server to await.

        A plain function, not ``async def``: the request task then awaits the
        handler itself, and this dispatch costs no coroutine frame for as long
        as the request lives (one open stream holds its request task's whole
        chain of frames).
        """
        if scope["type"] == "http":
            if framing_conflict(scope):  # before any route reads a body it cannot trust
                error = ambiguous_framing()
                return send_error(send, error, close_headers(error, scope["http_version"]))
            path, method = scope["path"], scope["method"]
            if path == "/v1/chat/completions":
                if method == "POST":
                    return chat_completions(self.service, scope, receive, send)
                return send_error(send, method_not_allowed(method, path), _allow(b"POST"))
            if path == "/v1/responses" or path.startswith("/v1/responses/"):
                return responses.handle(self.service, scope, receive, send)
            if m := _EVENTS.fullmatch(path):
                if method == "GET":
                    return run_events(self.service, scope, receive, send, m[1])
                return send_error(send, method_not_allowed(method, path), _allow(b"GET"))
        return super().__call__(scope, receive, send)  # type: ignore[arg-type]


def _allow(methods: bytes) -> tuple[tuple[bytes, bytes]]:
    return ((b"allow", methods),)


def _json(body: bytes, status: int = 200) -> Response:
    return Response(body, status=status, content_type=_JSON)


def _routes(app: TrioStreamApp) -> None:
    service = app.service

    def tenant() -> str:
        return service.auth.tenant(request.headers.get("authorization"))

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        response = _json(exc.body(), exc.status)
        for name, value in (*exc.headers, *close_headers(exc, request.http_version)):
            response.headers[name.decode()] = value.decode()
        return response

    @app.errorhandler(StoreUnavailable)
    async def store_error(exc: StoreUnavailable) -> Response:
        """Any route that reads saved messages: 503 + Retry-After, never 500."""
        service.logger.event("store_unavailable", path=request.path, error=str(exc))
        return await api_error(store_unavailable())

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

    @app.get("/healthz")
    async def healthz() -> Response:
        if not service.runs.shared.healthy:  # cluster mode with Redis unreachable
            return _json(b'{"status":"degraded"}', 503)
        return _json(b'{"status":"ok"}')

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), content_type=metrics_mod.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        tenant()
        return {"object": "list", "data": await service.upstream.models()}

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
            "status": {"complete": "completed", "partial": "cancelled"}.get(
                saved.status, saved.status
            ),
            "reason": saved.reason,
            "content": saved.content,
            "events": saved.events,
            "detached": saved.detached,
        }

    @app.get("/v1/runs/<run_id>")
    async def get_run(run_id: str) -> dict[str, Any]:
        owner = tenant()
        run = service.runs.get(owner, run_id)
        if run is not None:
            return run.public()
        record = await service.runs.remote(owner, run_id)
        if record is not None and (record.detached or record.status == "running"):
            return await service.runs.remote_public(record)
        return await saved_run(owner, run_id)

    @app.post("/v1/runs/<run_id>/cancel")
    async def cancel_run(run_id: str) -> dict[str, Any]:
        """Idempotent: a run that already ended (even one gone from memory) is
        answered as it is, unchanged."""
        owner = tenant()
        run = service.runs.get(owner, run_id)
        if run is not None:
            service.runs.cancel(run, "stopped")
            return run.public()
        record = await service.runs.remote(owner, run_id)
        if record is None:
            return await saved_run(owner, run_id)
        if await service.runs.cancel_id(run_id, "stopped"):
            # Answer the final object: wait (bounded) for the owner's cleanup;
            # for a detached run, for its log's end (shipped after it).
            timeout = service.settings.supersede_timeout
            if record.detached:
                mirror = service.runs.mirror(record)
                with trio.move_on_after(timeout):
                    await service.runs.feed(mirror, 0)
                end = mirror.log.outcome  # None: not in time; or Redis went away
                if end is not None and end.reason != "shared_state_unavailable":
                    return mirror.public()
            else:
                await service.runs.shared.wait_finished([run_id], timeout)
            record = await service.runs.remote(owner, run_id) or record
        if not record.detached and (saved := await saved_public(owner, run_id)) is not None:
            return saved  # an attached run's text is only in its row
        # A detached run's log; or an attached run with nothing saved (it
        # produced nothing, or its owner has not finished): its record.
        return await service.runs.remote_public(record)

    async def known_session(owner: str, session_id: str) -> list[Message]:
        """A session is known while it has a live run or saved messages (404 otherwise)."""
        parse_session_id(session_id)
        rows = await service.store.session_messages(owner, session_id)
        if not rows and not await service.runs.session_known(owner, session_id):
            raise not_found(f"No session {session_id!r}.")
        return rows

    @app.post("/v1/sessions/<session_id>/interrupt")
    async def interrupt(session_id: str) -> dict[str, Any]:
        owner = tenant()
        await known_session(owner, session_id)
        run_id = await service.runs.current(owner, session_id)
        interrupted = run_id is not None and await service.runs.cancel_id(run_id, "interrupted")
        return {"interrupted": interrupted, "run_id": run_id}

    @app.get("/v1/sessions/<session_id>/messages")
    async def messages(session_id: str) -> dict[str, Any]:
        rows = await known_session(tenant(), session_id)
        return {"object": "list", "data": [m.public() for m in rows]}
