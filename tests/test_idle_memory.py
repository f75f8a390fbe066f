"""What an open idle stream holds: guards for the memory per idle stream.

An idle stream (its first token far away) is a connection and three tasks
that wait.  Its memory is what those tasks and their objects hold while they
wait, measured with ``tools/measure_idle.py`` (VmRSS, as ``tools/bench.py``'s
``idle`` scenario, and tracemalloc by owner).  The byte figures depend on the
machine and the library versions, so they are not asserted here; what makes
them is: the tasks per stream, the coroutine frames each task holds, the
objects that are slotted, and the app inbox that replaced hypercorn's memory
channel (whose semantics are tested here as well).
"""

from __future__ import annotations

import gc
import inspect
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.trio.tcp_server import TCPServer

from tests.conftest import RawClient, running_server, tasks_living
from trio_stream import Settings
from trio_stream.http import common
from trio_stream.http.responses import ResponseSubscriber
from trio_stream.http.service import _StreamSlot
from trio_stream.http.stream import Subscriber
from trio_stream.runs import Done, Run
from trio_stream.runs.run import Waiters
from trio_stream.runs.spans import traced
from trio_stream.server import hypercorn_fixes, serve
from trio_stream.server.asgi import ServerApp
from trio_stream.server.connection import REQUEST_TASK, AppInbox
from trio_stream.upstream.mock import _Sleeper
from trio_stream.wire.chunks import ChunkEncoder
from trio_stream.wire.request import parse_chat_request

CHAT = "/v1/chat/completions"
IDLE = 30  # streams


def _frames(task: trio.lowlevel.Task) -> list[str]:
    """The qualified names of the coroutine frames ``task`` holds while it
    waits, outermost first (also through hypercorn's ``__await__`` wrapper
    and an async generator's ``asend``, which trio's ``iter_await_frames``
    stops at)."""
    names: list[str] = []
    link: Any = task.coro
    while link is not None:
        if hasattr(link, "cr_frame"):
            names.append(link.cr_code.co_qualname)
            link = link.cr_await
        elif hasattr(link, "ag_frame"):
            names.append(link.ag_code.co_qualname)
            link = link.ag_await
        elif hasattr(link, "gi_frame"):
            names.append(link.gi_code.co_qualname)
            link = link.gi_yieldfrom
        else:  # coroutine_wrapper, anext_awaitable, async_generator_asend
            inner = [r for r in gc.get_referents(link) if _is_link(r)]
            link = inner[0] if inner else None
    return names


def _is_link(obj: object) -> bool:
    return (
        hasattr(obj, "cr_frame")
        or hasattr(obj, "ag_frame")
        or type(obj).__name__ == "async_generator_asend"
    )


