"""Server CPU per token over HTTP/1.1, h2c and TLS+h2, measured in one run.

Two ``trio-stream serve`` processes (the mock, paced at ``--delay-ms``): a
plain one (HTTP/1.1, and h2c by prior knowledge) and one with a throwaway
trustme certificate (TLS, ALPN h2).  They are loaded by ``trio-stream load`` at ``--streams``
concurrent streams, one protocol after the other, for ``--rounds`` rounds (the
order rotates each round).  The server's CPU over each load, divided by the
tokens the client received, is the figure.  ``--py-spy PROTO`` records the
server with py-spy during that protocol's loads (``--format raw``, summed by
function with ``--top``).

    python -m tools.measure_protocols --streams 200 --tokens 200 --rounds 2
    python -m tools.measure_protocols --py-spy h2c --top 40

Every process started here is stopped by its pid (its own process group).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

from tools.bench import ROOT, ServerProcess, free_port, warm_up

PROTOCOLS = ("http1", "h2c", "tls-h2")


def _bin(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "trio_stream"]


def serve_cmd(port: int, work: Path, delay_ms: float, tls: tuple[Path, Path] | None) -> list[str]:
    cmd = [*_bin("trio-stream"), "serve", "--port", str(port), "--db", str(work / f"{port}.db"),
           "--mock-delay-ms", f"{delay_ms:g}", "--graceful-timeout", "1"]  # fmt: skip
    if tls is not None:
        cmd += ["--certfile", str(tls[0]), "--keyfile", str(tls[1])]
    return cmd


def load_cmd(proto: str, port: int, streams: int, tokens: int, out: Path) -> list[str]:
    scheme = "https" if proto == "tls-h2" else "http"
    cmd = [*_bin("trio-stream"), "load", "--url", f"{scheme}://127.0.0.1:{port}",
           "-c", str(streams), "-n", str(streams), "--max-tokens", str(tokens),
           "--json", str(out), "--quiet"]  # fmt: skip
    if proto != "http1":
        cmd.append("--http2")
    if proto == "tls-h2":
        cmd.append("--insecure")
    return cmd


def _function(frame: str) -> str:
    """``name (path/file.py:123)`` -> ``name (path/file.py)``."""
    return frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") else frame


def _package(frame: str) -> str:
    """The frame's top package (``trio``, ``h2``, ``hypercorn``, ``trio_stream.http`` ...)."""
    path = frame.rpartition("(")[2].rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    if parts[0] == "trio_stream" and len(parts) > 2:
        return f"trio_stream.{parts[1]}"
    return parts[0].removesuffix(".py")


def profile_summary(raw: Path, top: int) -> list[str]:
    """py-spy raw (collapsed) stacks of the main thread: self share by function and
    by package (the innermost frame), and inclusive share of the packages."""
    own: collections.Counter[str] = collections.Counter()
    pkg: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or "WorkerThread" in stack or "_thread_cache" in stack:
            continue  # trio's thread cache: idle worker threads, sampled as busy
        n = int(count)
        total += n
        frames = stack.split(";")
        own[_function(frames[-1])] += n
        pkg[_package(frames[-1])] += n
        for name in {_package(f) for f in frames}:
            incl[name] += n
    lines = [f"{total} samples (main thread)", "self, by package:"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in pkg.most_common(15)]
    lines += ["inclusive, by package:"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in incl.most_common(15)]
    lines += ["self, by function:"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    p.add_argument("--delay-ms", type=float, default=50)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--py-spy", choices=PROTOCOLS, help="profile the server during this one")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--keep", type=Path, help="copy py-spy's raw profiles into this directory")
    args = p.parse_args()
    protocols = args.protocols.split(",")
    results: dict[str, list[float]] = {proto: [] for proto in protocols}
    with tempfile.TemporaryDirectory(prefix="measure-protocols-") as tmp:
        work = Path(tmp)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        certfile, keyfile = work / "cert.pem", work / "key.pem"
        certfile.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(keyfile))
        plain_port, tls_port = free_port(), free_port()
        plain = ServerProcess(
            serve_cmd(plain_port, work, args.delay_ms, None), plain_port, work / "plain.log"
        )
        secure = ServerProcess(
            serve_cmd(tls_port, work, args.delay_ms, (certfile, keyfile)), tls_port,
            work / "tls.log",
        )  # fmt: skip
        try:
            plain.wait_ready()
            secure.wait_ready()
            warm_up(plain_port)
            for rnd in range(args.rounds):
                order = protocols[rnd % len(protocols) :] + protocols[: rnd % len(protocols)]
                for proto in order:
                    proc = secure if proto == "tls-h2" else plain
                    out = work / f"{proto}-{rnd}.json"
                    spy = None
                    if args.py_spy == proto:
                        raw = work / f"{proto}-{rnd}.raw"
                        spy = subprocess.Popen(
                            ["py-spy", "record", "--format", "raw", "--rate", "200",
                             "--output", str(raw), "--pid", str(proc.popen.pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                        )  # fmt: skip
                        time.sleep(1.0)
                    before = proc.cpu_seconds()
                    subprocess.run(
                        load_cmd(proto, proc.port, args.streams, args.tokens, out),
                        check=True, cwd=ROOT, timeout=600, stdout=subprocess.DEVNULL,
                    )  # fmt: skip
                    cpu = proc.cpu_seconds() - before
                    report = json.loads(out.read_text())
                    tokens = float(report["tokens"])
                    per = cpu / tokens * 1e6
                    results[proto].append(per)
                    gap, ttft = report["gap_ms"], report["ttft_ms"]
                    print(
                        f"round {rnd} {proto:7s} {per:6.1f} µs/token  ({tokens:.0f} tokens, "
                        f"{report['events']} events, ok {report['requests']['ok']}, "
                        f"gap p50/p99 {gap['p50']:.0f}/{gap['p99']:.0f} ms, "
                        f"TTFT p99 {ttft['p99']:.0f} ms, wall {report['wall_s']:.1f} s)",
                        flush=True,
                    )
                    if spy is not None:
                        os.kill(spy.pid, 2)  # SIGINT: py-spy writes its output
                        spy.wait(timeout=30)
                        for line in profile_summary(raw, args.top):
                            print("   ", line)
                        if args.keep is not None:
                            args.keep.mkdir(parents=True, exist_ok=True)
                            (args.keep / raw.name).write_bytes(raw.read_bytes())
        finally:
            plain.stop()
            secure.stop()
    base = sorted(results.get("http1", [float("nan")]))
    ref = base[len(base) // 2]
    for proto, values in results.items():
        med = sorted(values)[len(values) // 2]
        print(f"{proto:7s} median {med:6.1f} µs/token  ({med / ref:.2f}x HTTP/1.1)")


if __name__ == "__main__":
    main()
