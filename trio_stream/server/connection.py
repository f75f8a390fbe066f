"""hypercorn's per-connection server, lighter for as long as a connection lives.

An open stream is mostly idle: its connection task waits for bytes, its
request task for the next event, its watcher for ``http.disconnect``.  What
each of them holds while it waits is the memory of an idle stream, so
:class:`LightTCPServer` (the base of :class:`trio_stream.server.serve.Connection`)
changes two things in hypercorn 0.18.0's trio ``TCPServer``, each measured
with ``tools/measure_idle.py`` (bytes per open idle stream):

* **the read loop** (in :meth:`LightTCPServer.run`): without hypercorn's
  ``fail_after(read_timeout)`` when there is no read timeout (ours: none; it
  still opened ``fail_after(inf)``: a cancel scope, its status and a
  generator, about 1 KB), and on plain TCP it waits for the socket to be
  readable itself, then reads: the waiting task then holds
  ``wait_readable``'s frames instead of the seven of
  ``GuardedStream.receive_some`` -> ``SocketStream.receive_some`` ->
  ``socket.recv`` -> ``wait_readable`` (about 1.7 KB);
* **the app's inbox** (:class:`AppInbox`): hypercorn hands each request's
  events (body, ``http.disconnect``) to the app through a trio memory
  channel of ``max_app_queue_size``: two channel objects, a state with a
  ``deque`` and two ``OrderedDict``\\ s (about 1.7 KB), and a receive that
  parks three frames deep.  The inbox is one slotted object with the same
  semantics (bounded, FIFO, blocking, cancellable).

It also publishes the connection's :class:`~trio_stream.http.transport.Link` to
its request tasks (the direct HTTP/1.1 body path), keeps its idle timer in an
:class:`IdleTimer`, whose restart cannot be cancelled halfway (see there:
with hypercorn's own, an HTTP/1.1 keep-alive connection was never closed once
it had served a request), and opens no handshake deadline on a plain
connection (hypercorn's ``fail_after`` before it finds out there is no TLS
left a 60 s deadline-heap entry per connection).  And (issue 18) ``run`` ends
only its own connection when anything in it raises
(:meth:`LightTCPServer._crashed`), a connection says GOAWAY before its idle
close, and the inbox never refuses ``http.disconnect``.  Everything else --
``run`` is hypercorn's, line for line, except the task group it opens, the
idle timer, the handshake, the read loop and the error guard -- is
hypercorn's own; the hypercorn functions it copies are pinned by
``tests/test_hypercorn_fork.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import h2.errors
import h2.exceptions
import outcome
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.typing import AppWrapper, ConnectionState
from hypercorn.utils import parse_socket_addr

from ..http.transport import DIRECT, LINK, GuardedStream, Link, send_whole
from ..logs import EventLogger
from .h2direct import close_flusher, direct_data

#: How long a GOAWAY may take to write before the connection is closed anyway.
GOAWAY_TIMEOUT = 1.0


#: Every request task's name: trio builds ``f"{module}.{qualname}"`` anew per
#: spawn when it is not given one (a string per open stream); this is that
#: same name, once.
REQUEST_TASK = "hypercorn.trio.task_group._handle"

#: The message types that end a request's events: never refused by :class:`AppInbox`.
FINAL = frozenset({"http.disconnect", "websocket.disconnect"})


class AppInbox:
    """A request's events on their way to the app: hypercorn's memory channel
    of ``capacity`` (``max_app_queue_size``), as one small object.

    ``send`` hands a message to a waiting receiver, else queues it, else
    (``capacity`` queued) waits for room.  ``receive`` takes the oldest
    message, else waits.  Both are checkpoints and cancellable, and waiters
    are served first come, first served -- as with the channel.

    Except for the last message of a request, ``http.disconnect`` (or
    ``websocket.disconnect``): ``send`` delivers it whatever the sending task
    is -- cancelled, or facing a full inbox (it is queued one over
    ``capacity``; hypercorn sends it at most once per request) -- and is
    then a schedule point that cannot raise ``Cancelled``.  hypercorn tells
    every stream of a closing HTTP/2 connection in one loop, from whichever
    task found the connection closed: when that was a request task writing
    its response head, the disconnect it had just delivered to its own
    stream woke its own watcher, which cancelled that very task, and the
    next stream's ``send`` raised ``Cancelled`` after hypercorn had already
    marked that stream closed: that stream was never told, and its request
    ran on until ``--stall-timeout`` (issue 18, item 4).
    """

    __slots__ = ("_capacity", "_items", "_receivers", "_senders")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        # Each list is made on first use: most requests queue one message
        # (their body) and then keep one receiver (the disconnect watcher).
        self._items: list[Any] | None = None
        self._receivers: list[trio.lowlevel.Task] | None = None
        self._senders: list[trio.lowlevel.Task] | None = None

    async def send(self, message: Any) -> None:
        """hypercorn's side: queue ``message`` for the app.  Cancellation: a checkpoint (as a trio
        memory channel's ``send``); a ``Cancelled`` while it waits for room leaves the message
        unsent; ``http.disconnect`` is delivered whatever the sending task is (class docstring).
        """
        if isinstance(message, dict) and message.get("type") in FINAL:
            self._put_final(message)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._receivers:
                trio.lowlevel.reschedule(self._receivers.pop(0), outcome.Value(message))
                break
            if self._items is None:
                self._items = []
            if len(self._items) < self._capacity:
                self._items.append(message)
                break
            if self._senders is None:
                self._senders = []
            await _park(self._senders)  # woken by a receive: look again
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _put_final(self, message: Any) -> None:
        """Hand ``message`` to a waiting receiver, else queue it, room or not."""
        if self._receivers:
            trio.lowlevel.reschedule(self._receivers.pop(0), outcome.Value(message))
            return
        if self._items is None:
            self._items = []
        self._items.append(message)

    def queued(self) -> bool:
        """Is a message queued (the next ``receive`` returns without waiting)?"""
        return bool(self._items)

    async def receive(self) -> Any:
        """The app's ``receive()``.  Cancellation: a checkpoint; a ``Cancelled`` while it waits
        takes no message (the next receive gets it).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._items:
            message = self._items.pop(0)
            if self._senders:
                trio.lowlevel.reschedule(self._senders.pop(0))
            await trio.lowlevel.cancel_shielded_checkpoint()
            return message
        # As _park, inline: the disconnect watcher waits here for its whole
        # life, and a frame less is memory less per open stream.
        if self._receivers is None:
            self._receivers = []
        receivers = self._receivers
        task = trio.lowlevel.current_task()
        receivers.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            receivers.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)


