"""Where the memory of an open idle stream goes.

The server runs in this process (``serve()`` with the built-in mock upstream,
its first token 60 s away, ``--ping-interval 1`` so that headers go out with
the first ping, as in ``tools/bench.py``'s ``idle`` scenario).  The client is a
separate process (raw blocking sockets; with ``--h2`` the ``h2`` library over
them, h2c, one connection per stream), so nothing of it is counted here.

As the bench: open ``--warm`` streams, wait for their headers and 1 s, take
the "before" reading; open ``--streams`` more, wait for their headers and 1 s,
take the "after" reading.  Readings:

* ``VmRSS`` (the bench's figure; run without ``--trace`` for it, tracemalloc
  adds its own bookkeeping to the RSS);
* with ``--trace``: tracemalloc snapshots, grouped by line and by a
  ``--frames``-deep traceback, bytes per stream;
* with ``--objects``: ``gc`` objects by type, count and ``sys.getsizeof`` per
  stream (the owner view).

    PYTHONPATH=. .venv/bin/python tools/measure_idle.py --streams 300
    PYTHONPATH=. .venv/bin/python tools/measure_idle.py --streams 300 --trace --objects
    PYTHONPATH=. .venv/bin/python tools/measure_idle.py --streams 300 --h2   # over h2c
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import subprocess
import sys
import tempfile
import tracemalloc
import types
from collections import Counter
from pathlib import Path

import trio
import trio.testing

sys.path.append(str(Path(__file__).resolve().parent.parent))  # as a plain script; PYTHONPATH wins

from trio_stream import Settings
from trio_stream.logs import EventLogger
from trio_stream.server.serve import serve

CLIENT = r"""
import json, socket, sys
port = int(sys.stdin.readline())
body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "idle"}],
                   "stream": True, "max_tokens": 10}).encode()
request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
           b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s") % (len(body), body)
held = []
for line in sys.stdin:
    n = int(line)
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(request)
        socks.append(s)
    for s in socks:
        seen = b""
        while b"\r\n\r\n" not in seen:
            data = s.recv(65536)
            if not data:
                sys.exit("server closed an idle stream")
            seen += data
    held += socks
    print("ok", flush=True)
"""


#: The same client over h2c (HTTP/2 by prior knowledge): one connection per
#: stream, as the HTTP/1.1 client, so that the two figures compare.
CLIENT_H2 = r"""
import json, socket, sys
import h2.config, h2.connection, h2.events
port = int(sys.stdin.readline())
body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "idle"}],
                   "stream": True, "max_tokens": 10}).encode()
headers = [(":method", "POST"), (":scheme", "http"), (":authority", "127.0.0.1"),
           (":path", "/v1/chat/completions"), ("content-type", "application/json"),
           ("content-length", str(len(body)))]
held = []
for line in sys.stdin:
    n = int(line)
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        c.send_headers(1, headers)
        c.send_data(1, body, end_stream=True)
        s.sendall(c.data_to_send())
        conns.append((s, c))
    for s, c in conns:
        started = False
        while not started:
            data = s.recv(65536)
            if not data:
                sys.exit("server closed an idle stream")
            for event in c.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    started = True
            s.sendall(c.data_to_send())  # the SETTINGS ack
    held += conns
    print("ok", flush=True)
"""


class _Discard:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def objects() -> Counter[str]:
    gc.collect()
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        counts[type(obj).__qualname__] += 1
    return counts


def object_sizes() -> Counter[str]:
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        sizes[type(obj).__qualname__] += sys.getsizeof(obj)
    return sizes


#: Who owns an allocation, by the functions on its traceback: first who
#: spawned a task (the spawn's Task, coroutine and context are the spawner's
#: cost), then the task's outermost function.
SPAWNERS = {
    "spawn_app": "connection task: spawns the app task",
    "_serve_one_listener": "accept loop: the socket, the connection task",
    "_attached": "app task: spawns reader/watcher",
}
ROOTS = {
    "_serve_one_listener": "accept loop: the socket, the connection task",
    "LightTCPServer.run": "connection task (hypercorn TCPServer)",
    "_handle": "app task (request: ASGI app + writer)",
    "RunManager.drive": "reader task (RunManager.drive)",
    "watch_disconnect": "watcher task (watch_disconnect)",
}
TASK_STEP = "trio/_core/_run.py:2866"  # where trio's run loop steps a task


@functools.cache
def _functions(filename: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function in a file."""
    try:
        code = compile(Path(filename).read_text(), filename, "exec")
    except (OSError, SyntaxError, ValueError):
        return []
    out = []
    todo = [code]
    while todo:
        c = todo.pop()
        lines = [line for _, _, line in c.co_lines() if line is not None]
        if lines and c.co_name != "<module>":
            out.append((min(lines), max(lines), c.co_qualname))
        todo += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return sorted(out, key=lambda f: f[1] - f[0])  # innermost first


