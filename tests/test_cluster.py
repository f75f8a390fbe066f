"""Cluster mode across real processes: every guarantee of one process, kept by several.

Each node is its own ``trio-stream serve --redis URL --db <one shared SQLite
file>`` subprocess on 127.0.0.1 (port 0), all sharing a Redis of the test's
own (``own_redis``) and one :class:`Upstream` -- a real HTTP fake OpenAI
upstream in this process that records, per request, when it arrived and the
connection that carried it (opened, closed).  So "the old run's upstream
request was closed before the new one was made" is read off real sockets.

Timing is real (these are real processes).  Every wait is bounded; ordering
is awaited (an SSE event, a log line, an upstream request), never slept for.
The only loops that sleep are the two that wait for a node's own recovery
after Redis comes back, which nothing announces.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from tests.conftest import ServeProcess, serve_process
from tests.redis_server import RedisServer
from tools.fakes import Connection, FakeUpstream, Plan, Step, token_plan
from trio_stream.wire.sse import SSEDecoder, SSEEvent

CHAT = "/v1/chat/completions"
STARTUP = 20.0  # seconds for the nodes of a test to be listening (2 cores, cold imports)


# -- the upstream ---------------------------------------------------------------


@dataclass
class Script:
    """What the upstream answers one request (named by its first message)."""

    tokens: list[str]
    gap: float
    hang: bool = False
    model: str = "fake"  # the model its chunks name

    @property
    def text(self) -> str:
        return "".join(self.tokens)


class Upstream(FakeUpstream):
    """The fake OpenAI upstream, scripted per request name.

    ``arrived[name]`` is when the request's body was read; ``on_arrival[name]``
    is called right then (synchronously: a snapshot of the world at that
    instant).  :meth:`closed_now` tells whether a request's connection is
    closed, asking the kernel when the fake has not noticed yet.
    """

    def __init__(self) -> None:
        super().__init__("openai", plan=self._plan)
        self.scripts: dict[str, Script] = {}
        self.arrived: dict[str, float] = {}
        self.on_arrival: dict[str, Callable[[], None]] = {}
        self.sockets: list[trio.socket.SocketType] = []

    def script(
        self, name: str, n: int, gap: float, *, hang: bool = False, model: str = "fake"
    ) -> Script:
        """``n`` distinct tokens, one every ``gap`` seconds (``hang``: none,
        ever), in chunks that name ``model``."""
        script = Script([f"<{name}:{i}>" for i in range(n)], gap, hang, model)
        self.scripts[name] = script
        return script

    def _plan(self, body: dict[str, Any]) -> Plan:
        name = body["messages"][0]["content"]
        self.arrived[name] = trio.current_time()
        hook = self.on_arrival.pop(name, None)
        if hook is not None:
            hook()
        script = self.scripts[name]
        if script.hang:
            return Plan(steps=[Step(hang=True)])
        return token_plan(script.tokens, delay=script.gap, model=script.model)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.sockets.append(stream.socket)  # same index as the Connection it appends
        await super()._handle(stream)

    def connection(self, name: str) -> Connection:
        """The connection that carried the request ``name``."""
        for conn in self.connections:
            if any(r.get("messages", [{}])[0].get("content") == name for r in conn.requests):
                return conn
        raise LookupError(name)

    def closed_now(self, name: str) -> bool:
        """Is ``name``'s connection closed by its client now?  True once the fake
        noticed; before that, True if the FIN (or a reset) is already queued."""
        conn = self.connection(name)
        if conn.closed is not None:
            return True
        index = next(i for i, c in enumerate(self.connections) if c is conn)
        fd = self.sockets[index].fileno()
        with socket.socket(fileno=socket.dup(fd)) as peek:
            try:
                return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

    async def wait_arrived(self, name: str) -> None:
        await self.wait_for(lambda: name in self.arrived)

    async def wait_closed(self, name: str) -> float:
        """Wait until ``name``'s connection is closed; when it was."""
        await self.wait_for(
            lambda: name in self.arrived and self.connection(name).closed is not None
        )
        closed = self.connection(name).closed
        assert closed is not None
        return closed


