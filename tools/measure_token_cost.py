"""What one token costs: counts, CPU, system calls, allocations and a profile per token.

The load is bench.py's ``proxy100`` made long: ``--streams`` (100) streams through
``tools/fake_openai.py`` at 20 tokens/s each, every stream long enough to outlast
the measuring window, so the figures are the steady state of paced streams (no
stream starts or ends, no saves, inside the window).  Everything runs on 127.0.0.1;
every process started here is stopped by its pid (its own process group).

Modes (each bounded: ``--warmup`` + ``--window`` seconds plus a few):

    # server in its own process: CPU per token; attach one observer to the window
    python -m tools.measure_token_cost external                     # CPU only
    python -m tools.measure_token_cost external --attach perf-sys   # all syscalls (perf stat)
    python -m tools.measure_token_cost external --attach strace     # syscalls by name (strace -c)
    python -m tools.measure_token_cost external --attach perf-malloc --streams 20
    python -m tools.measure_token_cost external --attach py-spy     # py-spy record --format raw

    # server in this process, under a trio Instrument: task steps, wake-ups,
    # checkpoints, cancel scopes, deadline-heap operations, ASGI sends
    python -m tools.measure_token_cost inprocess
    python -m tools.measure_token_cost inprocess --tracemalloc --streams 30

    # attribute a py-spy raw profile to the stages of docs/design.md section 15
    python -m tools.measure_token_cost attribute profile.txt

``perf-malloc`` counts calls of ``PyObject_Malloc`` and ``PyMem_Malloc`` with
uprobes (``perf probe``; probes it adds are deleted at the end).  Tokens in the
window are read from the server's ``trio_stream_tokens_total`` (external) or
summed over the live runs' logs (in-process).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tools.bench import ROOT, ServerProcess, free_port, kill_group, tree_cpu_seconds, warm_up

RATE = 20.0  # tokens/s per stream (fake_openai --delay-ms 50)
LIBPYTHON = (
    Path(sys.base_prefix) / "lib" / f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
)
MALLOC_PROBES = ("PyObject_Malloc", "PyMem_Malloc")


# --- the load: fake upstream and client ----------------------------------------------------


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def start_upstream(port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "tools.fake_openai", "--port", str(port), "--delay-ms", "50"]
    with log.open("ab") as out:
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            import socket

            socket.create_connection(("127.0.0.1", port)).close()
            return popen
        time.sleep(0.05)
    kill_group(popen, grace=1.0)
    raise RuntimeError(f"fake upstream not listening; see {log}")


def start_client(
    port: int, streams: int, tokens: int, out: Path, log: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        _bin("trio-stream"),
        "load",
        "--url",
        f"http://127.0.0.1:{port}",
        "--concurrency",
        str(streams),
        "--requests",
        str(streams),
        "--max-tokens",
        str(tokens),
        "--timeout",
        str(tokens / RATE + 60),
        "--json",
        str(out),
        "--quiet",
    ]
    with log.open("ab") as err:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True, cwd=ROOT
        )


def stream_tokens(args: argparse.Namespace) -> int:
    """Tokens per stream: each stream outlasts warm-up + window by ~5 s."""
    return int((args.warmup + args.window + 5) * RATE)


def server_cmd(port: int, upstream_port: int, workdir: Path) -> list[str]:
    return [
        _bin("trio-stream"),
        "serve",
        "--port",
        str(port),
        "--db",
        str(workdir / "ts.db"),
        "--upstream",
        "openai",
        "--upstream-url",
        f"http://127.0.0.1:{upstream_port}/v1",
        "--graceful-timeout",
        "1",
    ]


def scrape_tokens(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r"^trio_stream_tokens_total (\S+)$", text, re.M)
    assert m, "no trio_stream_tokens_total"
    return float(m.group(1))


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (comm) of ``pid``."""
    out: collections.Counter[str] = collections.Counter()
    clk = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out[name] += int(fields[11]) + int(fields[12])
    return {k: v / clk for k, v in out.items()}


# --- observers ------------------------------------------------------------------------------