def _function(frame: str) -> str:
    filename, _, line = frame.rpartition(":")
    if not line.isdigit():
        return ""
    n = int(line)
    return next((name for lo, hi, name in _functions(filename) if lo <= n <= hi), "")


def _root(frames: list[str]) -> str:
    steps = [i for i, f in enumerate(frames) if f.endswith(TASK_STEP)]
    start = steps[-1] + 1 if steps else 0
    names = [_function(f) for f in frames[start:]]
    for before, name in itertools.pairwise(names):
        spawner = before.rpartition(".")[2]
        if name == "Nursery.start_soon" and spawner in SPAWNERS:
            return SPAWNERS[spawner]
    if names and names[0] in ROOTS:
        return ROOTS[names[0]]
    return "other: " + (names[0] if names else "?")


def _what(frames: list[str]) -> str:
    last = frames[-1]
    if "_run.py:1959" in last or "_util.py:8" in last:
        return "top coroutine frame (spawn)"
    if "_run.py:1966" in last or "Context" in last:
        return "contextvars Context copy (spawn)"
    if "trio._core._run.Task>" in last or "_run.py:19" in last:
        return "Task object (spawn)"
    if "CancelStatus" in last or "_run.py:62" in last:
        return "CancelStatus"
    if "_run.py:1" in last or "_run.py:5" in last or "_run.py:6" in last:
        return "CancelScope/Nursery (trio _run.py)"
    name = _short(last)
    mine = [f for f in frames if "hypercorn/" in f or "h11/" in f or "trio_stream/" in f]
    if mine and mine[-1] != last:
        name = f"{_short(mine[-1])} > {name}"
    return name


def _short(frame: str) -> str:
    return frame.split("site-packages/")[-1].split("python3.11/")[-1].split("wt14-idle/")[-1]


def print_owners(diff: list[tracemalloc.StatisticDiff], n: int, args_top: int = 40) -> None:
    """Bytes per stream by (task, what allocated it)."""
    by_root: Counter[str] = Counter()
    by_what: dict[str, Counter[str]] = {}
    for d in diff:
        frames = [f"{f.filename}:{f.lineno}" for f in d.traceback]
        root = _root(frames)
        by_root[root] += d.size_diff
        by_what.setdefault(root, Counter())[_what(frames)] += d.size_diff
    print("\n-- by owner task (B per stream)")
    for root, size in by_root.most_common():
        if abs(size) / n < 16:
            continue
        print(f"{size / n:8.0f}  {root}")
        for what, s in by_what[root].most_common(args_top):
            if abs(s) / n >= 16:
                print(f"{s / n:12.0f}  {what}")


def _chain(coro: object) -> list[object]:
    """A task's await chain, outermost first."""
    chain = []
    while coro is not None:
        chain.append(coro)
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                or getattr(coro, "ag_await", None))  # fmt: skip
    return chain


def print_stacks() -> None:
    """One example of each distinct await chain among the live tasks, with
    ``sys.getsizeof`` of each link (a 3.11 coroutine holds its frame)."""
    seen: Counter[tuple[str, ...]] = Counter()
    example: dict[tuple[str, ...], list[object]] = {}
    root = trio.lowlevel.current_root_task()
    assert root is not None
    for task in _all_tasks(root):
        chain = _chain(task.coro)
        key = tuple(getattr(c, "__qualname__", type(c).__name__) for c in chain)
        seen[key] += 1
        example[key] = chain
    print("\n-- await chains of live tasks (count, then B per link)")
    for key, count in seen.most_common():
        if count < 10:
            continue
        chain = example[key]
        total = sum(sys.getsizeof(c) for c in chain)
        print(f"{count:5d} tasks, {len(chain)} links, {total} B")
        for c in chain:
            print(f"        {sys.getsizeof(c):5d}  {getattr(c, '__qualname__', type(c).__name__)}")


