"""Redis connections as trio-stream opens them: coredis 6.9, with four of its rules changed.

Every Redis user (the shared state, :mod:`.redis`; the limiter,
:mod:`trio_stream.limits.redis`) opens its client with :func:`redis_client`.
What differs from coredis 6.9 as shipped, and why:

1. **A connection's buffers are closed however its task ends** -- also when
   it is cancelled while it connects (coredis leaves its six memory streams
   open, and each warns when collected).
2. **Idleness counts from the last reply, and a connection with requests in
   flight is never closed as idle.**  coredis arms ``max_idle_time`` around
   each socket read, from the last byte received: a request sent on a
   connection that had sat idle for almost that long got only the rest of it
   for its reply, and a late reply (a busy Redis, a node whose own loop is
   saturated) cut the connection under it -- failing the request with an
   argument-less ``TimeoutError``, on which coredis's pipeline error
   formatting raises ``IndexError``.  Here the clock restarts when a request
   is sent on a connection with none in flight and at every byte received;
   with requests in flight the connection is closed only after
   ``max(max_idle_time, REPLY_STUCK)`` without a byte (a peer that is gone
   without a FIN, long after every caller's own deadline), and then with a
   :class:`coredis.exceptions.ConnectionError` that says so.
3. **A connection that dies while lent out gives its slot back to the
   pool.**  coredis 6.9 returns a slot only for a connection that is usable
   when released, so every connection that broke or was invalidated while
   lent (a pipeline or a blocking ``XREAD`` cut by its caller's deadline or
   cancelled, a Redis restart) lowered the pool's capacity for good: after
   ``max_connections`` of them every call waited for a connection for ever.
4. **The subscriber has a connection of its own** (:func:`listen`), outside
   the pool, never closed for idleness, checked by a ``PING`` every
   :data:`LISTEN_PING`; when it is lost it is subscribed again and the caller
   re-reads what it may have missed meanwhile (pub/sub delivers only to a
   subscribed connection).  coredis's ``PubSub`` took its connection from the
   client's pool, where ``max_idle_time`` closed it whenever no message came
   for that long, and it resubscribed silently, so nobody knew to re-read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import coredis
import coredis.exceptions
import trio

CONNECT_TIMEOUT = 0.5  # connecting to Redis: refused or unanswered, it is down
#: The deadline of one Redis call.  It is measured on this node's own event
#: loop, which a burst of requests can keep busy for a second or more while
#: Redis answers in microseconds: so a call that merely took long fails (503)
#: but does not make the node "unhealthy" -- only the heartbeat and a refused
#: or broken connection do that.
CALL_TIMEOUT = 2.0
#: With requests in flight, a connection is closed after at least this long
#: without a byte from Redis: by then every caller's own deadline is long past.
REPLY_STUCK = 2 * CALL_TIMEOUT
LISTEN_PING = 1.0  # how often the subscriber checks its connection
LISTEN_RETRY = 0.2  # how long the subscriber waits before subscribing again


class _Rules(coredis.BaseConnection):
    """Rules 1 and 2 over a coredis connection class (TCP or Unix socket)."""

    _idle_wait: anyio.CancelScope | None = None
    _progress = -math.inf  # when the connection last made progress (see rule 2)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """coredis's connection task, closing its six buffers however it ends.

        Cancellation: as coredis's own ``run``; a ``Cancelled`` (also one that
        lands during the TCP connect) leaves no buffer open.
        """
        try:
            await super().run(task_status=task_status)
        finally:
            for buffer in (
                self._write_buffer_in, self._write_buffer_out,
                self._push_message_buffer_in, self._push_message_buffer_out,
                self._streamed_message_buffer_in, self._streamed_message_buffer_out,
            ):  # fmt: skip
                buffer.close()

    def _quiet_limit(self) -> float | None:
        """How long the connection may now go without a byte from Redis."""
        if self._max_idle_time is None:
            return None
        if self._requests:
            return max(self._max_idle_time, REPLY_STUCK)
        return self._max_idle_time

    def _rearm(self) -> None:
        limit = self._quiet_limit()
        if self._idle_wait is not None:
            self._idle_wait.deadline = math.inf if limit is None else self._progress + limit

    def _sent(self, had_requests: bool) -> None:
        """A request was queued: on a connection with none in flight, the clock restarts."""
        if self._requests and not had_requests:
            self._progress = anyio.current_time()
        self._rearm()

    def create_request(self, *args: Any, **kwargs: Any) -> Any:
        had = bool(self._requests)
        request = super().create_request(*args, **kwargs)
        self._sent(had)
        return request

    def create_request_batch(self, *args: Any, **kwargs: Any) -> Any:
        had = bool(self._requests)
        batch = super().create_request_batch(*args, **kwargs)
        self._sent(had)
        return batch

    async def _reader_task(self) -> None:
        """coredis's reader, with rule 2's deadline instead of ``fail_after(max_idle_time)``."""
        self._progress = anyio.current_time()
        while self.stream is not None:
            with anyio.CancelScope() as wait:
                self._idle_wait = wait
                self._rearm()
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError,
                        anyio.BrokenResourceError) as err:  # fmt: skip
                    self._transport_failed = True
                    raise coredis.exceptions.ConnectionError(
                        "Connection lost while receiving response"
                    ) from err
                except Exception:
                    self._transport_failed = True
                    raise
                finally:
                    self._idle_wait = None
            if wait.cancelled_caught:
                limit = self._quiet_limit()
                if limit is not None and anyio.current_time() < self._progress + limit:
                    continue  # a request came as the deadline passed: not idle any more
                self._terminated = True  # no longer lent out from here on
                what = "with requests in flight" if self._requests else "idle"
                raise coredis.exceptions.ConnectionError(
                    f"Connection closed: no reply for {limit} s ({what})"
                )
            self.statistics.data_received(len(data))
            self._progress = anyio.current_time()
            if not self._requests:  # push messages: as coredis, bounded by the budget
                async with self._processing_budget:
                    self._data_received(data)
            else:
                self._data_received(data)


class _TCPConnection(_Rules, coredis.TCPConnection):
    """A TCP connection with rules 1 and 2."""


class _UnixConnection(_Rules, coredis.UnixDomainSocketConnection):
    """A Unix socket connection with rules 1 and 2."""


class _Pool(coredis.ConnectionPool[Any]):
    """coredis's pool with rule 3: a connection that is not usable when
    released (it broke, or was invalidated, while lent) gives its slot back."""

    def release(self, connection: Any) -> None:
        if connection.usable:
            super().release(connection)
            return
        self.statistics.connection_released(connection)
        self._available_connections.put_nowait(None)  # a new connection may take it


def redis_client(url: str, *, max_idle_time: int | None) -> coredis.Redis[str]:
    """A coredis client as every Redis user of trio-stream opens it: string
    replies, :data:`CONNECT_TIMEOUT` to connect, :data:`CALL_TIMEOUT` per
    reply, at most 64 connections, idle ones closed after ``max_idle_time``
    seconds (rule 2), the connection classes of rules 1 and 2 and the pool of
    rule 3.  Opens nothing: connections are made on first use."""
    pool = _Pool.from_url(
        url, decode_responses=True, connect_timeout=CONNECT_TIMEOUT,
        stream_timeout=CALL_TIMEOUT, max_connections=64, max_idle_time=max_idle_time,
    )  # fmt: skip
    if pool.connection_class is coredis.TCPConnection:
        pool.connection_class = _TCPConnection
    elif pool.connection_class is coredis.UnixDomainSocketConnection:
        pool.connection_class = _UnixConnection
    return coredis.Redis(connection_pool=pool, decode_responses=True)


def _own_connection(client: coredis.Redis[str]) -> coredis.BaseConnection:
    """A connection to ``client``'s Redis outside its pool, never closed for idleness."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "processing_budget"}
    kwargs["max_idle_time"] = None
    connection: coredis.BaseConnection = pool.connection_class(pool.location, **kwargs)
    return connection