def _ensure_probes() -> list[str]:
    """Add the malloc uprobes that are missing; returns the ones added."""
    have = subprocess.run(
        ["perf", "probe", "-l"], capture_output=True, text=True, check=False
    ).stdout
    added = []
    for fn in MALLOC_PROBES:
        if f":{fn} " not in have:
            subprocess.run(["perf", "probe", "-q", "-x", str(LIBPYTHON), "--add", fn], check=True)
            added.append(fn)
    return added


def _probe_events() -> list[str]:
    listing = subprocess.run(
        ["perf", "probe", "-l"], capture_output=True, text=True, check=True
    ).stdout
    events = []
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.split(":")[-1] in MALLOC_PROBES:
            events.append(name)
    return events


@contextlib.contextmanager
def observe(kind: str, pid: int, window: float, out: Path) -> Iterator[dict[str, Any]]:
    """Run observer ``kind`` on ``pid`` for the body (which lasts ``window``)."""
    found: dict[str, Any] = {}
    cmd: list[str] | None = None
    added: list[str] = []
    if kind == "strace":
        cmd = ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)]
    elif kind == "perf-sys":
        cmd = [
            "perf",
            "stat",
            "-x",
            ",",
            "-e",
            "raw_syscalls:sys_enter",
            "-p",
            str(pid),
            "-o",
            str(out),
            "--",
            "sleep",
            f"{window:g}",
        ]
    elif kind == "perf-malloc":
        added = _ensure_probes()
        events = ",".join(_probe_events())
        cmd = [
            "perf",
            "stat",
            "-x",
            ",",
            "-e",
            events,
            "-p",
            str(pid),
            "-o",
            str(out),
            "--",
            "sleep",
            f"{window:g}",
        ]
    elif kind == "py-spy":
        cmd = [
            _bin("py-spy"),
            "record",
            "-p",
            str(pid),
            "-r",
            "100",
            "-d",
            f"{window:g}",
            "--format",
            "raw",
            "-o",
            str(out),
        ]
    popen = None
    if cmd is not None:
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        time.sleep(0.3)  # attached
    try:
        yield found
    finally:
        if popen is not None:
            if kind == "strace":
                popen.send_signal(signal.SIGINT)  # detach and print the summary
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_group(popen, grace=1.0)
            found["stderr"] = (popen.stderr.read() if popen.stderr else b"").decode()[-2000:]
        for fn in added:
            subprocess.run(["perf", "probe", "-q", "-d", f"*:{fn}"], check=False)


def parse_strace(path: Path) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] != "total" and parts[0][0].isdigit():
            with contextlib.suppress(ValueError):
                n = int(parts[3])
                calls[parts[-1]] = n
    return calls


