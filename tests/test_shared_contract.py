"""One contract suite for every backend of the shared state (G1-G7).

The same tests run against the in-process backend (the embedded default) and
the Redis backend (a real ``redis-server``).  Two *nodes* are two backend
instances sharing one store (for the in-process backend: one instance, since
it has one process by definition), each with its own owner.
"""

from __future__ import annotations

import gc
import secrets
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from tests.redis_server import RedisServer, hung_port
from trio_stream.core.log import Chunk, Outcome, RunStatus
from trio_stream.runs import Run
from trio_stream.shared import LocalState, RunRecord, SharedState, SharedUnavailable
from trio_stream.shared.redis import CANCEL_POLL, RedisState
from trio_stream.wire.request import ChatRequest

KEY = ("tenant", "session")


@dataclass
class FakeOwner:
    """The run manager's side of the interface, recording what reaches it."""

    runs: dict[str, Run] = field(default_factory=dict)
    cancelled: list[tuple[str, str]] = field(default_factory=list)
    lost: list[tuple[str, list[RunRecord]]] = field(default_factory=list)
    cancel_seen: trio.Event = field(default_factory=trio.Event)

    def cancel_local(self, run_id: str, reason: str) -> bool:
        run = self.runs.get(run_id)
        if run is None or not run.end(Outcome(RunStatus.CANCELLED, reason)):
            return False
        self.cancelled.append((run_id, reason))
        self.cancel_seen.set()
        return True

    def local_run(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    async def adopt_lost(self, node: str, records: list[RunRecord]) -> None:
        self.lost.append((node, records))


@dataclass
class Node:
    state: SharedState
    owner: FakeOwner

    def new_run(self, session: str | None = "session", *, detached: bool = False) -> Run:
        request = ChatRequest({}, "m", [], True, None, detached)
        run = Run("run_" + secrets.token_hex(4), "tenant", session, request,
                  detached=detached, coalesce=False)  # fmt: skip
        self.owner.runs[run.id] = run
        return run


@pytest.fixture(params=["local", "redis"])
async def nodes(
    request: pytest.FixtureRequest, nursery: trio.Nursery, redis_server: RedisServer
) -> AsyncIterator[tuple[Node, Node]]:
    if request.param == "local":
        owner = FakeOwner()
        local = LocalState()
        local.attach(owner)
        yield Node(local, owner), Node(local, owner)
        return
    prefix = f"t{secrets.token_hex(4)}:"
    pair = []
    for _ in range(2):
        state = RedisState(redis_server.url, lease=1.0, prefix=prefix)
        owner = FakeOwner()
        state.attach(owner)
        await nursery.start(state.run)
        pair.append(Node(state, owner))
    yield pair[0], pair[1]


async def test_claims_are_ordered_and_return_live_unfenced_predecessors(
    nodes: tuple[Node, Node],
) -> None:
    """G1: each claim's epoch is greater than the last; its predecessors are
    exactly the session's live, unfenced runs, whichever node claims."""
    a, b = nodes
    first = await a.state.claim(KEY, "r1")
    second = await b.state.claim(KEY, "r2")
    third = await a.state.claim(KEY, "r3")
    assert first.predecessors == ()
    assert second.predecessors == ("r1",)
    assert sorted(third.predecessors) == ["r1", "r2"]
    assert first.epoch < second.epoch < third.epoch
    assert await b.state.current(KEY) == "r3"


async def test_release_is_compare_and_delete(nodes: tuple[Node, Node]) -> None:
    """G2: a late release of an old run never removes its successor; the
    session is forgotten only when its last run leaves."""
    a, b = nodes
    await a.state.claim(KEY, "old")
    await b.state.claim(KEY, "new")
    assert await a.state.release(KEY, "old") is False
    assert await b.state.current(KEY) == "new"
    assert await a.state.live(KEY) == {"new": False}
    await b.state.release(KEY, "new")
    assert await a.state.live(KEY) == {}
    assert await a.state.current(KEY) is None


async def test_a_fenced_run_is_nobodys_predecessor_and_removes_only_itself(
    nodes: tuple[Node, Node],
) -> None:
    """G3: after a fence the straggler is not returned as a predecessor, its
    release reports the fence, and the successor stays current."""
    a, b = nodes
    await a.state.claim(KEY, "straggler")
    await b.state.claim(KEY, "successor")
    await b.state.fence(KEY, "straggler")
    assert (await a.state.claim(KEY, "third")).predecessors == ("successor",)
    assert await a.state.release(KEY, "straggler") is True
    assert await b.state.live(KEY) == {"successor": False, "third": False}
    assert await b.state.current(KEY) == "third"


async def test_cancel_reaches_the_owner_from_any_node(nodes: tuple[Node, Node]) -> None:
    """G4: a cancel sent from another node reaches the run's owner, once."""
    a, b = nodes
    run = a.new_run()
    await a.state.register(run)
    with trio.fail_after(2):
        await b.state.cancel(run.id, "stopped")
        await a.owner.cancel_seen.wait()
    await b.state.cancel(run.id, "stopped")  # idempotent
    await trio.sleep(2 * CANCEL_POLL)
    assert a.owner.cancelled == [(run.id, "stopped")]


async def test_wait_finished_returns_when_the_owner_cleans_up(nodes: tuple[Node, Node]) -> None:
    """G5: a waiter on another node wakes when the owner's cleanup is over,
    and at its deadline names the runs still going."""
    a, b = nodes
    run, stuck = a.new_run(), a.new_run()
    for r in (run, stuck):
        await a.state.register(r)
    async with trio.open_nursery() as nursery:
        result: list[tuple[str, ...]] = []

        async def wait() -> None:
            result.append(await b.state.wait_finished([run.id, stuck.id], 1.0))

        nursery.start_soon(wait)
        await trio.sleep(0.1)
        run.end(Outcome(RunStatus.COMPLETED, "stop"))
        run.finished()
        await a.state.finished(run)
    assert result == [(stuck.id,)]


async def test_registry_and_logs_cross_nodes(nodes: tuple[Node, Node]) -> None:
    """G6, G7: another node sees the run's record, and reads a detached
    run's log with the same entries and sequence numbers, then its end --
    every entry as it was (a Chunk's whole body and its shape flag) and the
    chunks after the finish with the end (issue 20 item 1)."""
    a, b = nodes
    if not a.state.ships_logs:
        assert await b.state.lookup("any") is None  # in-process: every run is local
        return
    run = a.new_run(detached=True)
    await a.state.register(run)
    record = await b.state.lookup(run.id)
    assert record is not None
    assert (record.tenant, record.session_id, record.node, record.status) == (
        "tenant", "session", a.state.node, "running",
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.state.ship, run)
        for i in range(10):
            run.append(f"w{i} ")
        run.append(Chunk.of({"tool_calls": [{"index": 0, "id": "c"}]}))
        shape = Chunk({"choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": None}],
                       "system_fingerprint": "fp"}, shape=True)  # fmt: skip
        run.append(shape)
        seen: list[object] = []
        with trio.fail_after(2):
            while len(seen) < 12:  # a live follower reads as it is shipped
                seen += (await b.state.read_log(run.id, len(seen), wait=True)).entries
        assert seen[:3] == ["w0 ", "w1 ", "w2 "]
        tail = (Chunk({"choices": [], "usage": {"prompt_tokens": 1, "cost": 0.1}}),)
        run.log.set_tail(tail)
        run.end(Outcome(RunStatus.COMPLETED, "stop"))
        run.finished()
    page = await b.state.read_log(run.id, 7, wait=False)
    assert list(page.entries) == [
        "w7 ",
        "w8 ",
        "w9 ",
        Chunk.of({"tool_calls": [{"index": 0, "id": "c"}]}),
        shape,
    ]
    assert page.entries[-1].shape  # type: ignore[union-attr]  # issue 20: the shape travels
    assert page.outcome == Outcome(RunStatus.COMPLETED, "stop")
    assert tuple(page.tail) == tail  # the chunks after the finish travel with the end


