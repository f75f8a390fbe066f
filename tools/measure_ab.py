"""Interleaved A/B of source trees on bench.py's ``streams`` and ``proxy`` loads.

    python -m tools.measure_ab streams --trees main=../main,branch=. --peer --rounds 2
    python -m tools.measure_ab proxy --trees main=../main,branch=. --workers 2 --rounds 2

Each tree (a checkout of trio-stream: its ``trio_stream`` package is put first
on ``PYTHONPATH``) serves in turn, the order reversing every round; the
client is ``trio-stream load`` from this checkout, the same for every row.

* ``streams``: ``trio-stream serve --mock-delay-ms 50`` loaded like bench.py's
  ``streams`` scenario (``-c 1000 -n 1000 --max-tokens 60``); ``--peer`` adds
  uvicorn + sse-starlette (tools/peers) as a row of its own.
* ``proxy``: a fresh ``redis-server`` and ``tools/fake_openai.py`` (50 ms per
  token) per row, ``trio-stream serve --upstream openai --workers N --redis``
  loaded like bench.py's ``proxy`` scenario (``-c 300 -n 600 --max-tokens 60``);
  ``--workers 1`` serves embedded, without Redis.

Per row: server CPU per token (utime + stime of the server's process tree over
the load), the client's p99 inter-event gap minus the 50 ms token gap (bench.py's
"p99 delivery delay"), p99 and p50 time to first token, tokens/s, and the
share of the machine's CPU used by processes outside the measurement (*other %*:
compare rows only when it is low and alike).  ``--profile DIR`` samples the
server's process (each worker's, with ``--workers``) with py-spy into DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def busy_s() -> float:
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(v) - v[3] - v[4]) / TICK


def client(port: int, args: list[str], out: Path | None = None) -> None:
    cmd = [str(BIN / "trio-stream"), "load", "--url", f"http://127.0.0.1:{port}", *args, "-q"]
    if out is not None:
        cmd += ["--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True, timeout=600)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def measure(kind: str, name: str, tree: Path | None, rnd: int, a: argparse.Namespace,
            work: Path) -> str:  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    spies: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        src = tree if tree is not None else ROOT
        env = dict(os.environ, PYTHONPATH=str(src))
        if tree is None:  # the peer
            cmd = [sys.executable, str(ROOT / "tools" / "peers" / "uvicorn_sse_starlette.py"),
                   "--port", str(port), "--delay-ms", "50"]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "trio_stream", "serve", "--port", str(port),
                   "--db", str(work / f"{port}.db"), "--mock-delay-ms", "50",
                   "--graceful-timeout", "1"]  # fmt: skip
        if kind == "proxy":
            rport, uport = free_port(), free_port()
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(work)],
                stdout=subprocess.DEVNULL, start_new_session=True,
            ))  # fmt: skip
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "tools" / "fake_openai.py"), "--port", str(uport),
                 "--delay-ms", "50"],
                env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            ))  # fmt: skip
            wait_port(rport)
            wait_port(uport)
            cmd += ["--upstream", "openai", "--upstream-url", f"http://127.0.0.1:{uport}/v1"]
            if a.workers > 1:
                cmd += ["--workers", str(a.workers), "--redis", f"redis://127.0.0.1:{rport}/0"]
        log = (work / f"{kind}-{name}-{rnd}.log").open("ab")
        server = subprocess.Popen(cmd, cwd=src, env=env, stdout=log, stderr=log,
                                  start_new_session=True)  # fmt: skip
        procs.append(server)
        wait_port(port)
        time.sleep(0.5)
        for _ in range(2):  # warm up (every worker: 4 connections)
            client(port, ["-c", "4", "-n", "4", "--max-tokens", "5"])
        pids = [server.pid, *children(server.pid)]
        if a.profile is not None:
            for pid in pids if len(pids) == 1 else pids[1:]:
                spies.append(subprocess.Popen(
                    [str(BIN / "py-spy"), "record", "--nonblocking", "--rate", "200",
                     "--format", "raw",
                     "--output", str(a.profile / f"{kind}-{name}-{rnd}-{pid}.txt"),
                     "--pid", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))  # fmt: skip
        out = work / f"{kind}-{name}-{rnd}.json"
        size = ["-c", "1000", "-n", "1000"] if kind == "streams" else ["-c", "300", "-n", "600"]
        c0, b0, t0 = sum(cpu_s(p) for p in pids), busy_s(), time.monotonic()
        client(port, [*size, "--max-tokens", "60"], out)
        c1, b1, t1 = sum(cpu_s(p) for p in pids), busy_s(), time.monotonic()
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        report = json.loads(out.read_text())
        other = (b1 - b0 - (c1 - c0) - report["client"]["cpu_s"]) / (
            (t1 - t0) * (os.cpu_count() or 1)
        )
        return (
            f"| {name} | {rnd} | {(c1 - c0) / report['tokens'] * 1e6:.1f} "
            f"| {report['gap_ms']['p99'] - 50:.0f} | {report['ttft_ms']['p99']:.0f} "
            f"| {report['ttft_ms']['p50']:.0f} | {report['tokens_per_s']:.0f} "
            f"| {report['requests']['ok']} | {100 * other:.0f} |"
        )
    finally:
        stop(procs)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("kind", choices=("streams", "proxy"))
    p.add_argument("--trees", required=True, help="NAME=PATH,...: trio-stream checkouts")
    p.add_argument("--peer", action="store_true", help="streams: add uvicorn + sse-starlette")
    p.add_argument("--workers", type=int, default=2, help="proxy: --workers (1: embedded)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", type=Path, default=None, help="py-spy collapsed stacks into DIR")
    a = p.parse_args()
    rows: list[tuple[str, Path | None]] = []
    for item in a.trees.split(","):
        name, _, path = item.partition("=")
        rows.append((name, Path(path).resolve()))
    if a.peer:
        rows.append(("sse-starlette", None))
    if a.profile is not None:
        a.profile.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.gettempdir()) / f"measure-ab-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    print("| row | round | server CPU µs/token | p99 delivery delay ms | p99 TTFT ms "
          "| p50 TTFT ms | tokens/s | ok | other % |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rnd in range(a.rounds):
        for name, tree in rows if rnd % 2 == 0 else rows[::-1]:
            print(measure(a.kind, name, tree, rnd, a, work), flush=True)


if __name__ == "__main__":
    main()