def parse_perf(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 3 and fields[0].strip().isdigit():
            counts[fields[2]] = int(fields[0])
    return counts


def external(args: argparse.Namespace) -> dict[str, Any]:
    """Server in its own process; CPU (and one observer) over the window."""
    work = Path(tempfile.mkdtemp(prefix="token-cost-"))
    up_port, port = free_port(), free_port()
    upstream = start_upstream(up_port, work / "upstream.log")
    server = ServerProcess(server_cmd(port, up_port, work), port, work / "server.log")
    client = None
    result: dict[str, Any] = {
        "mode": "external",
        "attach": args.attach,
        "streams": args.streams,
        "window_s": args.window,
        "workdir": str(work),
    }
    try:
        server.wait_ready()
        warm_up(port)
        client = start_client(
            port, args.streams, stream_tokens(args), work / "load.json", work / "load.log"
        )
        time.sleep(args.warmup)
        pid = server.popen.pid
        out = work / f"{args.attach}.out"
        with observe(args.attach, pid, args.window, out) as found:
            t0, cpu0, thr0, tok0 = (
                time.monotonic(),
                tree_cpu_seconds(pid),
                thread_cpu(pid),
                scrape_tokens(port),
            )
            time.sleep(args.window)
            t1, cpu1, thr1, tok1 = (
                time.monotonic(),
                tree_cpu_seconds(pid),
                thread_cpu(pid),
                scrape_tokens(port),
            )
        tokens = tok1 - tok0
        result.update(
            tokens=tokens,
            expected_tokens=args.streams * RATE * (t1 - t0),
            cpu_s=cpu1 - cpu0,
            us_per_token=(cpu1 - cpu0) / tokens * 1e6,
            cpu_percent=100 * (cpu1 - cpu0) / (t1 - t0),
            threads_us_per_token={
                k: round((thr1.get(k, 0) - thr0.get(k, 0)) / tokens * 1e6, 2)
                for k in thr1
                if thr1.get(k, 0) - thr0.get(k, 0) > 0
            },
        )
        if args.attach == "strace" and out.exists():
            calls = parse_strace(out)
            result["syscalls_per_token"] = {
                k: round(v / tokens, 3) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
            }
            result["syscalls_total_per_token"] = round(sum(calls.values()) / tokens, 3)
        elif args.attach in ("perf-sys", "perf-malloc") and out.exists():
            counts = parse_perf(out)
            result["per_token"] = {k: round(v / tokens, 2) for k, v in counts.items()}
        elif args.attach == "py-spy" and out.exists():
            result["profile"] = str(out)
            result["attribution"] = attribute(out)
        if found.get("stderr") and args.attach != "py-spy":
            result["observer_stderr"] = found["stderr"]
    finally:
        if client is not None:
            kill_group(client, grace=1.0)
        server.stop()
        kill_group(upstream, grace=1.0)
    return result


# --- in-process: a trio Instrument and counters on trio's internals ------------------------


def inprocess(args: argparse.Namespace) -> dict[str, Any]:
    import trio
    import trio.lowlevel
    from trio._core import _run as trio_run  # the counters patch trio internals: measuring only

    from trio_stream.config import Settings
    from trio_stream.http.service import Service, open_service
    from trio_stream.http.stream import Subscriber
    from trio_stream.server.serve import serve_service

    counts: collections.Counter[str] = collections.Counter()
    steps_by_task: collections.Counter[str] = collections.Counter()
    exited_points = [0, 0]  # cancel points, schedule points of tasks that exited

    class Counting(trio.abc.Instrument):
        def before_run(self) -> None:
            pass

        def task_scheduled(self, task: trio.lowlevel.Task) -> None:
            counts["task_scheduled (wake-ups)"] += 1

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            counts["task steps (switches)"] += 1
            steps_by_task[task.name] += 1

        def before_io_wait(self, timeout: float) -> None:
            counts["scheduler loop turns (io waits)"] += 1
            if timeout == 0:
                counts["io waits with timeout 0"] += 1

        def task_exited(self, task: trio.lowlevel.Task) -> None:
            exited_points[0] += task._cancel_points
            exited_points[1] += task._schedule_points

    def wrap(owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name)

        def counted(*a: Any, **kw: Any) -> Any:
            counts[key] += 1
            return original(*a, **kw)

        setattr(owner, name, counted)

    wrap(trio_run.CancelScope, "__enter__", "cancel scopes entered")
    wrap(trio_run.Deadlines, "add", "deadline heap pushes")
    wrap(trio_run.Deadlines, "remove", "deadline heap removes")
    wrap(trio_run.Runner, "reschedule", "runner.reschedule")
    wrap(trio.lowlevel.ParkingLot, "park", "ParkingLot.park")
    wrap(trio.lowlevel.ParkingLot, "unpark_all", "ParkingLot.unpark_all")
    wrap(Subscriber, "_send_body", "ASGI body sends (events)")

    def live_points() -> tuple[int, int]:
        cancel, sched = exited_points
        todo = [trio.lowlevel.current_root_task()]
        while todo:
            task = todo.pop()
            if task is None:
                continue
            cancel += task._cancel_points
            sched += task._schedule_points
            for nursery in task.child_nurseries:
                todo.extend(nursery.child_tasks)
        return cancel, sched

    def tokens_now(service: Service) -> dict[str, int]:
        return {rid: run.log.last_seq for rid, run in service.runs.runs.items()}

    work = Path(tempfile.mkdtemp(prefix="token-cost-"))
    up_port, port = free_port(), free_port()
    upstream = start_upstream(up_port, work / "upstream.log")
    result: dict[str, Any] = {
        "mode": "inprocess",
        "streams": args.streams,
        "window_s": args.window,
        "tracemalloc": args.tracemalloc,
        "workdir": str(work),
    }
    settings = Settings(
        port=port,
        db=str(work / "ts.db"),
        upstream="openai",
        upstream_url=f"http://127.0.0.1:{up_port}/v1",
        graceful_timeout=1.0,
    )

    async def main() -> None:
        shutdown = trio.Event()
        async with open_service(settings) as service, trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_service(
                    service, shutdown=shutdown, task_status=task_status
                )
            )
            await trio.to_thread.run_sync(warm_up, port)
            client = start_client(
                port, args.streams, stream_tokens(args), work / "load.json", work / "load.log"
            )
            try:
                await trio.sleep(args.warmup)
                if args.tracemalloc:
                    tracemalloc.start(1)
                    await trio.sleep(1)
                    snap0 = tracemalloc.take_snapshot()
                    blocks0 = sys.getallocatedblocks()
                before, points0, counts0 = tokens_now(service), live_points(), counts.copy()
                steps0 = steps_by_task.copy()
                cpu0, t0 = time.process_time(), trio.current_time()
                await trio.sleep(args.window)
                after, points1, counts1 = tokens_now(service), live_points(), counts.copy()
                cpu1, t1 = time.process_time(), trio.current_time()
                steps1 = steps_by_task.copy()
                if args.tracemalloc:
                    snap1 = tracemalloc.take_snapshot()
                    blocks1 = sys.getallocatedblocks()
                    tracemalloc.stop()
                tokens = sum(n - before.get(rid, 0) for rid, n in after.items())
                gone = set(before) - set(after)
                result.update(
                    tokens=tokens,
                    runs_ended_in_window=len(gone),
                    expected_tokens=args.streams * RATE * (t1 - t0),
                    cpu_us_per_token_instrumented=(cpu1 - cpu0) / tokens * 1e6,
                )
                per = {k: round((counts1[k] - counts0[k]) / tokens, 3) for k in counts1}
                per["checkpoints (cancel points)"] = round((points1[0] - points0[0]) / tokens, 3)
                per["schedule points"] = round((points1[1] - points0[1]) / tokens, 3)
                result["per_token"] = per
                result["task_steps_per_token_by_task"] = {
                    k: round((steps1[k] - steps0[k]) / tokens, 3)
                    for k, _ in (steps1 - steps0).most_common(12)
                }
                if args.tracemalloc:
                    stats = snap1.compare_to(snap0, "lineno")
                    result["net_bytes_per_token"] = round(
                        sum(s.size_diff for s in stats) / tokens, 1
                    )
                    result["net_blocks_per_token"] = round(
                        sum(s.count_diff for s in stats) / tokens, 3
                    )
                    result["allocated_blocks_delta_per_token"] = round(
                        (blocks1 - blocks0) / tokens, 3
                    )
                    result["top_net_sites"] = [
                        {
                            "site": str(s.traceback[0]),
                            "bytes_per_token": round(s.size_diff / tokens, 1),
                            "blocks_per_token": round(s.count_diff / tokens, 3),
                        }
                        for s in sorted(stats, key=lambda s: -abs(s.size_diff))[:10]
                    ]
            finally:
                kill_group(client, grace=1.0)
                shutdown.set()

    try:
        trio.run(main, instruments=[Counting()])
    finally:
        kill_group(upstream, grace=1.0)
    return result


