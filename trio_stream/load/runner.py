"""``run_load``: the I/O half of the load generator.

Ownership::

    run_load()
    ├── scrape /metrics (before)            one short HTTP/1.1 connection
    ├── open_client()                       HTTP/1.1 or HTTP/2 connections
    │   └── run nursery
    │       ├── progress task               calls on_progress every interval
    │       └── workers nursery             --concurrency workers
    │           └── worker                  one unit at a time, each under
    │               └── (supersede) group   --timeout
    └── scrape /metrics (after)             once the server's tasks settled

Decisions (what to send, how to count) live in :mod:`.plan` and
:mod:`.accounting`; this module only moves bytes and keeps time.  The run
always ends by itself: the budget stops new units, and every unit is bounded
by ``--timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import trio

from .accounting import Reply, RequestRecord, ServerFigures, Tally, build_report, parse_metrics
from .http1 import ConnectionLost, H1Connection, H1Exchange, connect
from .plan import Budget, LoadConfig, Unit, base_headers, chat_body, messages_for, plan_unit
from .transport import Exchange, H1Client, H2Client, Target, TransportError, open_client

CHAT = "/v1/chat/completions"
DRAIN_TIMEOUT = 1.0  # seconds to read a finished reply's last bytes (keep-alive)
SCRAPE_TIMEOUT = 5.0
SETTLE_POLL = 0.05

ProgressFn = Callable[[Tally, float], None]


@dataclass
class _Run:
    """What every worker shares."""

    config: LoadConfig
    target: Target
    client: H1Client | H2Client
    tally: Tally
    budget: Budget

    def record(self, number: int) -> RequestRecord:
        tally = self.tally
        reply = Reply(tally, trio.current_time())
        return RequestRecord(number, messages_for(self.config, number), self.config.max_tokens,
                             reply)  # fmt: skip

    def post(
        self, record: RequestRecord, *, detach: bool = False, session: str | None = None,
        slow: bool = False,
    ) -> AbstractAsyncContextManager[Exchange]:  # fmt: skip
        headers = [*base_headers(self.config), ("content-type", "application/json")]
        if session is not None:
            headers.append(("x-session-id", session))
        body = chat_body(self.config, record.messages, detach=detach)
        record.reply.started = trio.current_time()
        return self.client.exchange("POST", CHAT, headers, body, slow=slow)

    async def attempt(self, record: RequestRecord, body: Callable[[], Awaitable[None]]) -> None:
        """Run one request's I/O under ``--timeout`` and count it.

        Cancellation: its own ``--timeout`` is counted as ``timeout``; an outer ``Cancelled``
        propagates after ``in_flight`` is put back.
        """
        self.tally.in_flight += 1
        try:
            with trio.move_on_after(self.config.timeout) as scope:
                try:
                    await body()
                except TransportError as exc:
                    record.problem = exc.kind
            if scope.cancelled_caught:
                record.problem = "timeout"
        finally:
            self.tally.in_flight -= 1
        self.tally.finish(record)


# -- reading ------------------------------------------------------------------
async def _head(ex: Exchange, record: RequestRecord) -> bool:
    """Wait for the response head; True if it is a 200 whose body we should read."""
    status = await ex.response()
    if record.status is None:
        record.status = status
    if status == 200:
        return True
    with trio.move_on_after(DRAIN_TIMEOUT):  # read the error body: keep the connection
        while await ex.receive() is not None:
            pass
    return False


async def _read(
    ex: Exchange, record: RequestRecord, *, until: int | None = None, pause: float = 0.0
) -> None:
    """Feed the body to the reply until it ends, or until ``until`` events arrived."""
    reply = record.reply
    while not reply.finished:
        if until is not None and reply.events >= until:
            return
        data = await ex.receive()
        if data is None:
            return
        reply.feed(data, trio.current_time())
        if pause:
            await trio.sleep(pause)
    with trio.move_on_after(DRAIN_TIMEOUT):  # the chunked body's end: keep-alive
        while await ex.receive() is not None:
            pass


# -- scenarios ------------------------------------------------------------------
async def _steady(run: _Run, unit: Unit, number: int, session: str | None = None,
                  streaming: trio.Event | None = None) -> None:  # fmt: skip
    record = run.record(number)

    async def body() -> None:
        async with run.post(record, session=session) as ex:
            if await _head(ex, record):
                await _read(ex, record, until=1)
                if streaming is not None:
                    streaming.set()
                await _read(ex, record)

    try:
        await run.attempt(record, body)
    finally:
        if streaming is not None:
            streaming.set()


async def _disconnect(run: _Run, unit: Unit, number: int) -> None:
    record = run.record(number)

    async def body() -> None:
        async with run.post(record) as ex:
            if unit.cut_after and await _head(ex, record):
                await _read(ex, record, until=unit.cut_after)
            record.cut = not record.reply.finished
        # leaving the block early: TCP close (HTTP/1.1) or RST_STREAM (HTTP/2)

    await run.attempt(record, body)


async def _supersede(run: _Run, unit: Unit, numbers: list[int]) -> None:
    """Each request of the session starts once the previous one streams."""
    session = f"load-{run.config.seed}-{numbers[0]}"
    async with trio.open_nursery() as nursery:
        for number in numbers:
            streaming = trio.Event()
            nursery.start_soon(_steady, run, unit, number, session, streaming)
            await streaming.wait()


async def _stop(run: _Run, unit: Unit, number: int) -> None:
    record = run.record(number)

    async def body() -> None:
        async with run.post(record, detach=unit.detach) as ex:
            if not await _head(ex, record):
                return
            await _read(ex, record, until=unit.cut_after)
            if not record.reply.finished:
                status = await _cancel(run, ex.headers.get("x-run-id", ""))
                await _read(ex, record)
                if status != 200 and not record.reply.done:
                    run.tally.side_error(f"cancel_http_{status}")

    await run.attempt(record, body)


async def _cancel(run: _Run, run_id: str) -> int:
    async with run.client.exchange(
        "POST", f"/v1/runs/{run_id}/cancel", base_headers(run.config)
    ) as ex:
        status = await ex.response()
        while await ex.receive() is not None:
            pass
        return status


async def _resume(run: _Run, unit: Unit, number: int) -> None:
    record = run.record(number)

    async def body() -> None:
        async with run.post(record, detach=True) as ex:
            if not await _head(ex, record):
                return
            await _read(ex, record, until=unit.cut_after)
            run_id = ex.headers.get("x-run-id", "")
        if record.reply.finished:
            return
        record.reply.reconnect()  # the first connection is gone: reconnect and replay
        record.resumed = True
        headers = [*base_headers(run.config), ("last-event-id", record.reply.last_id or "0")]
        async with run.client.exchange("GET", f"/v1/runs/{run_id}/events", headers) as ex2:
            status = await ex2.response()
            if status != 200:
                record.problem = f"resume_http_{status}"
                return
            await _read(ex2, record)

    await run.attempt(record, body)


async def _slow_reader(run: _Run, unit: Unit, number: int) -> None:
    record = run.record(number)

    async def body() -> None:
        async with run.post(record, slow=True) as ex:
            if await _head(ex, record):
                await _read(ex, record, pause=unit.pause)

    await run.attempt(record, body)


async def _unit(run: _Run, unit: Unit, numbers: list[int]) -> None:
    if unit.kind == "supersede" and len(numbers) > 1:
        await _supersede(run, unit, numbers)  # each request is bounded by --timeout
        return
    number = numbers[0]
    if unit.kind == "disconnect":
        await _disconnect(run, unit, number)
    elif unit.kind == "stop":
        await _stop(run, unit, number)
    elif unit.kind == "resume":
        await _resume(run, unit, number)
    elif unit.kind == "slow-reader":
        await _slow_reader(run, unit, number)
    else:
        await _steady(run, unit, number)


async def _worker(run: _Run) -> None:
    while (number := run.budget.next(trio.current_time())) is not None:
        unit = plan_unit(run.config, number)
        numbers = [number, *run.budget.extend(unit.group - 1)]
        await _unit(run, unit, numbers)


# -- the server's figures ---------------------------------------------------------
async def scrape(target: Target, config: LoadConfig) -> ServerFigures:
    """``GET /metrics`` on a fresh HTTP/1.1 connection; empty figures if there are none.

    Cancellation: bounded by ``SCRAPE_TIMEOUT`` (empty figures past it); the connection is
    closed in all cases, shielded.
    """
    ssl_context = target.ssl_context(http2=False, insecure=config.insecure)
    with trio.move_on_after(SCRAPE_TIMEOUT):
        try:
            stream = await connect(target.host, target.port, ssl_context)
        except (OSError, trio.BrokenResourceError):
            return ServerFigures()
        conn = H1Connection(stream, target.authority)
        try:
            await conn.send_request("GET", target.base_path + "/metrics",
                                    [("connection", "close")], b"")  # fmt: skip
            ex = H1Exchange(conn)
            if await ex.response() != 200:
                return ServerFigures()
            parts = []
            while (chunk := await ex.receive()) is not None:
                parts.append(chunk)
            return parse_metrics(b"".join(parts).decode("utf-8", "replace"))
        except ConnectionLost:
            return ServerFigures()
        finally:
            await conn.aclose()
    return ServerFigures()


async def _scrape_settled(
    target: Target, config: LoadConfig, before: ServerFigures
) -> ServerFigures:
    """Scrape until the server's task count is back to ``before`` (or the settle timeout)."""
    after = await scrape(target, config)
    if before.tasks_living is None or after.tasks_living is None:
        return after
    with trio.move_on_after(config.settle_timeout):
        while after.tasks_living != before.tasks_living:
            await trio.sleep(SETTLE_POLL)
            after = await scrape(target, config)
    return after


