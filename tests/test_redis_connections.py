"""The Redis connections of cluster mode (trio_stream/shared/redis_conn.py), on a real Redis.

Rules 2-4 of that module: idleness counts from the last reply and never cuts
a request in flight; a connection that dies while lent gives its slot back;
the listener keeps its own subscription however long the node is idle, and
re-reads what it missed whenever it had to subscribe again.  A late Redis is
staged with ``DEBUG SLEEP`` (the whole server stops answering for that long).
Timing is real here; every wait is bounded.
"""

from __future__ import annotations

import secrets
import socket

import coredis.exceptions
import pytest
import trio
import trio.testing
from coredis.tokens import PureToken

from tests.redis_server import RedisServer
from tests.test_shared_contract import FakeOwner, Node
from trio_stream.shared import redis as shared_redis
from trio_stream.shared.redis import RedisState
from trio_stream.shared.redis_conn import CALL_TIMEOUT, LISTEN_RETRY, REPLY_STUCK, redis_client

LEASE = 1.0  # so idle connections close after 1 s


def debug_sleep(server: RedisServer, seconds: float) -> socket.socket:
    """Stop ``server`` from answering anybody else for ``seconds``, and return
    once it has stopped (close the socket after the pause).  ``CLIENT PAUSE``
    answers once the pause is in force; ``DEBUG SLEEP`` answered nothing, so a
    command sent right after it could still be answered first."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(f"CLIENT PAUSE {round(seconds * 1000)} ALL\r\n".encode())
    assert sock.recv(16) == b"+OK\r\n"
    return sock


async def test_a_late_reply_is_not_cut_by_the_idle_deadline(own_redis: RedisServer) -> None:
    """Rule 2: a request sent on a connection that has been idle (here: since
    its last reply) gets its reply even when the reply comes later than
    ``max_idle_time`` after that last reply -- a pipeline and a plain command.
    Before, the idle deadline ran from the connection's last byte received and
    closed it under the request: the pipeline failed with ``IndexError``
    (coredis formatting an argument-less ``TimeoutError``)."""
    client = redis_client(own_redis.url, max_idle_time=1)
    async with client:
        await client.ping()  # the connection's last reply: its idle clock starts
        await trio.sleep(0.5)
        with debug_sleep(own_redis, 1.5):
            started = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def plain() -> None:
                    await client.set("late", "1")

                nursery.start_soon(plain)
                async with client.pipeline(transaction=False, timeout=5) as p:
                    p.set("late-p", "2")
                    p.get("late-p")
            late = trio.current_time() - started
        assert p.results == (True, "2")
        assert await client.get("late") == "1"
    # The reply came more than max_idle_time after the connection's last reply.
    assert late > 1.0, late


async def test_a_request_without_any_reply_closes_its_connection(own_redis: RedisServer) -> None:
    """Rule 2's bound: a connection with a request in flight and no byte from
    Redis for ``max(max_idle_time, REPLY_STUCK)`` is closed, failing the
    request with a ConnectionError that says so (a peer gone without a FIN must
    not hold a connection for ever); the next call opens a new one."""
    client = redis_client(own_redis.url, max_idle_time=1)
    async with client:
        await client.ping()
        with debug_sleep(own_redis, REPLY_STUCK + 1.5):
            started = trio.current_time()
            with pytest.raises(coredis.exceptions.ConnectionError, match="no reply"):
                async with client.pipeline(transaction=False, timeout=30) as p:
                    p.get("x")
            waited = trio.current_time() - started
        assert REPLY_STUCK - 0.5 < waited < REPLY_STUCK + 1.5, waited
        with trio.fail_after(5):
            assert await client.ping()


async def test_connections_lost_while_lent_give_their_slots_back(own_redis: RedisServer) -> None:
    """Rule 3: 80 blocking reads cancelled mid-wait (each invalidates the
    connection it was lent, as a remote follower's ``XREAD BLOCK`` does when
    its client leaves) do not use up the pool's 64 slots: a call still gets a
    connection.  Before, each such connection kept its slot for ever and the
    65th call waited for a connection until its deadline."""
    client = redis_client(own_redis.url, max_idle_time=10)
    async with client:
        for _ in range(80):
            with trio.move_on_after(0.02):
                await client.xread({"nothing": "0-0"}, block=5000)
        with trio.fail_after(CALL_TIMEOUT):
            assert await client.ping()


@pytest.fixture
async def pair(redis_server: RedisServer, nursery: trio.Nursery) -> list[Node]:
    """Two nodes with a 1 s lease (idle connections close after 1 s)."""
    prefix = f"t{secrets.token_hex(4)}:"
    nodes = []
    for _ in range(2):
        state = RedisState(redis_server.url, lease=LEASE, prefix=prefix)
        owner = FakeOwner()
        state.attach(owner)
        await nursery.start(state.run)
        nodes.append(Node(state, owner))
    return nodes


async def test_the_listener_stays_subscribed_while_the_node_is_idle(
    pair: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule 4: over 3.5 leases of idleness the listener's subscription is there
    at every look (every 50 ms), it never had to subscribe again, and then a
    cancel request from the other node arrives by pub/sub alone (the cancel
    poll is off) within 1 s.  Before, the listener's connection came from the
    pool and was closed after every lease without a message: the node was not
    subscribed for a while each time, and a notice published then was lost."""
    monkeypatch.setattr(shared_redis, "CANCEL_POLL", 3600.0)
    a, b = pair
    assert isinstance(a.state, RedisState)
    assert isinstance(b.state, RedisState)
    channel = f"{a.state.prefix}cancel:{a.state.node}"
    gaps = 0
    end = trio.current_time() + 3.5 * LEASE
    while trio.current_time() < end:
        numsub = await b.state.client.pubsub_numsub(channel)
        gaps += numsub[channel] != 1
        await trio.sleep(0.05)
    assert gaps == 0, f"not subscribed at {gaps} looks"
    assert a.state.caught_up == 1, "the listener subscribed again"
    run = a.new_run()
    await a.state.register(run)
    with trio.fail_after(1):
        await b.state.cancel(run.id, "superseded")
        await a.owner.cancel_seen.wait()
    assert a.owner.cancelled == [(run.id, "superseded")]