async def listen(
    client: coredis.Redis[str],
    channels: Sequence[str],
    deliver: Callable[[str, str], None],
    caught_up: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Deliver each message published to ``channels`` (``deliver(channel, data)``), for ever.

    Rule 4: one connection of its own, subscribed to every channel; a
    ``PING`` every :data:`LISTEN_PING` that gets no answer within
    :data:`CALL_TIMEOUT`, or a connection that breaks, counts as a lost
    subscription, and a new connection subscribes again after
    :data:`LISTEN_RETRY`.  Messages published while no connection was
    subscribed are lost to it, so once subscribed (again) it awaits
    ``caught_up()``, which re-reads the state those messages announce.

    Reports started once subscribed, or once the first attempt failed (the
    caller's pollers stand in until a later attempt succeeds).

    Cancellation: a ``Cancelled`` closes the connection (no ``UNSUBSCRIBE``:
    closing it unsubscribes).
    """
    first = True
    while True:
        try:
            async with trio.open_nursery() as nursery:
                connection = _own_connection(client)
                await nursery.start(connection.run)
                async with contextlib.aclosing(connection.push_messages) as messages:
                    await _subscribe(connection, messages, channels, deliver)
                    await caught_up()
                    if first:
                        first = False
                        task_status.started()
                    nursery.start_soon(_keep_alive, connection)
                    async for message in messages:
                        _dispatch(message, deliver)
        except* (coredis.exceptions.RedisError, OSError, trio.TooSlowError,
                 anyio.BrokenResourceError, anyio.ClosedResourceError):  # fmt: skip
            pass  # lost: subscribe again below (and catch up then)
        if first:
            first = False
            task_status.started()
        await trio.sleep(LISTEN_RETRY)


async def _subscribe(
    connection: coredis.BaseConnection, messages: AsyncIterator[list[Any]],
    channels: Sequence[str], deliver: Callable[[str, str], None],
) -> None:  # fmt: skip
    """``SUBSCRIBE`` and wait for every channel's acknowledgement (a message that
    comes meanwhile is delivered)."""
    connection.send_command(b"SUBSCRIBE", *channels)
    waiting = set(channels)
    with trio.fail_after(CALL_TIMEOUT):
        while waiting:
            message = await anext(messages)
            if str(message[0]) == "subscribe":
                waiting.discard(str(message[1]))
            else:
                _dispatch(message, deliver)


def _dispatch(message: list[Any], deliver: Callable[[str, str], None]) -> None:
    if str(message[0]) == "message":
        deliver(str(message[1]), str(message[2]))


async def _keep_alive(connection: coredis.BaseConnection) -> None:
    """Raise :class:`trio.TooSlowError` once a ``PING`` goes unanswered for
    :data:`CALL_TIMEOUT` (a stopped Redis, a connection gone without a FIN)."""
    while True:
        await trio.sleep(LISTEN_PING)
        with trio.fail_after(CALL_TIMEOUT):
            await connection.create_request(b"PING", timeout=math.inf)