# --- attributing a py-spy profile ------------------------------------------------------------


def _stage(frame: str, upstream_side: bool) -> str | None:
    """The stage of one frame ``function (file:line)``, or None (look further out)."""
    fn = frame.split(" (", 1)[0]
    if any(s in frame for s in ("prometheus_client", "trio_stream/logs.py", "logging/")):
        return "metrics/logging"
    if "trio_stream/metrics.py" in frame:
        return "metrics/logging"
    if "trio_stream/http/stream.py" in frame and fn.startswith("Pinger."):
        return "Pinger"
    if "trio_stream/http/transport.py" in frame:
        return "GuardedStream"
    encoding = "trio_stream/wire/chunks.py" in frame
    if encoding or ("trio_stream/wire/sse.py" in frame and fn == "event"):
        return "writer: render/encode"
    if "trio_stream/upstream/h1.py" in frame:
        return "reader: h1.py/h11"
    if "trio_stream/upstream/" in frame or "trio_stream/wire/sse.py" in frame:
        return "reader: SSE decode + wire.py + items"
    if "h11/" in frame and upstream_side:
        return "reader: h1.py/h11"
    if "httpx/" in frame or "httpcore/" in frame:
        return "reader: httpx/httpcore"
    if "hypercorn/" in frame or "h11/" in frame:
        return "client: hypercorn h11/ASGI send"
    if "trio_stream/runs/" in frame or "trio_stream/core/log.py" in frame:
        return "Run log hand-off + _pump"
    if "trio_stream/http/stream.py" in frame:
        return "writer: Subscriber loop"
    if "trio_stream/" in frame:
        return "endpoints/app"
    return None