def _all_tasks(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    out = [task]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            out += _all_tasks(child)
    return out


#: The frames of each of an idle stream's four tasks, by its outermost frame:
#: the connection (hypercorn's handler), the request (ASGI app, then our
#: writer), the attached run's reader, and the disconnect watcher.
IDLE_FRAMES = {
    "LightTCPServer.run": [
        "LightTCPServer.run", "wait_readable",
        "EpollIOManager.wait_readable", "EpollIOManager._epoll_wait", "wait_task_rescheduled",
        "_real_async_yield",
    ],
    "_handle": [
        "_handle", "chat_completions", "_attached", "Subscriber.write_sse",
        "wait_task_rescheduled", "_real_async_yield",
    ],
    "RunManager.drive": [
        "RunManager.drive", "RunManager._pump", "_Sequential.__aenter__", "MockUpstream._items",
        "Ticker.sleep",
        "wait_task_rescheduled", "_real_async_yield",
    ],
    "watch_disconnect": [
        "watch_disconnect", "AppInbox.receive", "wait_task_rescheduled", "_real_async_yield",
    ],
}  # fmt: skip


async def test_an_idle_stream_is_four_tasks_each_holding_exactly_its_frames(
    tmp_path: Path,
) -> None:
    """Each open idle stream adds exactly four tasks to the server -- its
    connection, its request (which is also its writer), its attached run's
    reader and its disconnect watcher -- and each waits holding exactly the
    coroutine frames in ``IDLE_FRAMES``: no ``fail_after(inf)`` or socket
    layers in the read loop, no dispatch frames between hypercorn and the
    endpoint, the watcher parked directly in the app inbox.  A frame more on
    any of them is memory held for every open stream (200-400 B each), so a
    change that adds one must update this table on purpose."""
    settings = Settings(port=0, db=str(tmp_path / "idle.db"), mock_delay_ms=60_000)
    async with running_server(settings, record_logs=False) as server:
        baseline = await tasks_living()
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        clients = [await RawClient.post(server.port, CHAT, body) for _ in range(IDLE)]
        try:
            # Loopback delivers at send time: once every task is blocked, the
            # server has read every request and started its tasks.
            assert await tasks_living() - baseline == 4 * IDLE
            root = trio.lowlevel.current_root_task()
            assert root is not None
            by_outer: dict[str, list[list[str]]] = {}
            for task in _all_tasks(root):
                frames = _frames(task)
                if frames and frames[0] in IDLE_FRAMES:
                    by_outer.setdefault(frames[0], []).append(frames)
            for outer, expected in IDLE_FRAMES.items():
                chains = by_outer.get(outer, [])
                assert len(chains) == IDLE, outer
                assert all(chain == expected for chain in chains), (outer, chains[0])
        finally:
            for client in clients:
                await client.aclose()


#: The name of each of an idle stream's tasks, by its outermost frame.
IDLE_NAMES = {
    "LightTCPServer.run": serve.CONNECTION_TASK,
    "_handle": REQUEST_TASK,
    "RunManager.drive": common.READER_TASK,
    "watch_disconnect": common.WATCHER_TASK,
}


async def test_an_idle_streams_tasks_share_their_names(tmp_path: Path) -> None:
    """Every task of an open stream is spawned with its constant name: the
    same ``str`` object for every stream.  Without ``name=`` trio builds
    ``f"{module}.{qualname}"`` anew per spawn (about 0.2 KB per task, four
    per stream).  The names are those trio would build, so a task census
    reads as before."""
    settings = Settings(port=0, db=str(tmp_path / "idle.db"), mock_delay_ms=60_000)
    async with running_server(settings, record_logs=False) as server:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        clients = [await RawClient.post(server.port, CHAT, body) for _ in range(3)]
        try:
            await trio.testing.wait_all_tasks_blocked()
            root = trio.lowlevel.current_root_task()
            assert root is not None
            names: dict[str, list[str]] = {}
            for task in _all_tasks(root):
                frames = _frames(task)
                if frames and frames[0] in IDLE_NAMES:
                    names.setdefault(frames[0], []).append(task.name)
            for outer, name in IDLE_NAMES.items():
                assert len(names[outer]) == 3, outer
                assert all(got is name for got in names[outer]), (outer, names[outer])
            assert common.READER_TASK == "trio_stream.runs.manager.RunManager.drive"
            assert common.WATCHER_TASK == "trio_stream.http.stream.watch_disconnect"
        finally:
            for client in clients:
                await client.aclose()


def _stale_deadlines() -> int:
    """Entries in trio's deadline heap whose scope no longer has that
    deadline (exited or changed): each keeps its scope alive until it is due.
    (trio's private ``Deadlines``, for this guard only.)"""
    deadlines = trio.lowlevel.current_task()._runner.deadlines
    return sum(1 for d, _, scope in deadlines._heap if d != scope._registered_deadline)


async def test_a_body_already_queued_is_read_without_a_deadline() -> None:
    """``read_request`` arms ``--body-timeout`` only before a ``receive()``
    that may wait: a body queued in the app inbox with its head -- nearly
    every request -- leaves no entry in trio's deadline heap (an armed one
    stays there, holding its exited scope, for ``--body-timeout``: 60 s per
    request, section 16).  A body that has not arrived still gets the
    deadline, from the call on (tests/test_body_timeout.py: the 408)."""
    settings = Settings(body_timeout=60.0)
    scope = {"headers": [(b"content-length", b"2")]}
    inbox = AppInbox(10)
    await inbox.send({"type": "http.request", "body": b"{}", "more_body": False})
    before = _stale_deadlines()
    assert await common.read_request(settings, scope, inbox.receive) == b"{}"
    assert _stale_deadlines() == before
    # Not queued: armed before the receive waits.
    inbox = AppInbox(10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(common.read_request, settings, scope, inbox.receive)
        await trio.testing.wait_all_tasks_blocked()
        deadlines = trio.lowlevel.current_task()._runner.deadlines
        armed = [s for d, _, s in deadlines._heap if d == s._registered_deadline]
        assert any(s.deadline - trio.current_time() > 59 for s in armed)
        await inbox.send({"type": "http.request", "body": b"{}", "more_body": False})


async def test_an_untraced_reader_holds_no_context_manager_of_its_own() -> None:
    """With tracing off a run's span is ``NO_SPAN``, and ``traced`` hands every
    reader the one shared no-op block: no two generator context managers per
    open stream (about 0.7 KB)."""
    request = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}')
    runs = [Run(f"run_{i}", "t", None, request, detached=False, coalesce=True) for i in range(2)]
    assert traced(runs[0]) is traced(runs[1])


async def test_run_waiters_park_unpark_and_cancel_as_a_parking_lot() -> None:
    """``Waiters`` (a run's wake-ups, instead of a ``ParkingLot`` and its
    ``OrderedDict``): ``unpark_all`` wakes every parked task, a
    cancelled waiter leaves the list, and it is true only while a task waits."""
    waiters = Waiters()
    woken: list[int] = []

    async def wait(i: int) -> None:
        await waiters.park()
        woken.append(i)

    assert not waiters
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(wait, i)
        await trio.testing.wait_all_tasks_blocked()
        assert waiters
        waiters.unpark_all()
    assert sorted(woken) == [0, 1, 2]  # (trio runs a batch of woken tasks in any order)
    assert not waiters
    with trio.move_on_after(0.01) as cs:
        await waiters.park()
    assert cs.cancelled_caught
    assert not waiters  # the cancelled waiter left
    waiters.unpark_all()  # nobody to wake: nothing happens


@pytest.mark.parametrize(
    "cls",
    [
        Run,
        Done,
        Waiters,
        AppInbox,
        ServerApp,
        _Sleeper,
        _StreamSlot,
        Subscriber,
        ResponseSubscriber,
        ChunkEncoder,
    ],
)
def test_per_stream_objects_are_slotted(cls: type) -> None:
    """Each object an open stream holds one of (or shares, for the slot) is
    declared with ``__slots__`` all the way up its classes, so it has no
    per-instance ``__dict__`` (a dict costs 100-400 B per stream)."""
    for klass in cls.__mro__[:-1]:  # object has no __slots__ and no __dict__
        assert "__slots__" in vars(klass), klass
    assert "__dict__" not in dir(cls)


async def test_app_inbox_hands_over_queues_in_order_and_bounds() -> None:
    """``AppInbox`` behaves as the memory channel it replaced: a message goes
    straight to a waiting receiver, else is queued; receives take them in
    order; a sender finding ``capacity`` messages queued waits until a
    receive makes room."""
    inbox = AppInbox(2)
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _receive_into(inbox, got))
        await trio.testing.wait_all_tasks_blocked()
        await inbox.send("direct")  # to the waiting receiver
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["direct"]
    await inbox.send(1)
    await inbox.send(2)
    sent_third = False

    async def third() -> None:
        nonlocal sent_third
        await inbox.send(3)
        sent_third = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent_third  # two queued: the third waits for room
        assert await inbox.receive() == 1
        await trio.testing.wait_all_tasks_blocked()
        assert sent_third
    assert [await inbox.receive(), await inbox.receive()] == [2, 3]