async def _park(queue: list[trio.lowlevel.Task]) -> Any:
    """Wait in ``queue`` until rescheduled (with a value, or ``None``); a
    cancelled waiter leaves the queue."""
    task = trio.lowlevel.current_task()
    queue.append(task)

    def abort(_: object) -> trio.lowlevel.Abort:
        queue.remove(task)
        return trio.lowlevel.Abort.SUCCEEDED

    return await trio.lowlevel.wait_task_rescheduled(abort)


class LightTaskGroup(TaskGroup):
    """hypercorn's trio task group, with an :class:`AppInbox` per request."""

    async def spawn_app(
        self, app: AppWrapper, config: Config, scope: Any, send: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        """Start the app's request task in this group; returns its inbox's ``send``.  Cancellation:
        not a checkpoint.
        """
        inbox = AppInbox(config.max_app_queue_size)
        assert self._nursery is not None  # inside ``async with``, as hypercorn's
        direct = direct_data(LINK.get(None), send)
        # The request task inherits this context (trio copies it at
        # start_soon): an HTTP/2 stream's body may be written directly.
        token = DIRECT.set(direct) if direct is not None else None
        try:
            self._nursery.start_soon(
                _handle, app, config, scope, inbox.receive, send,
                trio.to_thread.run_sync, trio.from_thread.run, name=REQUEST_TASK,
            )  # fmt: skip
        finally:
            if token is not None:
                DIRECT.reset(token)
        return inbox.send


def _leaves(group: BaseException) -> list[BaseException]:
    """The exceptions in ``group`` (nested groups flattened), or ``group`` itself."""
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


class IdleTimer:
    """The connection's idle timer: hypercorn's ``TrioSingleTask``, restarted
    and stopped without a checkpoint.

    hypercorn restarts the timer when a response ends (``Updated(idle=True)``
    from the protocol) -- from inside the app's last ``send()``, right after
    it delivered ``http.disconnect`` to the app's ``receive()``.  The app's
    disconnect watcher (ours in :mod:`~trio_stream.http.stream`, quart-trio's for
    every JSON route) wakes on it and cancels its nursery, which holds the
    very task that is restarting the timer.  ``TrioSingleTask.restart`` takes
    a lock and awaits ``nursery.start``: checkpoints, where that ``Cancelled``
    lands.  The old timer was stopped when the request's head arrived, so no
    timer ran any more, and an idle keep-alive connection stayed open for
    ever (HTTP/1.1 and TLS; on HTTP/2 a stream's end restarts it the same
    way).  The same family as the close that ``server.serve.Connection._close``
    shields.

    Here both are synchronous underneath (cancel a scope; ``start_soon`` a
    task into the connection's task group, which the app's scopes do not
    cover), so there is nothing to cancel, whatever task they run in.  The
    timer task exists only while the connection is idle, as hypercorn's.
    """

    __slots__ = ("_scope",)

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None

    async def restart(self, task_group: TaskGroup, action: Callable[[], Awaitable[None]]) -> None:
        """Stop the running timer, if any, and start ``action`` as the new one.

        Not a checkpoint, on purpose (see the class): it cannot be cancelled,
        and it never waits.
        """
        self._stop()
        scope = self._scope = trio.CancelScope()
        task_group.spawn(_timer, scope, action)

    async def stop(self) -> None:
        """Stop the running timer, if any.  Not a checkpoint (see the class)."""
        self._stop()

    def _stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()  # also before the task has entered it
            self._scope = None


async def _timer(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await trio.lowlevel.checkpoint_if_cancelled()  # stopped before it ran: never act
        await action()


class LightTCPServer(TCPServer):
    """hypercorn's trio ``TCPServer`` with the read loop, the app inbox and
    the idle timer above, which ends only itself when its handling raises
    (:meth:`_crashed`), and says GOAWAY before it closes an idle HTTP/2
    connection."""

    #: Where ``connection_crashed`` is logged (``server.serve_service`` sets it).
    logger: EventLogger | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.idle_task = IdleTimer()  # type: ignore[assignment]

    async def run(self) -> None:
        """Serve one connection until it closes.

        Cancellation: a ``Cancelled`` (the server's shutdown) cancels the
        connection's request tasks, then its ``finally`` closes the connection
        (``server.serve.Connection._close`` shields that close, with a deadline).
        """
        try:
            # hypercorn 0.18.0's TCPServer.run, with LightTaskGroup for TaskGroup,
            # and no handshake deadline on a plain connection: hypercorn entered
            # fail_after(ssl_handshake_timeout) before finding out there is no
            # handshake, and the exited scope's entry stayed in trio's deadline
            # heap (holding the scope) for that long -- 60 s, per connection.
            # And once the read loop ends, the idle timer is stopped (see there).
            if isinstance(self.stream, trio.SSLStream):
                try:
                    with trio.fail_after(self.config.ssl_handshake_timeout):
                        await self.stream.do_handshake()
                except (trio.BrokenResourceError, trio.TooSlowError):
                    return  # Handshake failed
                alpn_protocol = self.stream.selected_alpn_protocol()
                socket = self.stream.transport_stream.socket
                ssl = True
            else:  # Not SSL
                alpn_protocol = "http/1.1"
                socket = self.stream.socket
                ssl = False

            try:
                client = parse_socket_addr(socket.family, socket.getpeername())
                server = parse_socket_addr(socket.family, socket.getsockname())
                # The request tasks (spawned from this task) inherit it: their
                # bodies may be written directly (transport.DirectBody on plain
                # HTTP/1.1, h2direct.DirectData on HTTP/2).
                LINK.set(Link(self.stream, self.send_lock, self._broken))

                async with LightTaskGroup() as task_group:
                    self._task_group = task_group
                    self.protocol = ProtocolWrapper(
                        self.app, self.config, self.context, task_group,
                        ConnectionState(self.state), ssl, client, server,
                        self.protocol_send, alpn_protocol,
                    )  # fmt: skip
                    await self.protocol.initiate()
                    await self.idle_task.restart(self._task_group, self._idle_timeout)
                    if self.config.read_timeout is not None:
                        await self._read_data()  # hypercorn's loop, with its deadline
                        close_flusher(self.protocol.protocol)  # as below
                        await self.idle_task.stop()  # as below
                        return
                    # The read loop (see the module docstring), here rather than
                    # in a method of its own: one frame fewer while it waits.
                    sock = self.stream.socket if isinstance(self.stream, GuardedStream) else None
                    while True:
                        try:
                            if sock is not None and sock.fileno() >= 0:  # closed: the read says so
                                await trio.lowlevel.wait_readable(sock)
                            data = await self.stream.receive_some(MAX_RECV)
                        except (trio.ClosedResourceError, trio.BrokenResourceError):
                            break
                        await self.protocol.handle(RawData(bytes(data)))
                        if data == b"":
                            break
                    await self.protocol.handle(Closed())
                    close_flusher(self.protocol.protocol)  # h2direct: its task ends
                    # The peer is gone: a running idle timer has nothing left to
                    # time, and the task group would wait for it (up to
                    # keep_alive_timeout) before the socket is closed.
                    await self.idle_task.stop()
            except* OSError:
                pass  # hypercorn's: the socket went away under us
            except* Exception as group:
                await self._crashed(group)  # this connection ends; the server goes on
            finally:
                await self._close()
        finally:
            # What trio's ``_run_handler`` did around it (the connection task
            # runs this method itself: ``serve._serve_listeners``): the stream
            # is closed on every exit, also a failed TLS handshake's.
            await trio.aclose_forcefully(self.stream)

    async def _crashed(self, group: BaseExceptionGroup[Exception]) -> None:
        """What an error out of this connection's handling ends: the connection.

        Any exception that is not ``Cancelled`` -- from the read loop, from
        hypercorn's protocol (an ``h2``, ``priority`` or ``KeyError`` it does
        not catch), from its send task or idle timer, or from a request task
        outside the app (hypercorn's ``_handle`` logs the app's own errors) --
        has by now cancelled and awaited every other task of this connection,
        and would next end ``serve_service``'s connections nursery: the whole
        server.  It ends here instead: ``connection_crashed`` is logged, an
        HTTP/2 peer gets ``GOAWAY(INTERNAL_ERROR)`` if the write goes through
        within ``GOAWAY_TIMEOUT``, and the caller closes the socket.

        Cancellation: the GOAWAY write is shielded (cleanup, with its deadline).
        """
        if self.logger is not None:
            errors = ", ".join(repr(e) for e in _leaves(group))
            self.logger.event("connection_crashed", http=self._http_version(), error=errors)
        await self._goaway(h2.errors.ErrorCodes.INTERNAL_ERROR, shield=True)

    async def _initiate_server_close(self) -> None:
        """hypercorn's close of an idle connection (``keep_alive_timeout``, or
        the shutdown), with ``GOAWAY(NO_ERROR)`` first on HTTP/2: the peer
        then knows that no stream was lost (RFC 9113 section 6.8).  hypercorn
        runs it shielded; the GOAWAY write has ``GOAWAY_TIMEOUT``."""
        await self._goaway(h2.errors.ErrorCodes.NO_ERROR, shield=False)
        await super()._initiate_server_close()

    async def _goaway(self, code: h2.errors.ErrorCodes, *, shield: bool) -> None:
        """Send GOAWAY with ``code`` on an HTTP/2 connection; a no-op on
        HTTP/1.x, on a connection already closed, or when ``h2`` refuses.
        The write takes hypercorn's send lock and at most ``GOAWAY_TIMEOUT``."""
        wrapper = getattr(self, "protocol", None)  # none if the crash came before it
        protocol = getattr(wrapper, "protocol", None)
        if not isinstance(protocol, H2Protocol) or protocol.closed:
            return
        try:
            protocol.connection.close_connection(error_code=code)
        except h2.exceptions.H2Error:
            return
        data = protocol.connection.data_to_send()
        with trio.CancelScope(shield=shield), trio.move_on_after(GOAWAY_TIMEOUT):
            async with self.send_lock:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.send_all(data)

    async def protocol_send(self, event: Event) -> None:
        """hypercorn's, except that an HTTP/2 connection's bytes are written by
        ``transport.send_whole``: the send lock is then held across no schedule
        point when the lock is free and the kernel takes the bytes at once
        (its schedule point comes after the release).
        hypercorn's held it across two (the lock's and ``send_all``'s), and a
        held lock makes ``h2direct.DirectData`` decline: under load nearly
        every chunk took hypercorn's path (``h2direct``'s module docstring).

        Cancellation: a checkpoint, after the lock is released (a ``Cancelled``
        while it waits for the lock writes nothing; a write that waits for
        the socket is shielded, bounded by the stall deadline, as hypercorn's
        shielded ``send_all``).
        """
        wrapper = getattr(self, "protocol", None)
        if not isinstance(event, RawData) or not isinstance(
            getattr(wrapper, "protocol", None), H2Protocol
        ):
            await super().protocol_send(event)
            return
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await send_whole(self.stream, event.data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.protocol.handle(Closed())
        finally:
            lock.release()
        # hypercorn's was always a schedule point, and its callers (the send
        # task's loop, the read loop's handling) count on one: it stays,
        # after the lock is released.
        await trio.lowlevel.checkpoint()

    def _http_version(self) -> str:
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)
        return "2" if isinstance(protocol, H2Protocol) else "1.1"

    async def _broken(self) -> None:
        """A direct body write failed: what hypercorn does when its own fails
        (the protocol delivers ``http.disconnect`` to the app)."""
        await self.protocol.handle(Closed())
