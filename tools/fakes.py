"""A real fake upstream: an HTTP/1.1 server on 127.0.0.1 (trio + h11).

It speaks the OpenAI SSE format (``/v1/chat/completions``, ``/v1/models``) or
Ollama's NDJSON (``/api/chat``, ``/api/tags``), follows a per-request
:class:`Plan` (tokens, delays, hangs, drops, error statuses), and records
every connection's open and close time, so tests can assert that a cancelled
run really closed its upstream connection, and in what order.

Its time stamps are taken when its own tasks run, which under load can be
later than the kernel saw the event, and not in the kernel's order.  So each
exchange also records, from the kernel, which earlier exchanges' connections
the client had already closed when this one's request was read
(:attr:`Exchange.peer_closed_before`).

While it streams a response it also reads the socket, so it notices the
client closing at once (as a real server's kernel would), even mid-hang.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson
import trio

from trio_stream.upstream import mocktext


@dataclass
class Step:
    """One part of a scripted response body."""

    data: bytes = b""
    delay: float = 0.0
    hang: bool = False  # stop here and never send another byte
    drop: bool = False  # close the connection abruptly here


@dataclass
class Plan:
    status: int = 200
    steps: list[Step] = field(default_factory=list)
    content_type: str = "text/event-stream"
    #: The response head as sent, in order, replacing ``content_type`` when set
    #: (transcript replay).  ``transfer-encoding: chunked`` is added when it
    #: holds neither that nor ``content-length``.
    headers: list[tuple[str, str]] | None = None


@dataclass
class Connection:
    opened: float
    closed: float | None = None
    busy: bool = False  # a response is being sent on it
    requests: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Exchange:
    """One upstream request, from its arrival to the end of its response
    (finished, or cut by the client): while it lasts the request is *held*."""

    request: dict[str, Any]
    started: float
    ended: float | None = None
    target: bytes = b""  # the request line's path, e.g. b"/v1/chat/completions"
    raw: bytes = b""  # the request body as received
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # names lowercased
    #: Its position in :attr:`FakeUpstream.exchanges`.
    index: int = -1
    #: The exchanges (by index) still being answered by the fake when this
    #: one's request head was read, but whose connection the kernel already
    #: showed closed by the client (its FIN or RST received).  The fake stamps
    #: their ``ended`` only when their task next runs, which under load can be
    #: after this ``started``: by the kernel's order they had ended first.
    peer_closed_before: frozenset[int] = frozenset()


# Linux TCP states (include/net/tcp_states.h), first byte of struct tcp_info.
_TCP_ESTABLISHED = 1


def peer_has_closed(stream: trio.SocketStream) -> bool:
    """Whether the kernel has received the peer's FIN or RST on ``stream``.

    Reads the connection's TCP state (``TCP_INFO``), so it consumes nothing
    and clears no pending error: the connection's own reader still sees the
    EOF or the reset.  Not a checkpoint.  Linux only.
    """
    info = stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0] != _TCP_ESTABLISHED


def openai_chunk(
    content: str | None = None, finish: str | None = None, *, model: str | None = "fake",
    **delta: Any,
) -> bytes:  # fmt: skip
    """One SSE event of a ``chat.completion.chunk``; ``model``: its ``model``
    (None: no such key)."""
    d: dict[str, Any] = dict(delta)
    if content is not None:
        d["content"] = content
    chunk = {
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": d, "finish_reason": finish}],
    }  # fmt: skip
    if model is None:
        del chunk["model"]
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def ollama_line(
    content: str = "", done: bool = False, reason: str = "stop", *, model: str | None = "fake"
) -> bytes:
    """One NDJSON line of Ollama's ``/api/chat``; ``model`` as for :func:`openai_chunk`."""
    obj: dict[str, Any] = {"message": {"role": "assistant", "content": content}}
    if model is not None:
        obj = {"model": model, **obj}
    obj["done"] = done
    if done:
        obj["done_reason"] = reason
    return orjson.dumps(obj) + b"\n"


def token_plan(
    tokens: list[str], *, fmt: str = "openai", delay: float = 0.0, finish: str = "stop",
    hang_after: int | None = None, model: str | None = "fake",
) -> Plan:  # fmt: skip
    """Stream ``tokens`` (each after ``delay``), optionally hanging after
    some; every chunk (line) names ``model`` (None: none does)."""
    steps: list[Step] = []
    for i, tok in enumerate(tokens):
        if hang_after is not None and i == hang_after:
            steps.append(Step(hang=True))
            break
        data = openai_chunk(tok, model=model) if fmt == "openai" else ollama_line(tok, model=model)
        steps.append(Step(data, delay))
    else:
        if fmt == "openai":
            steps.append(Step(openai_chunk(finish=finish, model=model)))
            steps.append(Step(b"data: [DONE]\n\n"))
        else:
            steps.append(Step(ollama_line(done=True, reason=finish, model=model)))
    return Plan(steps=steps, content_type="text/event-stream" if fmt == "openai" else
                "application/x-ndjson")  # fmt: skip