async def start_upstream(nursery: trio.Nursery) -> Upstream:
    upstream = Upstream()
    await nursery.start(upstream.serve)
    return upstream


# -- the nodes ------------------------------------------------------------------


@asynccontextmanager
async def cluster(
    n: int, redis: RedisServer, upstream: Upstream, db: Path, *extra: str
) -> AsyncIterator[list[ServeProcess]]:
    """``n`` nodes on one Redis, one SQLite file and one upstream, started at
    once; each is killed (by its own pid) when the block ends."""
    args = ("--port", "0", "--redis", redis.url, "--db", str(db), "--upstream", "openai",
            "--upstream-url", upstream.url, "--log-format", "json", *extra)  # fmt: skip
    procs: list[ServeProcess | None] = [None] * n
    ready, stop = trio.Event(), trio.Event()

    async def hold(i: int) -> None:
        async with serve_process(*args) as proc:
            procs[i] = proc
            if all(p is not None for p in procs):
                ready.set()
            await stop.wait()

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(hold, i)
        with trio.fail_after(STARTUP):
            await ready.wait()
        try:
            yield [p for p in procs if p is not None]
        finally:
            stop.set()


def client(node: ServeProcess) -> httpx.AsyncClient:
    """A client of one node: plain HTTP to 127.0.0.1, a new connection per request."""
    limits = httpx.Limits(max_keepalive_connections=0)
    url = f"http://127.0.0.1:{node.port}"
    return httpx.AsyncClient(base_url=url, timeout=15, verify=False, limits=limits)


@asynccontextmanager
async def clients(nodes: list[ServeProcess]) -> AsyncIterator[list[httpx.AsyncClient]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(client(node)) for node in nodes]


def chat(name: str, *, detach: bool = False, stream: bool = True) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": name}],
            "stream": stream, "detach": detach}  # fmt: skip


def session(s: str) -> dict[str, str]:
    return {"x-session-id": s}


def records(node: ServeProcess, name: str, **match: Any) -> list[dict[str, Any]]:
    return [r for r in node.records(name) if all(r.get(k) == v for k, v in match.items())]


async def wait_record(node: ServeProcess, name: str, **match: Any) -> dict[str, Any]:
    """The first ``name`` log record of ``node`` matching ``match`` (waits for it)."""

    def matches(line: str) -> bool:
        if not line.startswith("{"):
            return False
        r = orjson.loads(line)
        return bool(r.get("event") == name and all(r.get(k) == v for k, v in match.items()))

    return dict(orjson.loads(await node.wait_for_line(matches)))


def saved_rows(db: Path, run_id: str) -> list[tuple[str, str | None, str]]:
    """(status, reason, content) of every saved row of ``run_id``."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT status, reason, content FROM messages WHERE run_id = ?", (run_id,)
        ).fetchall()
    return [(str(s), r, str(c)) for s, r, c in rows]


# -- event streams ----------------------------------------------------------------


class Events:
    """An SSE response read event by event; ``ended_at`` is when its last event came."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events: list[SSEEvent] = []
        self.ended_at: float | None = None
        self._raw = response.aiter_raw()
        self._decoder = SSEDecoder()
        self._pending: deque[SSEEvent] = deque()

    @property
    def run_id(self) -> str:
        return self.response.headers["x-run-id"]

    async def next(self) -> SSEEvent | None:
        while not self._pending:
            chunk = await anext(self._raw, None)
            if chunk is None:
                self.ended_at = trio.current_time()
                return None
            self._pending.extend(self._decoder.feed(chunk))
        event = self._pending.popleft()
        self.events.append(event)
        return event

    async def deltas(self, k: int) -> None:
        """Read until ``k`` delta events have come."""
        while sum(1 for e in self.events if is_delta(e)) < k:
            assert await self.next() is not None, "the stream ended early"

    async def rest(self) -> Events:
        while await self.next() is not None:
            pass
        return self

    @property
    def text(self) -> str:
        return text_of(self.events)

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].data == "[DONE]"

    @property
    def error(self) -> dict[str, Any] | None:
        """The terminal error event's ``error``, if the stream ended with one."""
        if self.events and self.events[-1].data.startswith('{"error"'):
            return dict(orjson.loads(self.events[-1].data)["error"])
        return None