def _side(frames: list[str]) -> str:
    joined = ";".join(frames)
    if "httpcore/" in joined or "httpx/" in joined or "trio_stream/upstream/h1.py" in joined:
        return "upstream"
    if "transport.py" in joined or "hypercorn/" in joined:
        return "client"
    return "other"


def _is_trio(frame: str) -> bool:
    return "trio/_core/" in frame or "outcome/" in frame or "trio/_timeouts.py" in frame


def classify(frames: list[str]) -> str:
    """The stage of one sample (frames root first): its innermost frame with a
    stage; a sample in trio's socket layer is charged to the side that called it."""
    side = _side(frames)
    leaf = frames[-1] if frames else ""
    if any(s in leaf for s in ("trio/_socket.py", "trio/_highlevel_socket.py", "socket.py")):
        return f"{side} socket syscalls (send/recv)"
    if any("threading.py" in f or "trio/_threads.py" in f for f in frames):
        return "worker threads"
    if all(_is_trio(f) for f in frames):
        if any("_io_epoll.py" in f for f in frames):
            return "trio scheduler: epoll_wait + events"
        return "trio scheduler: run loop"
    trio_leaf = _is_trio(leaf) or "_parking_lot.py" in leaf
    for frame in reversed(frames):
        stage = _stage(frame, side == "upstream")
        if stage is not None:
            return f"{stage} (in trio)" if trio_leaf else stage
    return "other"


def attribute(path: Path) -> dict[str, Any]:
    """Samples per stage from a ``py-spy record --format raw`` file."""
    stages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        if any("threading.py" in f for f in frames):
            stages["worker threads"] += n
            continue
        # drop the frames below trio's run loop (the command line, click, trio.run)
        first = next((i for i, f in enumerate(frames) if "trio/_core/" in f), 0)
        frames = frames[first:]
        stages[classify(frames)] += n
    return {
        "samples": total,
        "percent": {k: round(100 * v / total, 1) for k, v in stages.most_common()},
    }


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("external", "inprocess"):
        p = sub.add_parser(name)
        p.add_argument("--streams", type=int, default=100)
        p.add_argument("--warmup", type=float, default=8.0, help="seconds before the window")
        p.add_argument("--window", type=float, default=20.0, help="seconds measured")
        p.add_argument("--json", type=Path, help="also write the result here")
        if name == "external":
            p.add_argument(
                "--attach",
                default="none",
                choices=("none", "strace", "perf-sys", "perf-malloc", "py-spy"),
            )
        else:
            p.add_argument("--tracemalloc", action="store_true")
    p = sub.add_parser("attribute")
    p.add_argument("profile", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode == "attribute":
        result = attribute(args.profile)
    else:
        result = external(args) if args.mode == "external" else inprocess(args)
        if math.isfinite(float(result.get("tokens", 0))) and args.json:
            args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
