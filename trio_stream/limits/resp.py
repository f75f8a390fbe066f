"""One pipelined connection to Redis, for the limiter's scripts.

Every request of a limited key makes Redis calls (its admission, its
charges, its stream slot's release), so their cost is the cost of limits.
A general client pays per call for a pool checkout, a retry policy and a
request object; here every call of the process shares one connection:

* a call encodes its command and appends it, with its reply slot, to the
  connection's out-box and its queue of replies, in one step without a
  checkpoint -- so the order of the queue is the order of the bytes;
* one writer task sends whatever the out-box holds in one write (the calls
  made while a write was in flight go out together: a burst of admissions
  costs one system call, and Redis answers them in one read);
* one reader task parses the replies (RESP2, with hiredis's parser) and
  hands each to the oldest waiting slot.

A call that is cancelled or times out after its command was queued leaves
its slot in the queue: the reader still consumes its reply, so the replies
after it stay matched.

Failure modes: a connection that cannot be opened, or that breaks (reset,
EOF, a reply that cannot be parsed), fails every call waiting on it with
:class:`~.base.LimitsUnavailable` at once; the next call opens a new one.
A Redis that does not answer at all is bounded by the caller's deadline
(:meth:`RedisLimiter._call <trio_stream.limits.redis.RedisLimiter._call>`);
once the oldest call has waited :data:`STALL` seconds, the next call drops
the connection (failing its calls) and opens another, so a Redis that
stopped answering without closing the connection never grows the queue for
ever.  A login (``AUTH``, ``SELECT``) that is refused drops the connection
too.

URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS,
the system's CAs) and ``unix://[[user]:password@]/path[?db=N]``.

Never imports coredis.
"""

from __future__ import annotations

import collections
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import trio

from .base import CALL_TIMEOUT, LimitsUnavailable

#: Seconds to open a connection (the shared state's bound).
CONNECT_TIMEOUT = 2.0
#: A connection whose oldest call has waited this long for its reply is
#: dropped at the next call (a Redis that stopped answering without closing
#: the connection: its queue must not grow for ever).
STALL = 2 * CALL_TIMEOUT


class ReplyError(Exception):
    """An error reply of Redis (``-ERR ...``): a bug or a misconfiguration."""