async def test_a_takeover_that_fails_midway_is_done_again(
    redis_server: RedisServer, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead node's runs are ended even if the survivor taking them over
    fails midway: its takeover lock expires and the takeover is done again,
    and the node leaves the node set only once its runs were handed over."""
    import trio_stream.shared.redis as redis_mod

    monkeypatch.setattr(redis_mod, "TAKEOVER_HOLD", 0.3)
    prefix = f"t{secrets.token_hex(4)}:"
    dead = RedisState(redis_server.url, lease=0.3, prefix=prefix)
    dead_owner = FakeOwner()
    dead.attach(dead_owner)
    run = Node(dead, dead_owner).new_run()
    async with trio.open_nursery() as dying:
        await dying.start(dead.run)  # returns once the node is in the node set, listening
        await dead.register(run)
        dying.cancel_scope.cancel()  # the node stops renewing its lease: it is dead

    class FailingOnce(FakeOwner):
        async def adopt_lost(self, node: str, records: list[RunRecord]) -> None:
            if not self.lost:
                self.lost.append(("failed", []))
                raise SharedUnavailable("redis: went away midway")
            self.lost.append((node, records))

    survivor = RedisState(redis_server.url, lease=0.3, prefix=prefix)
    owner = FailingOnce()
    survivor.attach(owner)
    await nursery.start(survivor.run)
    with trio.fail_after(10):
        while len(owner.lost) < 2:  # noqa: ASYNC110 - the reaper runs on its own timer
            await trio.sleep(0.05)
    node, records = owner.lost[1]
    assert node == dead.node
    assert [r.id for r in records] == [run.id]
    with trio.fail_after(5):
        while dead.node in await survivor.client.smembers(f"{prefix}nodes"):  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_a_node_joins_the_node_set_before_it_reports_started(
    redis_server: RedisServer, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``RedisState.run`` reports started only after the node's first
    heartbeat has put it in the node set with a lease, and its listener has
    subscribed: a run it registers after that is found by a survivor if the
    node dies, and a cancel request published to it is heard.  (Before, the
    first heartbeat ran only after started: a node that registered a run and
    died in between was never taken over -- the takeover test timed out.)"""
    beating = trio.Event()
    release = trio.Event()
    real_beat = RedisState._beat

    async def held_beat(self: RedisState, n: str) -> None:
        beating.set()
        await release.wait()
        await real_beat(self, n)

    monkeypatch.setattr(RedisState, "_beat", held_beat)
    prefix = f"t{secrets.token_hex(4)}:"
    state = RedisState(redis_server.url, lease=1.0, prefix=prefix)
    state.attach(FakeOwner())
    started = trio.Event()

    async def start() -> None:
        await nursery.start(state.run)
        started.set()

    nursery.start_soon(start)
    with trio.fail_after(5):
        await beating.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert not started.is_set(), "started before the first heartbeat landed"
    release.set()
    with trio.fail_after(5):
        await started.wait()
    assert state.node in await state.client.smembers(f"{prefix}nodes")
    assert await state.client.exists([f"{prefix}n:{state.node}"]) == 1
    channel = f"{prefix}cancel:{state.node}"
    assert await state.client.pubsub_numsub(channel) == {channel: 1}


async def test_a_redis_connection_cut_while_connecting_leaves_nothing_unclosed() -> None:
    """A Redis call cancelled while its connection is still connecting (its
    TCP connect not answered yet) leaves no unclosed buffer behind.  coredis 6.9 alone leaves the
    connection's six anyio memory streams unclosed, and each warns when
    collected -- under ``filterwarnings = error`` a failure of whichever test
    is running then (this is what a node stopped mid-connect did)."""
    with hung_port() as port:
        state = RedisState(f"redis://127.0.0.1:{port}/0", prefix="cut:")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)

            async def ping() -> None:
                await state.client.ping()

            async with state.client, trio.open_nursery() as nursery:
                nursery.start_soon(ping)
                await trio.testing.wait_all_tasks_blocked()  # waiting for the TCP connect
                nursery.cancel_scope.cancel()
            gc.collect()
    unclosed = [str(w.message) for w in caught if "Unclosed <MemoryObject" in str(w.message)]
    assert unclosed == []


async def test_the_upstreams_error_crosses_nodes(nodes: tuple[Node, Node]) -> None:
    """A detached run that failed on the upstream's own error ends its shared
    log with that error (``Outcome.error``), so a follower on another node
    ends its stream with the same error frame as the owner's clients
    (issue 20 item 5).  Before, the end carried status, reason and message
    only: a follower's frame said ``code: upstream_error``."""
    a, b = nodes
    if not a.state.ships_logs:
        return  # in-process: every follower reads the run itself
    run = a.new_run(detached=True)
    await a.state.register(run)
    message = "Provider disconnected unexpectedly"
    error = {"message": message, "type": None, "param": None, "code": "server_error",
             "source": "upstream"}  # fmt: skip
    outcome = Outcome(RunStatus.FAILED, "upstream_error", message, error)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.state.ship, run)
        run.append("Seven")
        run.end(outcome)
        run.finished()
    page = await b.state.read_log(run.id, 0, wait=False)
    assert list(page.entries) == ["Seven"]
    assert page.outcome == outcome