async def _receive_into(inbox: AppInbox, got: list[Any]) -> None:
    got.append(await inbox.receive())


async def test_app_inbox_waits_are_cancellable_and_lose_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A cancelled receive leaves the inbox (the next message is queued, not
    handed to the gone receiver); a cancelled blocked send queues nothing;
    both are checkpoints even when they need not wait.  (The deadlines fire
    on the virtual clock once the wait is blocked.)"""
    inbox = AppInbox(1)
    with trio.move_on_after(0.01) as cs:
        await inbox.receive()
    assert cs.cancelled_caught
    await inbox.send("kept")
    with trio.move_on_after(0.01) as cs:
        await inbox.send("dropped")  # full: waits, then is cancelled
    assert cs.cancelled_caught
    assert await inbox.receive() == "kept"
    with trio.CancelScope() as cs:
        cs.cancel()
        await inbox.send("never")  # a checkpoint: cancelled before queueing
    assert cs.cancelled_caught
    with trio.move_on_after(0.01) as cs:
        await inbox.receive()
    assert cs.cancelled_caught  # nothing was queued


def test_light_tcp_server_is_checked_against_the_hypercorn_it_copies() -> None:
    """``LightTCPServer.run`` is hypercorn 0.18.0's ``TCPServer.run`` with
    one name changed (its task group), no handshake deadline on a plain
    connection, and the read loop inlined; it must be
    re-read against any other hypercorn release.  This fails on another
    release, or if hypercorn's own ``run`` no longer opens its ``TaskGroup``
    and reads in ``_read_data`` as the copy assumes."""
    assert metadata.version("hypercorn") == hypercorn_fixes.FIXED_VERSION
    source = inspect.getsource(TCPServer.run)
    assert "async with TaskGroup() as task_group:" in source
    assert "await self._read_data()" in source