@dataclass(frozen=True, slots=True)
class Address:
    """Where Redis is and how to log in."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def parse(cls, url: str) -> Address:
        parts = urlsplit(url)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if parts.scheme == "unix":
            db = int((parse_qs(parts.query).get("db") or ["0"])[0])
            return cls(path=parts.path, username=username, password=password, db=db)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a Redis URL: {url!r}")
        db = int(parts.path.strip("/") or 0)
        return cls(
            parts.hostname or "127.0.0.1", parts.port or 6379, tls=parts.scheme == "rediss",
            username=username, password=password, db=db,
        )  # fmt: skip


def encode(args: tuple[str | bytes, ...]) -> bytes:
    """A command in RESP: an array of bulk strings (hiredis's encoder)."""
    # hiredis's stub types the argument as a 1-tuple; any length is accepted.
    packed: bytes = hiredis.pack_command(cast(Any, args))
    return packed


#: What :meth:`hiredis.Reader.gets` returns while the buffer does not hold a
#: whole reply yet (RESP2 has no reply it could be mistaken for).
INCOMPLETE = object()


def reply_reader() -> hiredis.Reader:
    """A RESP2 parser (hiredis, the C parser redis-py uses): bulk strings as
    str, an error reply as a :class:`ReplyError` value (never raised), and
    bytes that are not RESP raised as ``ValueError``."""
    return hiredis.Reader(
        protocolError=ValueError, replyError=ReplyError, encoding="utf-8",
        notEnoughData=INCOMPLETE,
    )  # fmt: skip


class _Slot:
    """Where one call's reply arrives."""

    __slots__ = ("at", "done", "error", "value")

    def __init__(self) -> None:
        self.at = trio.current_time()
        self.done = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class _Link:
    """One open connection: its out-box, its queue of replies, its two tasks."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.outbox: list[bytes] = []
        self.waiting: collections.deque[_Slot] = collections.deque()
        self.broken: str | None = None
        self._wake = trio.Event()
        self.scope = trio.CancelScope()

    def usable(self) -> bool:
        """Not broken, and its oldest call has not waited :data:`STALL` seconds."""
        if self.broken is not None:
            return False
        if self.waiting and trio.current_time() - self.waiting[0].at > STALL:
            self.broken = f"no reply for {STALL:g} s"
            self.scope.cancel()
            return False
        return True

    def send(self, command: bytes) -> _Slot:
        """Queue ``command``; its reply will be the returned slot's.  Not a checkpoint."""
        if self.broken is not None:
            raise LimitsUnavailable(f"redis: {self.broken}")
        slot = _Slot()
        self.outbox.append(command)
        self.waiting.append(slot)
        self._wake.set()
        return slot

    async def serve(self) -> None:
        """Run the writer and the reader until the connection breaks or is
        closed; then fail every waiting call and close the stream.

        Cancellation: a ``Cancelled`` (the limiter stopping) closes the
        connection the same way.
        """
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._write)
                    nursery.start_soon(self._guard, self._read)
        finally:
            self.broken = self.broken or "connection closed"
            failure = LimitsUnavailable(f"redis: {self.broken}")
            while self.waiting:
                slot = self.waiting.popleft()
                slot.error = failure
                slot.done.set()
            with trio.CancelScope(shield=True) as cs:
                cs.deadline = trio.current_time() + 1.0
                await self.stream.aclose()

    async def _guard(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run the writer or the reader; its failure breaks the connection
        (new calls fail at once) and stops the other."""
        try:
            await task()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as exc:
            self.broken = self.broken or type(exc).__name__
            self.scope.cancel()

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            data, self.outbox = b"".join(self.outbox), []
            await self.stream.send_all(data)

    async def _read(self) -> None:
        reader = reply_reader()
        while True:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise trio.BrokenResourceError("redis closed the connection")
            reader.feed(cast(bytes, chunk))  # a bytearray is read as well
            while (value := reader.gets()) is not INCOMPLETE:
                if not self.waiting:
                    raise ValueError("a reply nobody asked for")
                slot = self.waiting.popleft()
                slot.value = value
                slot.done.set()


class Pipe:
    """The pipelined connection of one limiter: :meth:`call` and
    :meth:`script`.  Its tasks live in :meth:`run`'s nursery."""

    def __init__(self, url: str) -> None:
        self.address = Address.parse(url)
        self._link: _Link | None = None
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the connection's tasks until cancelled.

        Cancellation: a ``Cancelled`` closes the connection; the calls
        waiting on it fail with :class:`LimitsUnavailable`.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def _open(self) -> _Link:
        link = self._link
        if link is not None and link.usable():
            return link
        async with self._lock:
            link = self._link
            if link is not None and link.usable():
                return link
            if self._nursery is None:
                raise LimitsUnavailable("redis: the limiter is not running")
            a = self.address
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream: trio.abc.Stream
                    if a.path is not None:
                        stream = await trio.open_unix_socket(a.path)
                    else:
                        stream = await trio.open_tcp_stream(a.host, a.port)
                    if a.tls:
                        context = ssl.create_default_context()
                        tls = trio.SSLStream(stream, context, server_hostname=a.host)
                        await tls.do_handshake()
                        stream = tls
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                raise LimitsUnavailable(f"redis: cannot connect ({type(exc).__name__})") from exc
            link = _Link(stream)
            self._nursery.start_soon(link.serve)
            # Queued before any other call can see the link: they come first.
            first = []
            if a.password is not None:
                login = ("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)
                first.append(link.send(encode(login)))
            if a.db:
                first.append(link.send(encode(("SELECT", str(a.db)))))
            self._link = link
            try:
                for slot in first:
                    await self._wait(slot)
            except ReplyError as exc:  # a wrong password, a database that does not exist
                link.broken = str(exc)
                link.scope.cancel()
                raise LimitsUnavailable(f"redis: {exc}") from exc
            return link

    @staticmethod
    async def _wait(slot: _Slot) -> Any:
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        if isinstance(slot.value, ReplyError):
            raise slot.value
        return slot.value

    async def call(self, *args: str | bytes) -> Any:
        """One command's reply.  Raises :class:`LimitsUnavailable` when the
        connection cannot be opened or breaks, :class:`ReplyError` for an
        error reply.

        Cancellation: a checkpoint; a ``Cancelled`` after the command was
        queued leaves it to run (its reply is read and dropped).
        """
        return await self._wait((await self._open()).send(encode(args)))

    async def script(self, script: Script, keys: list[str], args: list[str]) -> Any:
        """``EVALSHA`` of ``script`` (``EVAL`` once if Redis does not know it yet).

        Cancellation: as :meth:`call`.
        """
        head = (str(len(keys)), *keys, *args)
        try:
            return await self.call("EVALSHA", script.sha, *head)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.call("EVAL", script.text, *head)


class Script:
    """A Lua script and its SHA-1 (``EVALSHA``'s name for it)."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
