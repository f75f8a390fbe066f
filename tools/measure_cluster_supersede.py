"""Measure a supersede across two cluster nodes: B on node 2 replaces A on node 1.

Starts a ``redis-server`` (a free port, no persistence) and two ``trio-stream
serve --redis`` processes on it (different ports, one shared SQLite file,
mock upstream, ``--log-format json``), then, for each try, in a fresh session:

1. sends prompt A to node 1 and reads it until its first token (A is mid-stream);
2. sends prompt B in the same session to node 2, which supersedes A;
3. sends prompt C to node 2 in a session of its own (no predecessor).

Log lines carry no timestamps (docs/api.md section 4), so this tool reads both
nodes' stderr as it is written and stamps each line on arrival with its own
clock (one clock for both nodes, and for the client).  It reports:

* **supersede latency, server side**: from B's ``stream_start`` line (node 2:
  B has arrived) to A's ``prev_stream_finished_cleanly`` line (node 1: A's
  cleanup is done: saved, session released);
* **B's send to A's `superseded` event**, on the client: A's client learns it
  was replaced;
* **time to first token** of B and of C, from send to first content event,
  and the difference of their medians: what the supersede costs B.

Usage::

    .venv/bin/python tools/measure_cluster_supersede.py --tries 200
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also as a plain script

from tools.measure_supersede import Stream, stream

A_TOKENS = 1000  # A is long: it is always still running when B arrives


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    """One ``trio-stream serve`` process; its JSON log lines, stamped on arrival."""

    name: str
    port: int
    process: trio.Process
    lines: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    async def read_log(self) -> None:
        assert self.process.stderr is not None
        pending = b""
        async for data in self.process.stderr:
            now = trio.current_time()
            pending += data
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                with contextlib.suppress(ValueError):
                    record = orjson.loads(raw)
                    if isinstance(record, dict):
                        self.lines.append((now, record))
            self.changed.set()
            self.changed = trio.Event()

    async def wait_line(self, event: str, trace: str | None = None) -> float:
        """When the line ``event`` (of run ``trace``) arrived; waits for it."""
        while True:
            for at, record in self.lines:
                if record.get("event") == event and trace in (None, record.get("trace")):
                    return at
            await self.changed.wait()

    def count(self, event: str) -> int:
        return sum(1 for _, r in self.lines if r.get("event") == event)


@contextlib.asynccontextmanager
async def started(cmd: list[str], **kwargs: Any) -> AsyncIterator[trio.Process]:
    """A process in its own session; SIGTERM (then SIGKILL) by its pid on the way out."""
    process = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
    )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(5):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def wait_redis(port: int) -> None:
    with trio.fail_after(10):
        while True:
            with contextlib.suppress(OSError):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(b"PING\r\n")
                    if (await stream.receive_some(16)).startswith(b"+PONG"):
                        return
            await trio.sleep(0.05)


@dataclass
class Results:
    latency: list[float] = field(default_factory=list)
    to_a_event: list[float] = field(default_factory=list)
    ttft_successor: list[float] = field(default_factory=list)
    ttft_fresh: list[float] = field(default_factory=list)


async def one_try(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], nodes: tuple[Node, Node], n: int,
    tokens: int, results: Results,
) -> None:  # fmt: skip
    a, b, c = Stream(), Stream(), Stream()
    session = f"cluster-measure-{os.getpid()}-{n}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream, clients[0], f"A {n}", session, A_TOKENS, a)
        await a.first_token.wait()  # A is mid-stream on node 1
        await stream(clients[1], f"B {n}", session, tokens, b)
    await stream(clients[1], f"C {n}", f"{session}-fresh", tokens, c)
    with trio.fail_after(10):
        arrived = await nodes[1].wait_line("stream_start", b.run_id)
        cleaned = await nodes[0].wait_line("prev_stream_finished_cleanly", a.run_id)
    results.latency.append(cleaned - arrived)
    results.to_a_event.append(a.superseded_at - b.sent)
    results.ttft_successor.append(b.first_token_at - b.sent)
    results.ttft_fresh.append(c.first_token_at - c.sent)


def serve_cmd(port: int, redis_url: str, db: Path, args: argparse.Namespace) -> list[str]:
    exe = Path(sys.executable).with_name("trio-stream")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "trio_stream"]
    return [*base, "serve", "--port", str(port), "--redis", redis_url, "--db", str(db),
            "--log-format", "json", "--mock-delay-ms", f"{args.mock_delay_ms:g}",
            "--supersede-timeout", f"{args.supersede_timeout:g}",
            "--graceful-timeout", "1"]  # fmt: skip


async def measure(args: argparse.Namespace, workdir: Path) -> tuple[Results, tuple[Node, Node]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (make services)")
    rport = free_port()
    redis_cmd = [binary, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    redis_url = f"redis://127.0.0.1:{rport}/0"
    results = Results()
    async with (
        started(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        contextlib.AsyncExitStack() as stack,
        trio.open_nursery() as nursery,
    ):
        await wait_redis(rport)
        nodes = []
        for name in ("node1", "node2"):
            port = free_port()
            cmd = serve_cmd(port, redis_url, workdir / "shared.db", args)
            process = await stack.enter_async_context(
                started(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            )
            node = Node(name, port, process)
            nursery.start_soon(node.read_log)
            nodes.append(node)
        pair = (nodes[0], nodes[1])
        with trio.fail_after(30):
            for node in pair:
                await node.wait_line("listening")
        limits = httpx.Limits(max_keepalive_connections=4)
        clients = []
        for node in pair:
            url = f"http://127.0.0.1:{node.port}"
            client = httpx.AsyncClient(base_url=url, timeout=30, limits=limits)
            clients.append(await stack.enter_async_context(client))
        c1, c2 = clients
        for n in range(args.warmup):
            await one_try((c1, c2), pair, -1 - n, args.max_tokens, Results())
        for n in range(args.tries):
            await one_try((c1, c2), pair, n, args.max_tokens, results)
        nursery.cancel_scope.cancel()
    return results, pair


def ms(values: list[float], how: str) -> str:
    value = statistics.median(values) if how == "median" else max(values)
    return f"{value * 1000:8.3f} ms"


def report(results: Results, nodes: tuple[Node, Node], args: argparse.Namespace) -> dict[str, Any]:
    rows = [
        ("supersede latency, server side (B's stream_start", results.latency),
        ("  on node 2 -> A's prev_stream_finished_cleanly on node 1)", []),
        ("B sent -> A's client gets its superseded event", results.to_a_event),
        ("TTFT of B (superseded A on the other node)", results.ttft_successor),
        ("TTFT of C (no predecessor, node 2)", results.ttft_fresh),
    ]
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{args.tries} tries (after {args.warmup} warm-up), two nodes + Redis, mock delay "
          f"{args.mock_delay_ms:g} ms/token, --supersede-timeout {args.supersede_timeout:g} s; "
          f"load average at end {load}")  # fmt: skip
    print(f"{'':60} {'median':>11} {'max':>11}")
    for label, values in rows:
        if values:
            print(f"{label:60} {ms(values, 'median')} {ms(values, 'max')}")
        else:
            print(label)
    extra = statistics.median(results.ttft_successor) - statistics.median(results.ttft_fresh)
    print(f"B's median TTFT minus C's: {extra * 1000:.3f} ms")
    clean = nodes[0].count("prev_stream_finished_cleanly")
    timeouts = sum(n.count("prev_stream_timeout_on_cancel") for n in nodes)
    print(f"prev_stream_finished_cleanly: {clean}, prev_stream_timeout_on_cancel: {timeouts}")
    return {
        "tries": args.tries,
        "mock_delay_ms": args.mock_delay_ms,
        "loadavg_end": load,
        "latency_s": results.latency,
        "b_sent_to_a_superseded_s": results.to_a_event,
        "ttft_successor_s": results.ttft_successor,
        "ttft_fresh_s": results.ttft_fresh,
        "timeouts": timeouts,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tries", type=int, default=200, help="A/B pairs to measure")
    parser.add_argument("--warmup", type=int, default=5, help="pairs run first, not counted")
    parser.add_argument("--mock-delay-ms", type=float, default=20.0, help="mock gap per token")
    parser.add_argument("--max-tokens", type=int, default=4, help="length of B and C")
    parser.add_argument("--supersede-timeout", type=float, default=2.0)
    parser.add_argument("--json", dest="json_path", help="also write the raw figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trio-stream-cluster-supersede-") as tmp:
        results, nodes = trio.run(measure, args, Path(tmp))
    figures = report(results, nodes, args)
    if args.json_path:
        with open(args.json_path, "wb") as f:
            f.write(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 1 if figures["timeouts"] else 0


if __name__ == "__main__":
    sys.exit(main())
