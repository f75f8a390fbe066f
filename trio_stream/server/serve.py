"""``serve()``: hypercorn's trio worker, assembled with our transport and shutdown.

We do not call ``hypercorn.trio.serve``: we build its pieces ourselves
(:class:`Connection`, a hypercorn ``TCPServer``, per connection, and
``trio.serve_listeners``'s accept loop, as :func:`_serve_listeners`) so that

* every accepted socket is a :class:`~trio_stream.http.transport.GuardedStream`
  (writes with a deadline, even inside hypercorn's shield), and
* shutdown follows docs/api.md section 3.7 exactly: 503 for new streams,
  ``--graceful-timeout`` for running ones, then cancel with reason
  ``shutdown``, save, cut the transports, and return.

Ownership (the whole tree is in docs/design.md section 3)::

    serve()
    └── open_service()                 store, upstream, metrics, RunManager
        ├── service nursery            manager (detached runs, reaper), pinger, bursts, mock ticker
        └── serve_service()
            └── connections nursery    one Connection per accepted socket
                ├── Connection         (hypercorn) one task per request -> http/chat.py
                └── accepting nursery  in the connections nursery's body
                    ├── _serve_listeners  starts each Connection.run in the connections nursery
                    └── (body)         waits for shutdown, then _drain

The accepting nursery closes first (stop accepting, grace period, cancel and
save), then the transports are cut and the connections nursery is cancelled.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from ..config import Settings
from ..http.app import TrioStreamApp
from ..http.service import Service, open_service
from ..http.transport import GuardedListener, TransportGuard
from ..logs import EventLogger
from ..store import Store
from ..upstream import Upstream
from . import hypercorn_fixes
from .asgi import ServerApp
from .connection import LightTCPServer

LOGGER = logging.getLogger("trio.serve_listeners")  # trio's, for its accept errors

#: After ``--graceful-timeout``: how long cancelled runs get to save and their
#: clients to receive the ``shutdown`` error event.  Keeps the whole shutdown
#: within ``--graceful-timeout`` + 2 s (docs/api.md section 3.7).
SHUTDOWN_CLEANUP = 0.6
SHUTDOWN_FLUSH = 0.25
#: The deadline of a connection's shielded close (FIN, TLS close_notify, close).
CLOSE_TIMEOUT = 1.0


class Connection(LightTCPServer):
    """hypercorn's per-connection server, with a close that cannot be cancelled
    (and, from :class:`~trio_stream.server.connection.LightTCPServer`, lighter while idle).

    hypercorn closes an HTTP/1.0 or ``Connection: close`` connection from
    *inside the app's last* ``send()``: the response ends, ``StreamClosed``
    goes to the h11 protocol, which first delivers ``http.disconnect`` to the
    app's ``receive()`` and then asks the server to close.  The app's
    disconnect watcher (ours in :mod:`~trio_stream.http.chat`, quart-trio's
    for every JSON route) wakes on that ``http.disconnect`` and cancels its
    nursery -- which holds the very task that is closing.  ``TCPServer._close``
    is cancelled at the first checkpoint of ``send_eof``, before the FIN and
    before ``aclose``, so the socket stays open and a response that ends only
    when the connection does (HTTP/1.0, or any response behind nginx's default
    proxy) never ends.  Plain hypercorn with an app that watches nothing does
    not show it: nothing cancels the sender.

    Closing is cleanup, so it is shielded, with a deadline (a TLS
    ``close_notify`` to a client that stopped reading could otherwise block).

    A plain connection also publishes a :class:`~trio_stream.http.transport.Link`
    to its request tasks (in ``LightTCPServer.run``), so that a streamed
    HTTP/1.1 body can be written without hypercorn's per-message path
    (:class:`~trio_stream.http.transport.DirectBody`).
    """

    async def _close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await super()._close()


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.certfile = settings.certfile
    config.keyfile = settings.keyfile
    config.alpn_protocols = ["h2", "http/1.1"]
    config.read_timeout = None  # an SSE client sends nothing while it listens
    # hypercorn's idle timer: it starts when a connection opens (and again when
    # a keep-alive response ends), is stopped only by a complete request head,
    # and is not re-armed by bytes.  So it closes idle keep-alive connections
    # *and* connections whose head never completes (stopped or dribbled) after
    # this many seconds.  From the head on, --body-timeout bounds the body.
    # Set here, not inherited, because docs/api.md section 3.9 promises these 5 s.
    config.keep_alive_timeout = 5.0
    # An HTTP/1.x request head (request line and headers) over 16 KiB is
    # answered 431 and its connection closed (docs/api.md section 3.10).  h11
    # checks this only on a head still incomplete, so a head that arrived in
    # one read went through: hypercorn_fixes fix 3 checks the complete one too.
    config.h11_max_incomplete_size = 16 * 1024
    config.graceful_timeout = settings.graceful_timeout
    config.accesslog = None
    # hypercorn ends a connection after 1,000 requests by default; on HTTP/2 it
    # then sends GOAWAY but never answers that stream, and its siblings stall.
    # Stream lifetimes are ours to bound (run and stall deadlines), not its.
    config.keep_alive_max_requests = 2**62
    return config


async def open_listeners(
    settings: Settings, config: Config, guard: TransportGuard,
    sockets: Sequence[socket.socket] = (),
) -> list[trio.abc.Listener[trio.abc.Stream]]:  # fmt: skip
    """Listen on ``--host``/``--port``, or on ``sockets`` bound by a parent
    (``--workers``: every worker accepts on the same socket).

    Cancellation: a checkpoint only while resolving ``--host``, before any socket exists, so a
    ``Cancelled`` leaves nothing open; given ``sockets``, no checkpoint at all.
    """
    if sockets:
        raw = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    else:
        raw = await trio.open_tcp_listeners(settings.port, host=settings.host)
    guarded = [GuardedListener(listener, guard) for listener in raw]
    ssl_context = config.create_ssl_context()
    if ssl_context is None:
        return list(guarded)
    return [trio.SSLListener(g, ssl_context, https_compatible=True) for g in guarded]


def _port(listener: trio.abc.Listener[trio.abc.Stream]) -> int:
    inner = listener.transport_listener if isinstance(listener, trio.SSLListener) else listener
    assert isinstance(inner, GuardedListener)
    return int(inner.socket.getsockname()[1])


async def serve(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    logger: EventLogger | None = None,
    store: Store | None = None,
    upstream: Upstream | None = None,
    sockets: Sequence[socket.socket] = (),
    reloads: trio.MemoryReceiveChannel[None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``settings`` until ``shutdown`` is set, then shut down gracefully.

    ``reloads``: each message reloads the configuration file's keys
    (:meth:`Service.reload_keys`; ``SIGHUP`` sends one).

    ``sockets``: already bound listening sockets to accept on instead of
    binding ``--host``/``--port`` (how ``--workers`` shares one port).

    ``task_status.started(port)`` is called once listening, so embedders and
    tests can ``port = await nursery.start(serve, settings)``.

    Cancellation: cancelling ``serve`` is an abrupt stop -- every run is
    cancelled, and each still saves in its shielded cleanup (bounded by
    ``--save-timeout``) before ``serve`` re-raises.  Set ``shutdown`` for the
    graceful path.
    """
    async with open_service(settings, logger=logger, store=store, upstream=upstream) as service:
        if reloads is None:
            await serve_service(
                service, shutdown=shutdown, sockets=sockets, task_status=task_status
            )
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_reload_keys_on, service, reloads)
            await serve_service(
                service, shutdown=shutdown, sockets=sockets, task_status=task_status
            )
            nursery.cancel_scope.cancel()