# -- the entry point ------------------------------------------------------------------
async def run_load(
    config: LoadConfig, *, on_progress: ProgressFn | None = None, progress_interval: float = 0.25
) -> dict[str, Any]:
    """Run the load described by ``config`` and return the report (see accounting).

    Ends by itself: after ``--requests`` units' worth of requests or when
    ``--duration`` has passed (units already started finish, each bounded by
    ``--timeout``).  Cancelling it closes every connection -- the server sees
    disconnects -- and raises ``Cancelled``; no report is produced.
    Raises ``ValueError`` for an invalid config.
    """
    config.validate()
    target = Target.parse(config.url)
    before = await scrape(target, config)
    tally = Tally()
    start = trio.current_time()
    deadline = start + config.duration if config.duration is not None else None
    budget = Budget(config.request_limit, deadline)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    async with open_client(
        target, http2=config.http2, insecure=config.insecure,
        max_streams=config.streams_per_connection,
    ) as client:  # fmt: skip
        run = _Run(config, target, client, tally, budget)
        async with trio.open_nursery() as nursery:
            if on_progress is not None:
                nursery.start_soon(_progress, tally, start, on_progress, progress_interval)
            async with trio.open_nursery() as workers:
                for _ in range(config.concurrency):
                    workers.start_soon(_worker, run)
            nursery.cancel_scope.cancel()
        connections = client.connections_opened
    wall_s, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
    if on_progress is not None:
        on_progress(tally, wall_s)
    after = await _scrape_settled(target, config, before)
    return build_report(
        scenario=config.scenario, http2=config.http2, concurrency=config.concurrency,
        wall_s=wall_s, tally=tally, before=before, after=after, cpu_s=cpu_s,
        extra={"max_tokens": config.max_tokens, "seed": config.seed, "url": config.url,
               "connections": connections},
    )  # fmt: skip


async def _progress(tally: Tally, start: float, on_progress: ProgressFn, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        on_progress(tally, trio.current_time() - start)