async def test_a_lost_subscription_is_renewed_and_what_it_missed_reread(
    pair: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule 4: when the listener's connection is lost (``CLIENT KILL``), it
    subscribes again and catches up: a cancel request and a "finished" notice
    whose messages it could not have heard (written to Redis without being
    published, as if published while it was not subscribed) reach the owner
    and the waiter -- with both pollers off, so only the catch-up can find
    them.  Before, the listener subscribed again and re-read nothing."""
    monkeypatch.setattr(shared_redis, "CANCEL_POLL", 3600.0)
    monkeypatch.setattr(shared_redis, "FINISH_POLL", 3600.0)
    a, b = pair
    assert isinstance(a.state, RedisState)
    assert isinstance(b.state, RedisState)
    run, other = a.new_run(), a.new_run()
    for r in (run, other):
        await a.state.register(r)
    async with trio.open_nursery() as nursery:
        waited: list[tuple[str, ...]] = []
        done = trio.Event()

        async def wait() -> None:
            waited.append(await b.state.wait_finished([other.id], 30))
            done.set()

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        # The notices' state, without their messages.
        await a.state.client.set(a.state._c(run.id), "stopped")
        await a.state.client.hset(a.state._r(other.id), {"status": "completed"})
        before = (a.state.caught_up, b.state.caught_up)
        killed = await a.state.client.client_kill(type_=PureToken.PUBSUB)
        assert killed >= 2  # both listeners
        with trio.fail_after(LISTEN_RETRY + 2 * CALL_TIMEOUT):
            await a.owner.cancel_seen.wait()
            await done.wait()
    assert a.owner.cancelled == [(run.id, "stopped")]
    assert waited == [()]
    assert a.state.caught_up > before[0]
    assert b.state.caught_up > before[1]


async def test_a_listener_whose_pings_go_unanswered_subscribes_again(
    own_redis: RedisServer, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule 4's keep-alive: a Redis that stops answering without closing the
    connection (``CLIENT PAUSE``, as a stopped server or a connection gone
    without a FIN) leaves the listener's ``PING`` unanswered; after
    ``CALL_TIMEOUT`` the subscription counts as lost, a new connection
    subscribes once Redis answers again, and the catch-up finds a cancel
    request whose message never came (written without being published; the
    cancel poll is off)."""
    monkeypatch.setattr(shared_redis, "CANCEL_POLL", 3600.0)
    state = RedisState(own_redis.url, lease=10.0, prefix="p:")
    owner = FakeOwner()
    state.attach(owner)
    await nursery.start(state.run)
    node = Node(state, owner)
    run = node.new_run()
    await state.register(run)
    await state.client.set(state._c(run.id), "stopped")
    assert state.caught_up == 1
    pause = 3.5  # longer than a PING's CALL_TIMEOUT
    await state.client.client_pause(int(pause * 1000), PureToken.ALL)
    with trio.fail_after(pause + 2 * CALL_TIMEOUT + 2):
        await owner.cancel_seen.wait()
    assert owner.cancelled == [(run.id, "stopped")]
    assert state.caught_up == 2