def mock_plan(fmt: str, delay: float = 0.0) -> Callable[[dict[str, Any]], Plan]:
    """Answer like the built-in mock: the same deterministic text."""

    def plan(body: dict[str, Any]) -> Plan:
        max_tokens = body.get("max_tokens") or (body.get("options") or {}).get("num_predict")
        tokens = list(mocktext.tokens(body["messages"], max_tokens))
        return token_plan(tokens, fmt=fmt, delay=delay,
                          finish=mocktext.reply_length(max_tokens)[1])  # fmt: skip

    return plan


class FakeUpstream:
    def __init__(self, fmt: str = "openai", plan: Callable[[dict[str, Any]], Plan] | None = None):
        self.fmt = fmt
        self.plan = plan or mock_plan(fmt)
        self.connections: list[Connection] = []
        self.exchanges: list[Exchange] = []
        self.port = 0
        self._changed = trio.Event()
        self._answering: dict[int, trio.SocketStream] = {}  # exchange index -> its connection

    @property
    def url(self) -> str:
        base = f"http://127.0.0.1:{self.port}"
        return base + "/v1" if self.fmt == "openai" else base

    @property
    def open_connections(self) -> int:
        return sum(1 for c in self.connections if c.closed is None)

    @property
    def busy_connections(self) -> int:
        """Open connections with a response in progress (idle pooled ones excluded)."""
        return sum(1 for c in self.connections if c.closed is None and c.busy)

    @property
    def requests(self) -> list[dict[str, Any]]:
        return [r for c in self.connections for r in c.requests]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Block until ``predicate()`` holds (re-checked on every change)."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = Connection(opened=trio.current_time())
        self.connections.append(conn)
        self._notify()
        h = h11.Connection(h11.SERVER)
        try:
            await self._serve_connection(stream, h, conn)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass  # also when grouped by _respond's nursery (a peer reset mid-send)
        finally:
            conn.closed = trio.current_time()
            self._notify()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _next_event(self, stream: trio.SocketStream, h: h11.Connection) -> Any:
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            h.receive_data(await stream.receive_some(65536))

    async def _serve_connection(
        self, stream: trio.SocketStream, h: h11.Connection, conn: Connection
    ) -> None:
        while True:
            event = await self._next_event(stream, h)
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request), event
            head = event
            peer_closed = frozenset(i for i, s in self._answering.items() if peer_has_closed(s))
            body = b""
            while not isinstance(event := await self._next_event(stream, h), h11.EndOfMessage):
                body += event.data
            request = orjson.loads(body) if body else {}
            conn.requests.append(request)
            conn.busy = True
            exchange = Exchange(
                request, trio.current_time(), target=head.target, raw=body,
                headers=list(head.headers), index=len(self.exchanges),
                peer_closed_before=peer_closed,
            )  # fmt: skip
            self.exchanges.append(exchange)
            self._answering[exchange.index] = stream
            self._notify()
            try:
                if not await self._respond(stream, h, request):
                    return
            finally:
                exchange.ended = trio.current_time()
                del self._answering[exchange.index]
            conn.busy = False
            self._notify()
            if h.our_state is h11.MUST_CLOSE:
                return
            h.start_next_cycle()

    async def _respond(
        self, stream: trio.SocketStream, h: h11.Connection, request: dict[str, Any]
    ) -> bool:
        if not request:  # GET /models or /api/tags
            listing: Any = {"object": "list", "data": [{"id": "fake", "object": "model"}]}
            if self.fmt == "ollama":
                listing = {"models": [{"name": "fake"}]}
            body = orjson.dumps(listing)
            headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
            await stream.send_all(h.send(h11.Response(status_code=200, headers=headers)))
            await stream.send_all(h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage()))
            return True
        plan = self.plan(request)
        headers = [("content-type", plan.content_type)] if plan.headers is None else plan.headers
        framed = {name.lower() for name, _ in headers} & {"content-length", "transfer-encoding"}
        if not framed:
            headers = [*headers, ("transfer-encoding", "chunked")]
        await stream.send_all(h.send(h11.Response(status_code=plan.status, headers=headers)))
        peer_closed = trio.Event()
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                data = await stream.receive_some(65536)
                if not data:
                    peer_closed.set()
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            for step in plan.steps:
                if step.delay:
                    await trio.sleep(step.delay)
                if step.hang:
                    await trio.sleep_forever()
                if step.drop:
                    nursery.cancel_scope.cancel()
                    return False
                if step.data:
                    await stream.send_all(h.send(h11.Data(data=step.data)))
            await stream.send_all(h.send(h11.EndOfMessage()))
            nursery.cancel_scope.cancel()
        return not peer_closed.is_set()