def _all_tasks(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    out = [task]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            out += _all_tasks(child)
    return out


async def main(args: argparse.Namespace, client: subprocess.Popen[str]) -> None:
    settings = Settings(
        port=0, db=str(Path(tempfile.mkdtemp()) / "idle.db"), mock_delay_ms=60000,
        ping_interval=1.0, graceful_timeout=1,
    )  # fmt: skip
    logger = EventLogger(settings.log_format, stream=_Discard())  # type: ignore[arg-type]
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve(
            settings, shutdown=shutdown, logger=logger, task_status=task_status))  # fmt: skip
        stdin, stdout = client.stdin, client.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(f"{port}\n")

        async def open_streams(n: int) -> None:
            stdin.write(f"{n}\n")
            stdin.flush()
            line = await trio.to_thread.run_sync(stdout.readline)
            assert line.strip() == "ok", line
            await trio.sleep(1.0)

        try:
            await open_streams(args.warm)
            # Read while every task waits (no ping half-sent): the idle state.
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            rss0 = rss()
            objs0 = objects() if args.objects else None
            sizes0 = object_sizes() if args.objects else None
            snap0 = tracemalloc.take_snapshot() if args.trace else None
            await open_streams(args.streams)
            if args.prune_deadlines:  # what the stale entries cost (see below)
                trio.lowlevel.current_task()._runner.deadlines._prune()
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            rss1 = rss()
            n = args.streams
            print(f"VmRSS: {(rss1 - rss0) / n / 1024:.2f} KiB per idle stream ({n} streams)")
            stats = trio.lowlevel.current_statistics()
            print(f"tasks living: {stats.tasks_living}")
            # trio's deadline heap drops the entries of exited cancel scopes
            # lazily (when due, or when it holds 2x active + 1000): until then
            # each keeps its dead scope alive.  Private, for information only.
            deadlines = trio.lowlevel.current_task()._runner.deadlines
            heap, active = len(deadlines._heap), deadlines._active
            print(f"deadline heap: {heap} entries, {active} active, {heap - active} stale")
            if args.trace:  # who made the stale entries' scopes (our lines, hypercorn's)
                made: Counter[str] = Counter()
                for deadline, _, scope in deadlines._heap:
                    if deadline == scope._registered_deadline:
                        continue
                    tb = tracemalloc.get_object_traceback(scope)
                    lines = [f"{f.filename}:{f.lineno}" for f in tb or ()]
                    mine = [_short(f) for f in lines if "trio/" not in f and "contextlib" not in f]
                    made[" < ".join(reversed(mine[-3:])) or "?"] += 1
                for where, count in made.most_common(8):
                    print(f"  {count:5d} stale, scope made at {where}")
            if args.stacks:
                print_stacks()
            if snap0 is not None:
                snap1 = tracemalloc.take_snapshot()
                snap1 = snap1.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
                snap0 = snap0.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
                diff = snap1.compare_to(snap0, "lineno")
                total = sum(d.size_diff for d in diff)
                print(f"tracemalloc: {total / n:.0f} B per stream in all")
                print("\n-- by line (B per stream, blocks per stream)")
                for d in diff[: args.top]:
                    if abs(d.size_diff) / n < 16:
                        break
                    frame = d.traceback[0]
                    print(f"{d.size_diff / n:8.0f} {d.count_diff / n:6.2f}  "
                          f"{frame.filename}:{frame.lineno}")  # fmt: skip
                if args.frames:
                    diff = snap1.compare_to(snap0, "traceback")
                    print_owners(diff, n)
                    print(f"\n-- by traceback, {args.frames} frames")
                    for d in diff[: args.top]:
                        if abs(d.size_diff) / n < 64:
                            break
                        print(f"{d.size_diff / n:8.0f} {d.count_diff / n:6.2f}")
                        for frame in list(d.traceback)[: args.frames]:
                            print(f"           {frame.filename}:{frame.lineno}")
            if objs0 is not None and sizes0 is not None:
                objs1, sizes1 = objects(), object_sizes()
                print("\n-- gc objects by type: count and getsizeof B per stream")
                rows = [(sizes1[t] - sizes0[t], objs1[t] - objs0[t], t) for t in objs1 | objs0]
                rows.sort(reverse=True)
                for size, count, name in rows[: args.top]:
                    if count / n < 0.5:
                        continue
                    print(f"{size / n:8.0f} {count / n:6.2f}  {name}")
        finally:
            shutdown.set()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--warm", type=int, default=20)
    parser.add_argument(
        "--h2", action="store_true",
        help="the streams over h2c (HTTP/2 by prior knowledge), one connection each",
    )  # fmt: skip
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--frames", type=int, default=0, help="also group by traceback")
    parser.add_argument("--objects", action="store_true")
    parser.add_argument("--stacks", action="store_true", help="print the live tasks' await chains")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--prune-deadlines", action="store_true",
        help="drop trio's stale deadline entries before the second reading (private API)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.trace:
        tracemalloc.start(max(args.frames, 1))
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_H2 if args.h2 else CLIENT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        trio.run(main, args, client)
    finally:
        client.kill()
        client.wait()