def is_delta(event: SSEEvent) -> bool:
    if not event.data.startswith('{"id"'):
        return False
    return orjson.loads(event.data)["choices"][0]["finish_reason"] is None


def text_of(events: list[SSEEvent]) -> str:
    chunks = [orjson.loads(e.data) for e in events if is_delta(e)]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


@asynccontextmanager
async def stream(c: httpx.AsyncClient, method: str, path: str, **kw: Any) -> AsyncIterator[Events]:
    """One streaming request; leaving the block closes its connection."""
    async with c.stream(method, path, **kw) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        yield Events(response)


def error_code(s: Events) -> str | None:
    """The ``code`` of the error event ``s`` ended with (None: no error event)."""
    return None if s.error is None else str(s.error["code"])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- 1. supersede ------------------------------------------------------------------


async def test_supersede_across_nodes(
    own_redis: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """G1/G5 across processes (docs/api.md 3.3): a request of session S on node 2
    supersedes S's run on node 1.  The old run's upstream request is closed before
    the new one is made; the old client gets the ``superseded`` error event, the
    new one completes; and the log reads as one node's would: node 1's
    ``stream_cancelled reason=superseded`` and ``prev_stream_finished_cleanly``
    are written before node 2's upstream request, and node 2 never logs
    ``prev_stream_timeout_on_cancel``."""
    up = await start_upstream(nursery)
    a = up.script("supersede A", 2000, 0.02)
    b = up.script("supersede B", 20, 0.005)
    at_b: dict[str, Any] = {}

    def snapshot() -> None:  # the instant B's upstream request arrives
        at_b["a_closed"] = up.closed_now("supersede A")
        at_b["node1"] = n1.records()

    up.on_arrival["supersede B"] = snapshot
    db = tmp_path / "cluster.db"
    async with cluster(2, own_redis, up, db) as (n1, n2), clients([n1, n2]) as (c1, c2):
        with trio.fail_after(20):
            async with stream(c1, "POST", CHAT, json=chat("supersede A"),
                              headers=session("S1")) as sa:  # fmt: skip
                await sa.deltas(1)  # A streams from the upstream
                async with trio.open_nursery() as readers:
                    readers.start_soon(sa.rest)
                    sent = trio.current_time()
                    async with stream(c2, "POST", CHAT, json=chat("supersede B"),
                                      headers=session("S1")) as sb:  # fmt: skip
                        await sb.rest()
            run_a, run_b = sa.run_id, sb.run_id
            await wait_record(n2, "stream_end", trace=run_b)

    assert error_code(sa) == "superseded", sa.events[-3:]
    assert not sa.done
    assert a.text.startswith(sa.text)
    assert sb.done
    assert sb.text == b.text
    # The connection log: A's upstream request was closed before B's was made.
    assert at_b["a_closed"], "node 2 asked the upstream while node 1's request was open"
    a_closed = up.connection("supersede A").closed
    assert a_closed is not None
    # The log order of one node: A cancelled and cleaned up, then B's upstream request.
    before = [(r["event"], r.get("trace"), r.get("reason")) for r in at_b["node1"]]
    assert ("stream_cancelled", run_a, "superseded") in before
    assert ("prev_stream_finished_cleanly", run_a, None) in before
    assert len(records(n1, "prev_stream_finished_cleanly", trace=run_a)) == 1
    assert not records(n2, "prev_stream_timeout_on_cancel")
    assert records(n2, "stream_start", trace=run_b, session="S1")
    assert saved_rows(db, run_a) == [("partial", "superseded", sa.text)]
    assert saved_rows(db, run_b) == [("complete", "stop", b.text)]
    assert sa.ended_at is not None
    print(
        f"\nsupersede across nodes: B sent -> A's upstream closed {ms(a_closed - sent)}, "
        f"-> A's client got 'superseded' {ms(sa.ended_at - sent)}, "
        f"-> B's upstream request {ms(up.arrived['supersede B'] - sent)}"
    )


# -- 2. stop and interrupt ------------------------------------------------------------


async def test_stop_and_interrupt_across_nodes(
    own_redis: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """G4 across processes (docs/api.md 2.6, 2.7): ``POST /v1/runs/{id}/cancel``
    on node 2 stops a run of node 1 -- attached, detached, or one whose upstream
    has not sent a byte -- and answers the run's final object (cancelled,
    ``stopped``, its content); ``POST /v1/sessions/{S}/interrupt`` on node 2
    interrupts node 1's run of S.  Each upstream request closes within 1 s."""
    up = await start_upstream(nursery)
    for name in ("stop attached", "stop detached", "interrupt"):
        up.script(name, 2000, 0.02)
    up.script("stop hung", 0, 0, hang=True)
    db = tmp_path / "cluster.db"
    async with cluster(2, own_redis, up, db) as (n1, n2), clients([n1, n2]) as (c1, c2):
        with trio.fail_after(20):
            async with (
                stream(c1, "POST", CHAT, json=chat("stop attached")) as attached,
                stream(c1, "POST", CHAT, json=chat("stop detached", detach=True)) as detached,
                stream(c1, "POST", CHAT, json=chat("interrupt", detach=True),
                       headers=session("S2")) as interrupted,
                trio.open_nursery() as tasks,
            ):  # fmt: skip
                for s in (attached, detached, interrupted):
                    await s.deltas(2)
                    tasks.start_soon(s.rest)
                # The hung run sends no head (nothing to send yet): its id is in the log.
                hung_result: dict[str, Any] = {}

                async def hung_request() -> None:
                    body = chat("stop hung", stream=False)
                    response = await c1.post(CHAT, json=body, headers=session("SH"))
                    hung_result["response"] = response

                tasks.start_soon(hung_request)
                await up.wait_arrived("stop hung")
                hung_id = (await wait_record(n1, "stream_start", session="SH"))["trace"]

                answers: dict[str, tuple[httpx.Response, float]] = {}

                async def stop(name: str, run_id: str) -> None:
                    sent = trio.current_time()
                    response = await c2.post(f"/v1/runs/{run_id}/cancel")
                    answers[name] = (response, sent)

                async def interrupt() -> None:
                    sent = trio.current_time()
                    response = await c2.post("/v1/sessions/S2/interrupt")
                    answers["interrupt"] = (response, sent)

                async with trio.open_nursery() as stops:
                    stops.start_soon(stop, "stop attached", attached.run_id)
                    stops.start_soon(stop, "stop detached", detached.run_id)
                    stops.start_soon(stop, "stop hung", hung_id)
                    stops.start_soon(interrupt)
                for name in answers:
                    await up.wait_closed(name)
            after = await c2.get(f"/v1/runs/{interrupted.run_id}")
            messages = await c2.get("/v1/sessions/S2/messages")

    for name, (_, sent) in answers.items():
        closed = up.connection(name).closed
        assert closed is not None
        print(f"\n{name}: upstream closed {ms(closed - sent)} after the request on node 2")
        assert closed - sent < 1.0, name
    for name, content in (
        ("stop attached", attached.text),
        ("stop detached", detached.text),
        ("stop hung", ""),
    ):
        response = answers[name][0]
        assert response.status_code == 200, (name, response.text)
        body = response.json()
        final = (body["status"], body["reason"], body["content"])
        assert final == ("cancelled", "stopped", content), name
    for s in (attached, detached):
        assert error_code(s) == "stopped"
        assert s.text
        assert saved_rows(db, s.run_id) == [("partial", "stopped", s.text)]
    hung = hung_result["response"]
    assert hung.status_code == 409
    assert hung.json()["error"]["code"] == "stopped"
    assert saved_rows(db, hung_id) == []  # it produced nothing: nothing to save
    # The interrupt.
    assert answers["interrupt"][0].json() == {"interrupted": True, "run_id": interrupted.run_id}
    assert error_code(interrupted) == "interrupted"
    assert (after.json()["status"], after.json()["reason"], after.json()["content"]) == (
        "cancelled", "interrupted", interrupted.text,
    )  # fmt: skip
    rows = messages.json()["data"]
    assert [(m["run_id"], m["status"], m["reason"], m["content"]) for m in rows] == [
        (interrupted.run_id, "partial", "interrupted", interrupted.text)
    ]


# -- 3. resume ------------------------------------------------------------------------


async def test_resume_on_another_node(
    own_redis: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """G7 (docs/api.md 2.6): a detached run started on node 1, read for k
    events and dropped, is resumed on node 2 with ``Last-Event-ID: k``: the
    two parts are exactly what the upstream sent, ending with ``[DONE]``.
    (Node 1 does not coalesce, so its k events are deltas 1..k.)"""
    up = await start_upstream(nursery)
    ks = (1, 7, 23)
    scripts = {k: up.script(f"resume {k}", 40, 0.01) for k in ks}
    parts: dict[int, tuple[Events, Events]] = {}
    async with (
        cluster(1, own_redis, up, tmp_path / "cluster.db", "--no-coalesce") as (n1,),
        cluster(1, own_redis, up, tmp_path / "cluster.db") as (n2,),
        clients([n1, n2]) as (c1, c2),
    ):

        async def resume(k: int) -> None:
            async with stream(c1, "POST", CHAT, json=chat(f"resume {k}", detach=True)) as first:
                await first.deltas(k)
            assert [int(e.id or 0) for e in first.events] == list(range(1, k + 1))
            headers = {"last-event-id": str(k)}
            async with stream(c2, "GET", f"/v1/runs/{first.run_id}/events",
                              headers=headers) as second:  # fmt: skip
                await second.rest()
            parts[k] = first, second

        with trio.fail_after(20):
            async with trio.open_nursery() as tasks:
                for k in ks:
                    tasks.start_soon(resume, k)
    for k in ks:
        first, second = parts[k]
        assert first.text + second.text == scripts[k].text, k
        assert second.done, (k, second.events[-2:])
        assert int(next(e.id for e in second.events if is_delta(e)) or 0) > k


# -- 4. followers -----------------------------------------------------------------------


async def test_followers_on_three_nodes(
    own_redis: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """G6/G7 (docs/api.md 2.6): a detached run of node 1 followed at once from
    node 1 (its starter), node 2 and node 3: each follower gets the whole run,
    exactly as the upstream sent it, and ``[DONE]``."""
    up = await start_upstream(nursery)
    script = up.script("followed", 60, 0.01)
    async with (
        cluster(3, own_redis, up, tmp_path / "cluster.db") as (n1, n2, n3),
        clients([n1, n2, n3]) as (c1, c2, c3),
    ):
        with trio.fail_after(20):
            async with stream(c1, "POST", CHAT, json=chat("followed", detach=True)) as starter:
                await starter.deltas(1)
                path = f"/v1/runs/{starter.run_id}/events"
                async with (
                    stream(c2, "GET", path) as f2,
                    stream(c3, "GET", path) as f3,
                    trio.open_nursery() as tasks,
                ):
                    for s in (starter, f2, f3):
                        tasks.start_soon(s.rest)
    for s in (starter, f2, f3):
        assert s.text == script.text
        assert s.done
    ids = {max(int(e.id or 0) for e in s.events if is_delta(e)) for s in (starter, f2, f3)}
    assert ids == {60}


# -- 5. a node dies ----------------------------------------------------------------------

LEASE = 1.0


async def test_node_killed_mid_run(
    own_redis: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Node loss (shared/redis.py): node 1 is killed (SIGKILL) in the middle of
    a detached run of session S.  Within lease + 2 s one survivor ends it
    ``failed``/``node_lost``: followers on both survivors get the ``node_lost``
    error event, ``GET /v1/runs/{id}`` says so, the partial (what followers got)
    is saved exactly once, and S takes a new run that completes."""
    up = await start_upstream(nursery)
    script = up.script("doomed", 2000, 0.02)
    after = up.script("after the loss", 10, 0.005)
    db = tmp_path / "cluster.db"
    async with (
        cluster(3, own_redis, up, db, "--node-lease", str(LEASE)) as (n1, n2, n3),
        clients([n1, n2, n3]) as (c1, c2, c3),
    ):
        with trio.fail_after(20):
            async with stream(c1, "POST", CHAT, json=chat("doomed", detach=True),
                              headers=session("S5")) as starter:  # fmt: skip
                await starter.deltas(1)
                path = f"/v1/runs/{starter.run_id}/events"
                async with (
                    stream(c2, "GET", path) as f2,
                    stream(c3, "GET", path) as f3,
                    trio.open_nursery() as tasks,
                ):
                    await f2.deltas(5)
                    await f3.deltas(5)
                    n1.process.kill()  # SIGKILL, by its own pid
                    killed = trio.current_time()
                    tasks.start_soon(f2.rest)
                    tasks.start_soon(f3.rest)
            run_id = starter.run_id
            run = (await c2.get(f"/v1/runs/{run_id}")).json()
            run3 = (await c3.get(f"/v1/runs/{run_id}")).json()
            messages = (await c3.get("/v1/sessions/S5/messages")).json()["data"]
            async with stream(c2, "POST", CHAT, json=chat("after the loss"),
                              headers=session("S5")) as new:  # fmt: skip
                await new.rest()
            lost = [records(n, "node_lost") for n in (n2, n3)]
            dup = [records(n, "save_duplicate_refused") for n in (n2, n3)]

    ended = max(f.ended_at or 0 for f in (f2, f3)) - killed
    print(f"\nnode killed: followers told node_lost {ms(ended)} after the kill (lease {LEASE} s)")
    assert ended < LEASE + 2
    for f in (f2, f3):
        assert error_code(f) == "node_lost", f.events[-2:]
    partial = f2.text
    assert partial
    assert f3.text == partial
    assert script.text.startswith(partial)
    for r in (run, run3):
        assert (r["status"], r["reason"], r["content"]) == ("failed", "node_lost", partial)
    assert [(m["run_id"], m["status"], m["content"]) for m in messages] == [
        (run_id, "failed", partial)
    ]
    assert saved_rows(db, run_id) == [("failed", "node_lost", partial)]
    assert sorted(len(x) for x in lost) == [0, 1]  # exactly one survivor took it over
    assert dup == [[], []]
    assert new.done
    assert new.text == after.text
    assert saved_rows(db, new.run_id) == [("complete", "stop", after.text)]


# -- 6. Redis goes away and comes back ------------------------------------------------------


async def healthz(c: httpx.AsyncClient) -> tuple[int, Any]:
    response = await c.get("/healthz")
    return response.status_code, response.json()


async def test_redis_killed_and_restarted_under_load(
    own_redis: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Redis unreachable (shared/redis.py): with streams in flight on both
    nodes, Redis is killed.  New streams get 503 + ``Retry-After`` within 1 s,
    ``/healthz`` says degraded, streams in flight finish from their upstream
    and are saved.  Redis restarts empty: the nodes recover by themselves
    (healthz ok, new streams work, a run that spanned the outage is followed
    from the other node to its exact end and superseded from it), and every
    run with content is saved exactly once."""
    up = await start_upstream(nursery)
    short = {name: up.script(name, 40, 0.02) for name in ("short 1", "short 2", "short d")}
    spanning = up.script("spanning", 2000, 0.02)  # superseded after the recovery
    up.script("interrupted after", 2000, 0.02)  # interrupted after the recovery
    followed = up.script("followed after", 150, 0.02)  # about 3 s: ends after the recovery
    fresh = {name: up.script(name, 10, 0.005) for name in ("new 1", "new 2", "supersedes")}
    db = tmp_path / "cluster.db"
    async with (
        cluster(2, own_redis, up, db, "--node-lease", "3") as (n1, n2),
        clients([n1, n2]) as (c1, c2),
    ):
        with trio.fail_after(30):
            async with (
                stream(c1, "POST", CHAT, json=chat("short 1")) as s1,
                stream(c2, "POST", CHAT, json=chat("short 2")) as s2,
                stream(c2, "POST", CHAT, json=chat("short d", detach=True)) as sd,
                stream(c1, "POST", CHAT, json=chat("spanning"), headers=session("S6")) as sp,
                stream(c1, "POST", CHAT, json=chat("followed after", detach=True)) as fa,
                stream(c1, "POST", CHAT, json=chat("interrupted after", detach=True),
                       headers=session("S6i")) as si,
                trio.open_nursery() as tasks,
            ):  # fmt: skip
                for s in (s1, s2, sd, sp, fa, si):
                    await s.deltas(1)
                own_redis.kill()
                # New streams: 503 with Retry-After, fast; healthz degraded.
                for c in (c1, c2):
                    sent = trio.current_time()
                    refused = await c.post(CHAT, json=chat("never"))
                    took = trio.current_time() - sent
                    print(f"\nwith Redis down: a new stream refused in {ms(took)}")
                    assert refused.status_code == 503, refused.text
                    assert refused.headers["retry-after"] == "1"
                    assert refused.json()["error"]["code"] == "shared_state_unavailable"
                    assert took < 1.0
                    assert await healthz(c) == (503, {"status": "degraded"})
                # Streams in flight finish from their upstream, Redis or not.
                async with trio.open_nursery() as shorts:
                    for s in (s1, s2, sd):
                        shorts.start_soon(s.rest)
                for s, name in ((s1, "short 1"), (s2, "short 2"), (sd, "short d")):
                    assert s.done, name
                    assert s.text == short[name].text, name
                tasks.start_soon(sp.rest)
                tasks.start_soon(si.rest)
                # Redis comes back, empty: the nodes recover by themselves.
                own_redis.start()
                restarted = trio.current_time()
                for c in (c1, c2):
                    # Polls: nothing announces a node's recovery.
                    while await healthz(c) != (200, {"status": "ok"}):  # noqa: ASYNC110
                        await trio.sleep(0.05)
                print(f"nodes healthy {ms(trio.current_time() - restarted)} after the restart")
                news = []
                for c, name in ((c1, "new 1"), (c2, "new 2")):
                    async with stream(c, "POST", CHAT, json=chat(name)) as n:
                        await n.rest()
                    assert n.done
                    assert n.text == fresh[name].text
                    news.append(n)
                # The run that spans the outage: followed from node 2, exact to its end.
                async with stream(c2, "GET", f"/v1/runs/{fa.run_id}/events") as follower:
                    await follower.rest()
                assert follower.done
                assert follower.text == followed.text
                # And its session still has one run at a time: node 2 supersedes it.
                async with stream(c2, "POST", CHAT, json=chat("supersedes"),
                                  headers=session("S6")) as sup:  # fmt: skip
                    await sup.rest()
                assert sup.done
                assert sup.text == fresh["supersedes"].text
                # And the other one is still its session's current run: interrupted from node 2.
                interrupt = await c2.post("/v1/sessions/S6i/interrupt")
                assert interrupt.json() == {"interrupted": True, "run_id": si.run_id}
                await fa.rest()
            await wait_record(n1, "stream_end", trace=sp.run_id)
            await wait_record(n1, "stream_end", trace=fa.run_id)
            await wait_record(n1, "stream_end", trace=si.run_id)

    assert fa.done
    assert fa.text == followed.text
    assert error_code(sp) == "superseded"
    assert spanning.text.startswith(sp.text)
    assert up.connection("spanning").closed is not None
    assert error_code(si) == "interrupted"
    expected = {
        s1.run_id: ("complete", "stop", s1.text), s2.run_id: ("complete", "stop", s2.text),
        sd.run_id: ("complete", "stop", sd.text), fa.run_id: ("complete", "stop", fa.text),
        sp.run_id: ("partial", "superseded", sp.text),
        si.run_id: ("partial", "interrupted", si.text),
        sup.run_id: ("complete", "stop", sup.text),
        **{n.run_id: ("complete", "stop", n.text) for n in news},
    }  # fmt: skip
    for run_id, row in expected.items():
        assert saved_rows(db, run_id) == [row], run_id
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone() == (len(expected),)
    for node in (n1, n2):
        assert not records(node, "save_duplicate_refused")


async def test_redis_paused_then_back_with_its_data(
    own_redis: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Redis unreachable but not restarted (paused with SIGSTOP: a partition,
    a stall): runs that end meanwhile finish and are saved, and once Redis
    answers again the cleanup steps it missed are done -- their sessions are
    released, their records say how they ended -- so nothing stale is left:
    the session takes a new run at once (no ``prev_stream_timeout_on_cancel``),
    an interrupt finds nothing running, another node reads the final object."""
    up = await start_upstream(nursery)
    ended = {name: up.script(name, 30, 0.02) for name in ("paused a", "paused d")}
    fresh = up.script("after the pause", 10, 0.005)
    db = tmp_path / "cluster.db"
    async with (
        cluster(2, own_redis, up, db) as (n1, n2),  # --node-lease 10: it outlasts the pause
        clients([n1, n2]) as (c1, c2),
    ):
        with trio.fail_after(20):
            async with (
                stream(c1, "POST", CHAT, json=chat("paused a"), headers=session("P1")) as a,
                stream(c1, "POST", CHAT, json=chat("paused d", detach=True),
                       headers=session("P2")) as d,
            ):  # fmt: skip
                await a.deltas(1)
                await d.deltas(1)
                own_redis.process.send_signal(signal.SIGSTOP)  # by its own pid
                try:
                    await a.rest()
                    await d.rest()
                    # Both cleanup steps (release, then the record's end) missed Redis.
                    for s in (a, d):
                        await wait_record(n1, "stream_end", trace=s.run_id)
                    assert len(records(n1, "redis_unavailable", trace=a.run_id)) == 2
                finally:
                    own_redis.process.send_signal(signal.SIGCONT)
            for s, name in ((a, "paused a"), (d, "paused d")):
                assert s.done, name
                assert s.text == ended[name].text, name
                assert saved_rows(db, s.run_id) == [("complete", "stop", s.text)]
            # Node 1 catches up by itself (healthz is ok once it has); nothing announces it.
            resumed = trio.current_time()
            for c in (c1, c2):
                while await healthz(c) != (200, {"status": "ok"}):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            print(f"\nafter the pause: nodes healthy {ms(trio.current_time() - resumed)} later")
            final = (await c2.get(f"/v1/runs/{a.run_id}")).json()
            assert (final["status"], final["reason"], final["content"]) == (
                "completed", "stop", a.text,
            )  # fmt: skip
            interrupt = (await c2.post("/v1/sessions/P2/interrupt")).json()
            assert interrupt == {"interrupted": False, "run_id": None}
            async with stream(c2, "GET", f"/v1/runs/{d.run_id}/events") as follower:
                await follower.rest()
            assert follower.done
            assert follower.text == d.text
            sent = trio.current_time()
            async with stream(c2, "POST", CHAT, json=chat("after the pause"),
                              headers=session("P1")) as new:  # fmt: skip
                await new.rest()
            took = trio.current_time() - sent
    assert new.done
    assert new.text == fresh.text
    assert not records(n2, "prev_stream_timeout_on_cancel")
    assert took < 1.0, took