async def _reload_keys_on(service: Service, reloads: trio.MemoryReceiveChannel[None]) -> None:
    """Reload the configuration file's keys on each message (``SIGHUP``)."""
    async for _ in reloads:
        await service.reload_keys()


async def serve_service(
    service: Service,
    *,
    shutdown: trio.Event | None = None,
    sockets: Sequence[socket.socket] = (),
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an already open :class:`Service` (see :func:`serve`).

    Cancellation: an abrupt stop: the connections are cancelled, and with them the attached runs
    (children of their requests), each saved in its shielded cleanup before this returns;
    detached runs belong to the service, which the caller owns, and go on.  Set ``shutdown`` for
    the graceful path.
    """
    settings = service.settings
    hypercorn_fixes.apply(service.logger)
    app = TrioStreamApp(service)
    await app.startup()
    config = hypercorn_config(settings)
    guard = TransportGuard(settings.stall_timeout)
    listeners = await open_listeners(settings, config, guard, sockets)
    context = WorkerContext(None)
    asgi = ServerApp(app)  # like hypercorn's ASGIWrapper, without its coroutine frame

    class Logged(Connection):  # built by hypercorn's handler: the logger is the class's
        logger = service.logger  # for connection_crashed (LightTCPServer._crashed)

    handler = partial(Logged, asgi, config, context, ConnectionState({}))
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accept = trio.CancelScope()  # its own scope: _drain runs in this nursery's body

            async def serve_listeners() -> None:
                with accept:
                    await _serve_listeners(handler, listeners, connections)

            accepting.start_soon(serve_listeners)
            port = _port(listeners[0])
            scheme = "https" if settings.certfile else "http"
            service.logger.event("listening", url=f"{scheme}://{settings.host}:{port}", port=port)
            task_status.started(port)
            await (shutdown.wait() if shutdown is not None else await trio.sleep_forever())
            await _drain(service, context, accept.cancel)
            accepting.cancel_scope.cancel()
        guard.abort_all()
        connections.cancel_scope.cancel()
    service.logger.event("shutdown_complete")


#: Every connection task's name (trio builds ``f"{module}.{qualname}"`` anew
#: per spawn when it is not given one: a string per open connection).
CONNECTION_TASK = "trio_stream.server.serve.Connection.run"
#: trio's: accept errors that mean "out of resources": log, wait, accept again.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY = 0.1


async def _serve_listeners(
    handler: Callable[[trio.abc.Stream], Any],
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    connections: trio.Nursery,
) -> None:
    """``trio.serve_listeners(handler, listeners, handler_nursery=connections)``,
    starting each connection's ``run`` itself as its task: without trio's
    ``_run_handler`` frame and hypercorn's ``__await__`` wrapper, which an
    open connection held for its whole life, and with a constant task name.
    ``run`` closes its stream on every exit, as ``_run_handler`` did.

    Cancellation: runs until cancelled; each listener is closed on the way out.
    """
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_serve_one_listener, listener, handler, connections)


async def _serve_one_listener(
    listener: trio.abc.Listener[trio.abc.Stream],
    handler: Callable[[trio.abc.Stream], Any],
    connections: trio.Nursery,
) -> None:
    """trio 0.35's ``_serve_one_listener``, spawning ``handler(stream).run``.

    Cancellation: a checkpoint per accept; a ``Cancelled`` closes the listener.
    """
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                LOGGER.error(
                    "accept returned %s (%s); retrying in %s seconds",
                    errno.errorcode[exc.errno], os.strerror(exc.errno), ACCEPT_RETRY,
                    exc_info=True,
                )  # fmt: skip
                await trio.sleep(ACCEPT_RETRY)
                continue
            server = handler(stream)
            if isinstance(server, LightTCPServer):  # its run closes the stream on every exit
                connections.start_soon(server.run, name=CONNECTION_TASK)
            else:  # a stand-in (a test's hypercorn TCPServer): as trio's _run_handler
                connections.start_soon(_run_closing, server, stream, name=CONNECTION_TASK)


async def _run_closing(server: Any, stream: trio.abc.Stream) -> None:
    """trio's ``_run_handler``: run ``server``, then close ``stream`` whatever happened."""
    try:
        await server.run()
    finally:
        await trio.aclose_forcefully(stream)


async def _drain(
    service: Service, context: WorkerContext, stop_accepting: Callable[[], None]
) -> None:
    """docs/api.md section 3.7: 503 for new streams, a grace period, then cancel and save.

    A run that ends during the grace period is saved with the full
    ``--save-timeout``; once it is over, every cleanup -- those of the runs
    cancelled here, and a save still going from the grace period -- ends
    within ``SHUTDOWN_CLEANUP``.  See docs/design.md section 10.
    """
    s = service.settings
    service.shutting_down = True
    service.logger.event(
        "shutdown_start", runs=service.runs.live, streams=service.streams,
        graceful_timeout=s.graceful_timeout,
    )  # fmt: skip
    with trio.move_on_after(s.graceful_timeout):
        await service.runs.wait_idle()
        await service.wait_streams_closed()
    # Not before the grace period: once ``terminated`` is set hypercorn closes
    # every new connection unanswered, and during the grace period they get 503.
    stop_accepting()
    await context.terminated.set()  # hypercorn closes idle keep-alive connections
    service.runs.shorten_cleanups(SHUTDOWN_CLEANUP)
    service.runs.cancel_all("shutdown")
    with trio.move_on_after(SHUTDOWN_CLEANUP):
        await service.runs.wait_idle()
    with trio.move_on_after(SHUTDOWN_FLUSH):
        await service.wait_streams_closed()
