"""Benchmark trio-stream against its peers, in one invocation, and write docs/benchmarks.md.

    .venv/bin/python tools/bench.py            # full: 3 interleaved rounds (~10 min, 2 cores)
    .venv/bin/python tools/bench.py --quick    # 1 round, small sizes: a smoke run

Servers, each started as its own process on 127.0.0.1 for each measurement:

* ``trio-stream``   -- ``trio-stream serve`` with its built-in mock upstream;
* ``sse-starlette`` -- uvicorn + starlette + sse-starlette (tools/peers/);
* ``quart-trio``    -- hypercorn (trio) + quart-trio, naive async-generator body;
* ``bare-trio``     -- a bare trio socket server writing the same SSE bytes: the ceiling;
* ``ts-h2c``        -- ``trio-stream`` again, the client speaking HTTP/2 by prior
  knowledge (``trio-stream load --http2``; 100 streams per connection);
* ``ts-tls-h2``     -- ``trio-stream serve --certfile/--keyfile`` (a throwaway
  trustme certificate), the client speaking h2 by ALPN over TLS.

The two HTTP/2 rows run the ``tokens``, ``streams``, ``proxy`` and ``proxy100``
scenarios; their targets compare them to ``trio-stream`` (HTTP/1.1) in the same run.

All serve the same mock stream (:mod:`trio_stream.upstream.mocktext`).  The *proxy*
scenarios put a real HTTP upstream behind the server instead: ``tools/fake_openai.py``
in its own process, streaming the same reply at 20 tokens/s.  There the servers are

* ``trio-stream``   -- ``trio-stream serve --upstream openai`` (embedded state);
* ``ts-cluster-1``  -- the same with ``--workers 1 --redis`` (cluster mode, one node);
* ``ts-cluster-2``  -- ``--workers 2 --redis``: a supervisor and two worker processes;
* ``relay``         -- uvicorn (uvloop, httptools) + starlette + httpx relaying the SSE events;
* ``ts-otel``, ``ts-otel-0.01`` -- ``trio-stream serve --upstream openai --otel``, every
  request traced (sampling 1.0), or 1% of them (``OTEL_TRACES_SAMPLER_ARG=0.01``),
  exporting OTLP/HTTP to ``tools/otlp_sink.py`` in its own process (its CPU is not the
  server's).

Per-key limits on and off (issue 22), in the ``short`` and ``proxy100`` scenarios only:

* ``ts-key``        -- ``trio-stream serve --config`` with one ``[[key]]`` and no limits;
* ``ts-limits``     -- the same key with every kind of limit (never reached), in a
  ``redis-server`` of its own (``--limits-redis``; the shared state stays embedded).

The client sends that key (``--api-key``) to every server; those without keys ignore it.

The *members* scenario starts three fake upstreams and runs ``trio-stream``
(relaying the first) beside ``ts-3up`` (the three as one group of a
``--config`` file), ``ts-3same`` (three members, all the first fake) and
``ts-3up-1dead`` (two of them and a member whose port refuses).

The *long* scenario (the seed's long-message test: 1,000 messages of 1,000 tokens,
16 at once, the mock unthrottled) runs only ``trio-stream`` and ``bare-trio`` (the
ceiling); a peer writing one event per token would take minutes per round.

The *paced* scenario (streams at 100 tokens/s on the mock) runs only
``trio-stream`` (``--event-interval-ms 0``, the default) and ``ts-interval50``
(``--event-interval-ms 50``): the events sent, server CPU per token and the
client's p99 gap between events, with and without the interval.

A cluster server gets a fresh ``redis-server`` of its own on a free port; its
CPU is reported apart from the server's (which, for ``--workers 2``, is the
supervisor's and every worker's).  The client is
``trio-stream load`` run as a subprocess, the same for every server; the
idle-stream figure uses a raw-socket opener in this file.  The server's CPU
time and RSS come from ``/proc/<pid>/stat`` and ``/proc/<pid>/status``.

Design: ``--rounds`` interleaved rounds; in each, every scenario runs once on
every server, the server order rotating by one each round; the report gives
medians (and min-max) over rounds, and ratios of trio-stream to each peer.
Every process started here is killed (its whole process group) on the way
out, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "tools" / "peers"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGES = [{"role": "user", "content": "benchmark"}]
NOISY_PERCENT = 10.0  # machine CPU used by other processes beyond which figures are suspect
RETRY_PERCENT = 20.0  # ... beyond which one measurement is taken again


# --- servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What one measurement asks of a server."""

    port: int
    delay_ms: float
    coalesce: bool
    idle: bool
    workdir: Path
    upstream_url: str = ""  # an OpenAI-compatible upstream; "" = the built-in mock
    redis_url: str = ""
    event_interval_ms: float = 0.0  # trio-stream's --event-interval-ms
    otlp_url: str = ""  # an OTLP/HTTP collector (tools/otlp_sink.py) for --otel
    upstream_urls: tuple[str, ...] = ()  # every fake upstream (scenario "members": three)


#: ``--count-io``: trio-stream runs under tools/count_io.py (event-loop and
#: upstream-read counters, read by :func:`io_counts`).
COUNT_IO = False
#: ``--profile DIR``: py-spy samples the server during each load, into DIR.
PROFILE_DIR: Path | None = None


def _trio_stream_cmd(r: Run) -> list[str]:
    exe = Path(sys.executable).with_name("trio-stream")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "trio_stream"]
    if COUNT_IO:
        base = [sys.executable, str(ROOT / "tools" / "count_io.py")]
    cmd = [*base, "serve", "--port", str(r.port), "--db", str(r.workdir / f"{r.port}.db"),
           "--mock-delay-ms", f"{r.delay_ms:g}", "--graceful-timeout", "1"]  # fmt: skip
    if not r.coalesce:
        cmd.append("--no-coalesce")
    if r.idle:  # headers wait for the first event or ping: make the ping come soon
        cmd += ["--ping-interval", "1"]
    if r.upstream_url:
        cmd += ["--upstream", "openai", "--upstream-url", r.upstream_url]
    if r.event_interval_ms:
        cmd += ["--event-interval-ms", f"{r.event_interval_ms:g}"]
    return cmd


def _interval_cmd(ms: float) -> Callable[[Run], list[str]]:
    def cmd(r: Run) -> list[str]:
        return _trio_stream_cmd(dataclasses.replace(r, event_interval_ms=ms))

    return cmd


def _cluster_cmd(workers: int) -> Callable[[Run], list[str]]:
    def cmd(r: Run) -> list[str]:
        return [*_trio_stream_cmd(r), "--workers", str(workers), "--redis", r.redis_url]

    return cmd


def _otel_cmd(ratio: float) -> Callable[[Run], list[str]]:
    """trio-stream with --otel, sampling ``ratio`` of the requests (the
    standard variables), exporting to the bench's collector."""

    def cmd(r: Run) -> list[str]:
        env = [f"OTEL_EXPORTER_OTLP_ENDPOINT={r.otlp_url}", "OTEL_SERVICE_NAME=bench",
               "OTEL_TRACES_SAMPLER=parentbased_traceidratio",
               f"OTEL_TRACES_SAMPLER_ARG={ratio:g}"]  # fmt: skip
        return ["env", *env, *_trio_stream_cmd(r), "--otel"]

    return cmd


#: The client key every measurement sends (``Authorization: Bearer``); only
#: the ``ts-key`` and ``ts-limits`` servers know it, the others ignore it.
BENCH_KEY = "sk-bench"
#: ``ts-limits``'s limits: every kind a key can have, none ever reached by a run.
BENCH_LIMITS = {"rpm": 10**7, "tpm": 10**12, "max_streams": 10**5, "tokens_per_day": 10**15}


def _keys_cmd(limited: bool) -> Callable[[Run], list[str]]:
    """trio-stream with one ``[[key]]`` in a ``--config`` file: unlimited
    (``ts-key``), or with :data:`BENCH_LIMITS` in a Redis of its own
    (``ts-limits``, ``--limits-redis``; the shared state stays embedded)."""

    def cmd(r: Run) -> list[str]:
        limits = "".join(f"{k} = {v}\n" for k, v in BENCH_LIMITS.items()) if limited else ""
        path = r.workdir / f"keys-{'on' if limited else 'off'}.toml"
        if r.workdir.is_dir():  # not for the command shown in the report
            path.write_text(f'[[key]]\nname = "bench"\nsecret = "{BENCH_KEY}"\n{limits}')
        extra = ["--limits-redis", r.redis_url] if limited else []
        return [*_trio_stream_cmd(r), "--config", str(path), *extra]

    return cmd


MEMBER_NAMES = ("m1", "m2", "m3")


def _members_path(r: Run) -> Path:
    return r.workdir / f"{r.port}-members.toml"


def _members_cmd(r: Run) -> list[str]:
    """trio-stream with a --config file whose one group is three members (the
    file is written by :func:`_members_config` before the server starts)."""
    return [*_trio_stream_cmd(dataclasses.replace(r, upstream_url="")), "--config",
            str(_members_path(r))]  # fmt: skip


def _members_config(dead: int = 0, *, one_server: bool = False) -> Callable[[Run], None]:
    """Write the three members' file; the last ``dead`` of them point at a
    port nothing listens on (a member whose server died: connections refused);
    ``one_server``: all three at the first fake upstream (the routing's cost
    alone, with the tokens arriving as they do from one upstream process)."""

    def write(r: Run) -> None:
        urls = [r.upstream_urls[0]] * 3 if one_server else list(r.upstream_urls)
        for i in range(len(urls) - dead, len(urls)):
            urls[i] = f"http://127.0.0.1:{free_port()}/v1"
        tables = [
            f'[[upstream]]\nname = "{n}"\nkind = "openai"\nurl = "{u}"\nmodels = ["mock"]\n'
            for n, u in zip(MEMBER_NAMES, urls, strict=True)
        ]
        _members_path(r).write_text("\n".join(tables))

    return write


def tls_files(workdir: Path) -> tuple[Path, Path]:
    """Where the TLS rows' certificate and key are (:func:`make_tls_files` makes them)."""
    return workdir / "tls-cert.pem", workdir / "tls-key.pem"


def make_tls_files(workdir: Path) -> None:
    """A throwaway certificate for 127.0.0.1 and its key, made once per work directory."""
    cert, key = tls_files(workdir)
    if not cert.exists():
        import trustme  # a dev dependency: only the TLS rows need it

        issued = trustme.CA().issue_cert("127.0.0.1")
        key.write_bytes(issued.private_key_pem.bytes())
        cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))


def _tls_cmd(r: Run) -> list[str]:
    cert, key = tls_files(r.workdir)
    return [*_trio_stream_cmd(r), "--certfile", str(cert), "--keyfile", str(key)]


def _relay_cmd(r: Run) -> list[str]:
    return [sys.executable, str(PEERS / "uvicorn_httpx_relay.py"), "--port", str(r.port),
            "--upstream-url", r.upstream_url]  # fmt: skip


def _peer_cmd(script: str) -> Callable[[Run], list[str]]:
    def cmd(r: Run) -> list[str]:
        return [sys.executable, str(PEERS / script), "--port", str(r.port),
                "--delay-ms", f"{r.delay_ms:g}"]  # fmt: skip

    return cmd


def _postgres_cmd(r: Run) -> list[str]:
    """trio-stream saving to a Postgres of its own (tools/with_postgres.py starts
    it beside the server, fsync on, and removes it after)."""
    cmd = _trio_stream_cmd(r)
    cmd[cmd.index("--db") + 1] = "{pg_url}"
    return [sys.executable, str(ROOT / "tools" / "with_postgres.py"), "--", *cmd]


@dataclass(frozen=True)
class Server:
    name: str
    label: str
    command: Callable[[Run], list[str]]
    mock: bool = True  # serves the mock scenarios
    proxy: bool = False  # serves the proxy scenarios (relays a real upstream)
    redis: bool = False  # needs a redis-server of its own
    otlp: bool = False  # needs an OTLP/HTTP collector (tools/otlp_sink.py) of its own
    only: tuple[str, ...] = ()  # serves only these scenarios (none: by mock/proxy)
    prepare: Callable[[Run], None] | None = None  # writes its files before it starts
    client_args: tuple[str, ...] = ()  # extra ``trio-stream load`` options (HTTP/2)
    tls: bool = False  # serves https (the client does not verify the certificate)

    def serves(self, sc: Scenario) -> bool:
        if self.only:
            return sc.key in self.only
        if sc.servers:
            return self.name in sc.servers
        if self.only and sc.key not in self.only:
            return False
        return self.proxy if sc.upstream else self.mock

    def url(self, port: int) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"


#: The scenarios of the HTTP/2 rows (``ts-h2c``, ``ts-tls-h2``).
H2_SCENARIOS = ("tokens", "streams", "proxy", "proxy100")

SERVERS = (
    Server(
        "trio-stream", "trio-stream serve (hypercorn trio worker, raw ASGI)", _trio_stream_cmd,
        proxy=True,
    ),
    Server(
        "sse-starlette", "uvicorn + starlette + sse-starlette",
        _peer_cmd("uvicorn_sse_starlette.py"),
    ),
    Server(
        "quart-trio", "hypercorn-trio + quart-trio, naive async generator",
        _peer_cmd("hypercorn_quart_trio.py"),
    ),
    Server(
        "bare-trio", "bare trio socket server, same SSE bytes (the ceiling)",
        _peer_cmd("bare_trio.py"),
    ),
    Server(
        "ts-h2c", "trio-stream serve, the client on h2c (HTTP/2 by prior knowledge)",
        _trio_stream_cmd, proxy=True, only=H2_SCENARIOS, client_args=("--http2",),
    ),
    Server(
        "ts-tls-h2", "trio-stream serve --certfile/--keyfile, the client on h2 by ALPN over TLS",
        _tls_cmd, proxy=True, only=H2_SCENARIOS, client_args=("--http2", "--insecure"),
        tls=True,
    ),
    Server(
        "ts-postgres", "trio-stream serve --db postgresql:// (a local Postgres 15, fsync on)",
        _postgres_cmd,
    ),
    Server(
        "ts-cluster-1", "trio-stream serve --workers 1 --redis (cluster mode, one node)",
        _cluster_cmd(1), mock=False, proxy=True, redis=True,
    ),
    Server(
        "ts-cluster-2", "trio-stream serve --workers 2 --redis (supervisor + 2 workers)",
        _cluster_cmd(2), mock=False, proxy=True, redis=True,
    ),
    Server(
        "relay", "uvicorn (uvloop, httptools) + starlette + httpx, relaying SSE events",
        _relay_cmd, mock=False, proxy=True,
    ),
    Server(
        "ts-otel", "trio-stream serve --otel, every request sampled (tools/otlp_sink.py)",
        _otel_cmd(1.0), mock=False, proxy=True, otlp=True,
    ),
    Server(
        "ts-otel-0.01", "trio-stream serve --otel, 1% of requests sampled",
        _otel_cmd(0.01), mock=False, proxy=True, otlp=True,
    ),
    Server(
        "ts-3up", "trio-stream serve --config: one group of three members (serves only "
        "'members')", _members_cmd, mock=False, prepare=_members_config(0),
    ),
    Server(
        "ts-3same", "the same three members, all at one fake upstream process (serves only "
        "'members')", _members_cmd, mock=False, prepare=_members_config(one_server=True),
    ),
    Server(
        "ts-3up-1dead", "the same, one of the three members refusing connections (serves "
        "only 'members')", _members_cmd, mock=False, prepare=_members_config(1),
    ),
    Server(
        "ts-interval50", "trio-stream serve --event-interval-ms 50 (serves only 'paced')",
        _interval_cmd(50), mock=False,
    ),
    Server(
        "ts-key", "trio-stream serve --config: one [[key]], no limits (serves short, proxy100)",
        _keys_cmd(False), proxy=True, only=("short", "proxy100"),
    ),
    Server(
        "ts-limits", "the same key with rpm, tpm, max_streams and a daily budget, in a "
        "--limits-redis of its own (serves short, proxy100)",
        _keys_cmd(True), proxy=True, redis=True, only=("short", "proxy100"),
    ),
)  # fmt: skip


def _fake_upstream_cmd(port: int, delay_ms: float) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "fake_openai.py"), "--port", str(port),
            "--delay-ms", f"{delay_ms:g}"]  # fmt: skip


def _redis_cmd(port: int, workdir: Path) -> list[str]:
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server process in its own process group; CPU and RSS from /proc."""

    def __init__(self, cmd: list[str], port: int, log: Path) -> None:
        self.cmd, self.port, self.log = cmd, port, log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=ROOT,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"server exited ({self.popen.returncode}); see {self.log}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"server not listening after {timeout} s; see {self.log}")

    def cpu_seconds(self) -> float:
        """CPU time of the process and all its descendants (all threads; ``--workers``)."""
        return tree_cpu_seconds(self.popen.pid)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        kill_group(self.popen, grace=3.0)


def _process_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime: the process's own CPU and its reaped children's."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant (plus those they reaped)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError):  # it exited meanwhile
            total += _process_cpu(p)
            todo += _children(p)
    return total


def _exited(pid: int) -> bool:
    """Has the child exited?  Does not reap it, so its pid (= group id) stays ours."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def kill_group(popen: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds, then reap.

    The leader is reaped only after the last signal: until then its pid, which
    is the group id, cannot be given to another process.
    """
    if popen.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while not _exited(popen.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)  # also whatever the leader left behind
    popen.wait()


# --- scenarios ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    metric: str  # the headline figure
    delay_ms: float
    coalesce: bool = True
    concurrency: int = 1
    requests: int = 1
    max_tokens: int = 64
    idle_streams: int = 0
    extra: tuple[str, ...] = ()  # secondary figures shown in the scenario's table
    ratios: tuple[str, ...] = ()  # secondary figures given as ratios too
    upstream: bool = False  # through tools/fake_openai.py (paced at delay_ms), not the mock
    upstreams: int = 1  # fake upstreams started (each server uses the first, or all)
    servers: tuple[str, ...] = ()  # only these servers run it (none: by mock/proxy)

    @property
    def idle(self) -> bool:
        return self.idle_streams > 0


def scenarios(quick: bool) -> list[Scenario]:
    q = quick
    load = ("client_cpu_percent", "busy_percent", "other_cpu_percent")
    return [
        Scenario(
            "tokens", "One stream, upstream unthrottled: tokens/s delivered", "tokens_per_s",
            delay_ms=0, requests=2, max_tokens=4000 if q else 20000,
            extra=("events_per_s", "server_us_per_token", *load),
            ratios=("server_us_per_token",),
        ),
        Scenario(
            "events", "One token per event (trio-stream --no-coalesce): events/s", "events_per_s",
            delay_ms=0, coalesce=False, requests=2, max_tokens=4000 if q else 20000,
            extra=("server_us_per_event", *load), ratios=("server_us_per_event",),
        ),
        Scenario(
            "streams", f"{200 if q else 1000} concurrent streams at 20 tokens/s: server CPU",
            "server_us_per_token", delay_ms=50, concurrency=200 if q else 1000,
            requests=200 if q else 1000, max_tokens=40 if q else 60,
            extra=("server_cpu_per_s", "delay_p99_ms", "gap_p99_ms", "ttft_p99_ms",
                   "tokens_per_s", "events_per_token", *load),
            ratios=("server_cpu_per_s", "delay_p99_ms"),
        ),
        Scenario(
            "idle", f"Memory per open idle stream ({200 if q else 500} streams)",
            "kib_per_stream", delay_ms=60000, idle_streams=200 if q else 500,
        ),
        Scenario(
            "short", "Short streams (10 tokens), 64 connections: requests/s", "requests_per_s",
            delay_ms=0, concurrency=64, requests=500 if q else 1500, max_tokens=10,
            extra=("server_us_per_request", "server_redis_us_per_request", "ttft_p99_ms", *load),
            ratios=("server_us_per_request",),
        ),
        Scenario(
            "proxy", "Proxy: 300 streams at 20 tokens/s from a real HTTP upstream: latency",
            "ttft_p99_ms", delay_ms=50, concurrency=300, requests=300 if q else 600,
            max_tokens=40 if q else 60, upstream=True,
            extra=("gap_p99_ms", "delay_p99_ms", "server_us_per_token", "redis_us_per_token",
                   "server_cpu_per_s", "upstream_cpu_percent", "tokens_per_s",
                   "events_per_token", *load),
            ratios=("gap_p99_ms", "server_us_per_token"),
        ),
        Scenario(
            "proxy100", "Proxy: 100 streams at 20 tokens/s: server CPU per token",
            "server_us_per_token", delay_ms=50, concurrency=100, requests=100 if q else 200,
            max_tokens=40 if q else 60, upstream=True,
            extra=("redis_us_per_token", "server_redis_us_per_token", "server_cpu_per_s",
                   "ttft_p99_ms", "gap_p99_ms", "upstream_cpu_percent", "events_per_token",
                   *load),
            ratios=("server_redis_us_per_token",),
        ),
        Scenario(
            "members", "Proxy: 100 streams at 20 tokens/s over one upstream (trio-stream) and "
            "over three members (ts-3up; ts-3up-1dead: one of them refusing)",
            "server_us_per_token", delay_ms=50, concurrency=100, requests=100 if q else 300,
            max_tokens=40 if q else 60, upstream=True, upstreams=3,
            servers=("trio-stream", "ts-3up", "ts-3same", "ts-3up-1dead"),
            extra=("ttft_p99_ms", "gap_p99_ms", "server_cpu_per_s", "upstream_cpu_percent",
                   "tokens_per_s", "events_per_token", *load),
            ratios=("ttft_p99_ms",),
        ),
        Scenario(
            "long", f"Long messages: {200 if q else 1000} messages of 1,000 tokens, 16 at once, "
            "upstream unthrottled: messages/s", "requests_per_s", delay_ms=0, concurrency=16,
            requests=200 if q else 1000, max_tokens=1000, servers=("trio-stream", "bare-trio"),
            extra=("lost_tokens", "server_us_per_token", "tokens_per_s", "events_per_token",
                   *load),
            ratios=("server_us_per_token",),
        ),
        Scenario(
            "paced", f"{25 if q else 50} streams at 100 tokens/s: --event-interval-ms 0 "
            "(trio-stream) vs 50 (ts-interval50)", "events_per_s", delay_ms=10,
            concurrency=25 if q else 50, requests=25 if q else 100, max_tokens=200,
            servers=("trio-stream", "ts-interval50"),
            extra=("server_us_per_token", "gap_p99_ms", "tokens_per_s", "events_per_token",
                   "server_cpu_per_s", "ttft_p99_ms", *load),
            ratios=("server_us_per_token", "gap_p99_ms"),
        ),
    ]  # fmt: skip


#: figure -> (label, higher is better)
METRICS = {
    "tokens_per_s": ("tokens/s", True),
    "events_per_s": ("events/s", True),
    "requests_per_s": ("requests/s", True),
    "server_cpu_per_s": ("server CPU s per s", False),
    "server_us_per_token": ("server CPU µs/token", False),
    "server_us_per_event": ("server CPU µs/event", False),
    "server_us_per_request": ("server CPU µs/request", False),
    "delay_p99_ms": ("p99 delivery delay ms", False),
    "gap_p99_ms": ("p99 inter-event gap ms", False),
    "ttft_p99_ms": ("p99 TTFT ms", False),
    "events_per_token": ("events/token", False),
    "redis_us_per_token": ("Redis CPU µs/token", False),
    "server_redis_us_per_token": ("server+Redis CPU µs/token", False),
    "server_redis_us_per_request": ("server+Redis CPU µs/request", False),
    "upstream_cpu_percent": ("fake upstream CPU %", False),
    "client_cpu_percent": ("client CPU %", False),
    "busy_percent": ("bench processes % of machine", False),
    "other_cpu_percent": ("other load %", False),
    "kib_per_stream": ("KiB per idle stream", False),
    "lost_tokens": ("tokens lost (+ failed requests' tokens)", False),
    # with --count-io only (tools/count_io.py)
    "wakeups_per_token": ("loop wake-ups/token", False),
    "events_per_wakeup": ("ready fds/wake-up", True),
    "tokens_per_read": ("tokens/upstream read", True),
    "bytes_per_read": ("bytes/upstream read", True),
}
IO_METRICS = ("wakeups_per_token", "events_per_wakeup", "tokens_per_read", "bytes_per_read")
SATURATED_PERCENT = 90.0  # server + client CPU beyond which a row measures overload


def label(metric: str) -> str:
    return METRICS[metric][0]


Medians = dict[str, float]  # server name -> median of one figure


def _vs(
    peer: str, factor: float, higher: bool, ours: str = "trio-stream"
) -> Callable[[Medians], bool | None]:
    def check(m: Medians) -> bool | None:
        if ours not in m or peer not in m:
            return None
        if higher:
            return m[ours] >= factor * m[peer]
        return m[ours] <= factor * m[peer]

    return check


def _absolute(
    limit: float, strict: bool, ours: str = "trio-stream"
) -> Callable[[Medians], bool | None]:
    def check(m: Medians) -> bool | None:
        if ours not in m:
            return None
        return m[ours] < limit if strict else m[ours] <= limit

    return check


def _at_least(limit: float, ours: str = "trio-stream") -> Callable[[Medians], bool | None]:
    def check(m: Medians) -> bool | None:
        return None if ours not in m else m[ours] >= limit

    return check


@dataclass(frozen=True)
class Target:
    scenario: str
    metric: str
    text: str
    check: Callable[[Medians], bool | None]  # None: not measured
    server: str = "trio-stream"  # whose figure the target is about


TARGETS = (
    Target("tokens", "tokens_per_s", "≥ 2x sse-starlette", _vs("sse-starlette", 2, True)),
    Target("events", "events_per_s", "≥ 1.5x quart-trio", _vs("quart-trio", 1.5, True)),
    Target("streams", "server_us_per_token", "≤ quart-trio (naive)", _vs("quart-trio", 1, False)),
    Target("streams", "server_us_per_token", "≤ 1.5x sse-starlette",
           _vs("sse-starlette", 1.5, False)),
    Target("streams", "server_us_per_token", "≤ sse-starlette", _vs("sse-starlette", 1, False)),
    Target("streams", "delay_p99_ms", "< 50 ms", _absolute(50, strict=True)),
    Target("streams", "delay_p99_ms", "≤ sse-starlette", _vs("sse-starlette", 1, False)),
    Target("idle", "kib_per_stream", "≤ 16 KiB", _absolute(16, strict=False)),
    Target("short", "requests_per_s", "≥ sse-starlette", _vs("sse-starlette", 1, True)),
    Target("long", "requests_per_s", "≥ 100 messages/s", _at_least(100)),
    Target("long", "lost_tokens", "0", _absolute(0, strict=False)),
    Target("proxy", "ttft_p99_ms", "< 500 ms", _absolute(500, True, "ts-cluster-2"),
           "ts-cluster-2"),
    Target("proxy", "gap_p99_ms", "< 100 ms", _absolute(100, True, "ts-cluster-2"),
           "ts-cluster-2"),
    Target("proxy100", "server_us_per_token", "≤ relay", _vs("relay", 1, False)),
    *(Target(sc, "server_us_per_token", "≤ 1.15x trio-stream (HTTP/1.1)",
             _vs("trio-stream", 1.15, False, h2), h2)
      for sc in ("streams", "proxy100") for h2 in ("ts-h2c", "ts-tls-h2")),
    Target("proxy100", "server_us_per_token", "≤ 1.2x trio-stream (embedded)",
           _vs("trio-stream", 1.2, False, "ts-cluster-1"), "ts-cluster-1"),
    Target("proxy100", "server_us_per_token", "≤ 1.2x trio-stream (embedded)",
           _vs("trio-stream", 1.2, False, "ts-cluster-2"), "ts-cluster-2"),
    Target("short", "requests_per_s", "≥ 0.95x ts-key (limits off)",
           _vs("ts-key", 0.95, True, "ts-limits"), "ts-limits"),
    Target("short", "server_us_per_request", "≤ 1.05x ts-key (limits off)",
           _vs("ts-key", 1.05, False, "ts-limits"), "ts-limits"),
    Target("short", "server_redis_us_per_request", "≤ 1.05x ts-key (limits off)",
           _vs("ts-key", 1.05, False, "ts-limits"), "ts-limits"),
    Target("proxy100", "server_us_per_token", "≤ 1.05x ts-key (limits off)",
           _vs("ts-key", 1.05, False, "ts-limits"), "ts-limits"),
    Target("proxy100", "server_redis_us_per_token", "≤ 1.05x ts-key (limits off)",
           _vs("ts-key", 1.05, False, "ts-limits"), "ts-limits"),
    Target("members", "server_us_per_token", "≤ 1.05x trio-stream (one upstream)",
           _vs("trio-stream", 1.05, False, "ts-3up"), "ts-3up"),
    Target("members", "server_us_per_token", "≤ 1.05x trio-stream (one upstream)",
           _vs("trio-stream", 1.05, False, "ts-3same"), "ts-3same"),
    Target("members", "ttft_p99_ms", "≤ 2x ts-3up (all three healthy)",
           _vs("ts-3up", 2, False, "ts-3up-1dead"), "ts-3up-1dead"),
)  # fmt: skip


# --- the client ---------------------------------------------------------------------------


class ClientFailed(Exception):
    pass


@dataclass(frozen=True)
class LoadClient:
    """``trio-stream load`` as a subprocess: the same client process for every server."""

    name: str
    base: tuple[str, ...]

    def command(self, url: str, sc: Scenario, out: Path, extra: Sequence[str] = ()) -> list[str]:
        return [*self.base, "--url", url, "--concurrency", str(sc.concurrency),
                "--requests", str(sc.requests), "--scenario", "steady",
                "--max-tokens", str(sc.max_tokens), "--json", str(out), "--quiet",
                "--api-key", BENCH_KEY, *extra]  # fmt: skip

    def run(
        self, url: str, sc: Scenario, out: Path, log: Path, timeout: float,
        extra: Sequence[str] = (),
    ) -> dict[str, Any]:  # fmt: skip
        with log.open("ab") as err:
            popen = subprocess.Popen(
                self.command(url, sc, out, extra), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True, cwd=ROOT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while not _exited(popen.pid):
                if time.monotonic() > deadline:
                    raise ClientFailed(f"client still running after {timeout:.0f} s")
                time.sleep(0.05)
        finally:
            kill_group(popen, grace=1.0)
        code = popen.returncode
        if code != 0 or not out.exists():
            raise ClientFailed(f"client exited {code}; see {log}")
        report: dict[str, Any] = json.loads(out.read_text())
        return report


def load_client() -> LoadClient:
    """``trio-stream load`` next to this Python, checked for the options the bench uses."""
    exe = Path(sys.executable).with_name("trio-stream")
    client = LoadClient("trio-stream load", (str(exe), "load"))
    helptext = subprocess.run(
        [*client.base, "--help"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    missing = [
        o for o in ("--concurrency", "--requests", "--max-tokens", "--json") if o not in helptext
    ]
    if missing:
        raise SystemExit(f"{exe} load lacks {', '.join(missing)}: is the load generator built?")
    return client


# --- measurements -------------------------------------------------------------------------

Figures = dict[str, float]


@dataclass
class Result:
    """One measurement: one server, one scenario, one round."""

    server: str
    scenario: str
    figures: Figures = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def request_bytes(port: int, max_tokens: int) -> bytes:
    body = json.dumps(
        {"model": "mock", "messages": MESSAGES, "stream": True, "max_tokens": max_tokens}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    ) % (port, len(body), body)


def warm_up(port: int, tls: bool = False) -> None:
    """One short stream, read to the end, so lazy imports are not measured."""
    body = json.dumps({"model": "mock", "messages": MESSAGES, "stream": True, "max_tokens": 5})
    conn: http.client.HTTPConnection
    if tls:  # the bench's own throwaway certificate (tls_files): nothing to verify
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"content-type": "application/json", "authorization": f"Bearer {BENCH_KEY}"}
        conn.request("POST", "/v1/chat/completions", body, headers)
        conn.getresponse().read()
    finally:
        conn.close()


def warm_up_all(port: int, connections: int, tls: bool = False) -> None:
    """:func:`warm_up` on ``connections`` connections at once: every worker gets one."""
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        list(pool.map(lambda _: warm_up(port, tls), range(connections)))


def load_figures(
    report: dict[str, Any], cpu_s: float, sc: Scenario, helpers_s: dict[str, float]
) -> tuple[Figures, list[str]]:
    wall = float(report["wall_s"])
    req, integrity = report["requests"], report.get("integrity", {})
    tokens, events = float(report["tokens"]), float(report["events"])
    figures: Figures = {
        "tokens_per_s": float(report["tokens_per_s"]),
        "events_per_s": float(report["events_per_s"]),
        "requests_per_s": req["ok"] / wall,
        "server_cpu_per_s": cpu_s / wall,
        "server_us_per_token": cpu_s / tokens * 1e6 if tokens else float("nan"),
        "server_us_per_event": cpu_s / events * 1e6 if events else float("nan"),
        "server_us_per_request": cpu_s / req["ok"] * 1e6 if req["ok"] else float("nan"),
        "events_per_token": events / tokens if tokens else float("nan"),
        "gap_p99_ms": float(report["gap_ms"]["p99"]),
        "ttft_p99_ms": float(report["ttft_ms"]["p99"]),
        "client_cpu_percent": float(report["client"]["cpu_percent"]),
    }
    upstream_s = [v for k, v in helpers_s.items() if k.startswith("upstream")]
    if upstream_s:  # of one core, the busiest fake upstream
        figures["upstream_cpu_percent"] = 100 * max(upstream_s) / wall
    if "redis" in helpers_s and tokens:
        figures["redis_us_per_token"] = helpers_s["redis"] / tokens * 1e6
    if sc.upstream and tokens:
        figures["server_redis_us_per_token"] = (cpu_s + helpers_s.get("redis", 0)) / tokens * 1e6
    if req["ok"]:
        with_redis = cpu_s + helpers_s.get("redis", 0)
        figures["server_redis_us_per_request"] = with_redis / req["ok"] * 1e6
    busy = cpu_s + float(report["client"]["cpu_s"]) + sum(helpers_s.values())
    figures["busy_percent"] = 100 * busy / wall / (os.cpu_count() or 1)
    if sc.delay_ms:
        figures["delay_p99_ms"] = figures["gap_p99_ms"] - sc.delay_ms
    notes = []
    if req.get("failed") or req.get("cancelled") or req["ok"] != sc.requests:
        notes.append(f"{req['ok']}/{sc.requests} ok, {req.get('failed', 0)} failed")
    failed_tokens = (sc.requests - req["ok"]) * sc.max_tokens
    figures["lost_tokens"] = float(integrity.get("lost", 0) + failed_tokens)
    bad = {k: integrity.get(k, 0) for k in ("lost", "duplicated", "reordered")}
    if any(bad.values()):
        notes.append("integrity: " + ", ".join(f"{k} {v}" for k, v in bad.items() if v))
    if report.get("errors"):
        notes.append(f"errors: {report['errors']}")
    return figures, notes


async def _open_idle(port: int, count: int, stack: contextlib.AsyncExitStack) -> None:
    """Open ``count`` streams and wait for each one's response headers."""
    request = request_bytes(port, 10)
    limiter = trio.CapacityLimiter(64)

    async def one() -> None:
        async with limiter:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            stack.push_async_callback(stream.aclose)
            await stream.send_all(request)
            seen = b""
            while b"\r\n\r\n" not in seen:
                data = await stream.receive_some(65536)
                if not data:
                    raise ClientFailed("server closed an idle stream")
                seen += data

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)


async def _idle_figures(proc: ServerProcess, sc: Scenario) -> Figures:
    warm = 20
    async with contextlib.AsyncExitStack() as stack:
        await _open_idle(proc.port, warm, stack)
        await trio.sleep(1.0)  # real time: let the server finish its per-stream setup
        before = proc.rss_bytes()
        await _open_idle(proc.port, sc.idle_streams, stack)
        await trio.sleep(1.0)
        after = proc.rss_bytes()
    return {"kib_per_stream": (after - before) / sc.idle_streams / 1024}


def run_trio(fn: Callable[..., Awaitable[Figures]], *args: Any) -> Figures:
    """``trio.run(fn, *args)``; SIGTERM/SIGHUP cancel it cleanly, then exit (trio owns SIGINT)."""
    caught: list[int] = []
    figures: Figures = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                    async for signum in signals:
                        caught.append(signum)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            figures.update(await fn(*args))
            nursery.cancel_scope.cancel()

    trio.run(main)
    if caught:
        raise SystemExit(128 + caught[0])
    return figures


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (``/proc/stat``, all CPUs, steal included)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass(frozen=True)
class CpuSnapshot:
    """Clocks to tell the server's CPU, and CPU nobody in this bench used, over a load run."""

    at: float
    server: float
    machine: float
    children: float  # reaped children: the client once it has exited
    own: float
    helpers: dict[str, float] = field(default_factory=dict)  # fake upstream, Redis

    @classmethod
    def take(cls, proc: ServerProcess, helpers: dict[str, ServerProcess]) -> CpuSnapshot:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(time.monotonic(), proc.cpu_seconds(), machine_busy_seconds(),
                   kids.ru_utime + kids.ru_stime, time.process_time(),
                   {k: h.cpu_seconds() for k, h in helpers.items()})  # fmt: skip

    def helpers_since(self, earlier: CpuSnapshot) -> dict[str, float]:
        return {k: v - earlier.helpers[k] for k, v in self.helpers.items()}

    def other_percent(self, later: CpuSnapshot) -> float:
        """Machine CPU used by processes other than server, client and bench, in %."""
        ours = (later.server - self.server) + (later.children - self.children)
        ours += sum(later.helpers_since(self).values())
        foreign = later.machine - self.machine - ours - (later.own - self.own)
        return max(0.0, 100 * foreign / ((later.at - self.at) * (os.cpu_count() or 1)))


def wait_quiet(limit: float, busy_percent: float = NOISY_PERCENT) -> None:
    """Wait (at most ``limit`` s) for a second in which the machine is mostly idle."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        t0, b0 = time.monotonic(), machine_busy_seconds()
        time.sleep(1.0)
        busy = (machine_busy_seconds() - b0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
        if 100 * busy < busy_percent:
            return


def measure(server: Server, sc: Scenario, client: LoadClient, work: Path, tag: str) -> Result:
    """Start ``server`` (and its fake upstream and Redis) for ``sc``, measure it once,
    stop them all (always)."""
    result = Result(server.name, sc.key)
    helpers: dict[str, ServerProcess] = {}
    proc: ServerProcess | None = None
    try:
        run = Run(free_port(), sc.delay_ms, sc.coalesce, sc.idle, work)
        if sc.upstream:
            urls = []
            for i in range(sc.upstreams):
                up = free_port()
                helpers["upstream" + (str(i + 1) if i else "")] = ServerProcess(
                    _fake_upstream_cmd(up, sc.delay_ms), up, work / f"{tag}.upstream{i}.log"
                )
                urls.append(f"http://127.0.0.1:{up}/v1")
            run = dataclasses.replace(run, upstream_url=urls[0], upstream_urls=tuple(urls))
        if server.redis:
            rport = free_port()
            helpers["redis"] = ServerProcess(
                _redis_cmd(rport, work), rport, work / f"{tag}.redis.log"
            )
            run = dataclasses.replace(run, redis_url=f"redis://127.0.0.1:{rport}/0")
        if server.otlp:
            cport = free_port()
            helpers["collector"] = ServerProcess(
                [sys.executable, str(ROOT / "tools" / "otlp_sink.py"), "--port", str(cport)],
                cport, work / f"{tag}.collector.log",
            )  # fmt: skip
            run = dataclasses.replace(run, otlp_url=f"http://127.0.0.1:{cport}")
        for helper in helpers.values():
            helper.wait_ready()
        if server.prepare is not None:
            server.prepare(run)
        if server.tls:
            make_tls_files(work)
        os.environ["COUNT_IO_OUT"] = str(work / f"{tag}.io.jsonl")  # for --count-io
        proc = ServerProcess(server.command(run), run.port, work / f"{tag}.server.log")
        proc.wait_ready()
        if sc.idle:
            result.figures = run_trio(_idle_figures, proc, sc)
            return result
        warm_up_all(run.port, 4, server.tls)
        counted = COUNT_IO and server.command(run)[1:2] == [str(ROOT / "tools" / "count_io.py")]
        if counted:
            os.kill(proc.popen.pid, signal.SIGUSR2)
        before = CpuSnapshot.take(proc, helpers)
        with _profiling(proc, work, tag):
            report = client.run(
                server.url(run.port), sc, work / f"{tag}.json",
                work / f"{tag}.client.log", timeout=300, extra=server.client_args,
            )  # fmt: skip
        after = CpuSnapshot.take(proc, helpers)
        result.figures, result.notes = load_figures(
            report, after.server - before.server, sc, after.helpers_since(before)
        )
        result.figures["other_cpu_percent"] = before.other_percent(after)
        if counted:
            os.kill(proc.popen.pid, signal.SIGUSR2)
            result.figures.update(io_figures(work / f"{tag}.io.jsonl", float(report["tokens"])))
    except (ClientFailed, RuntimeError, OSError, trio.TooSlowError, KeyError, ValueError) as exc:
        result.notes.append(f"failed: {exc}")
    finally:
        if proc is not None:
            proc.stop()
        for helper in reversed(helpers.values()):
            helper.stop()
    return result


@contextlib.contextmanager
def _profiling(proc: ServerProcess, work: Path, tag: str) -> Iterator[None]:
    """With ``--profile DIR``: py-spy samples the server (not pausing it) while
    the load runs, and writes collapsed stacks to ``DIR/<tag>.txt``."""
    if PROFILE_DIR is None:
        yield
        return
    spy = Path(sys.executable).with_name("py-spy")
    with (work / f"{tag}.py-spy.log").open("ab") as log:
        popen = subprocess.Popen(
            [str(spy), "record", "--nonblocking", "--rate", "200", "--format", "raw",
             "--output", str(PROFILE_DIR / f"{tag}.txt"), "--pid", str(proc.popen.pid)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    try:
        yield
    finally:
        popen.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            popen.wait(timeout=30)
        finally:
            kill_group(popen, grace=1.0)


def io_figures(path: Path, tokens: float) -> Figures:
    """The figures of ``--count-io``: the differences between the two lines the
    server wrote (before and after the load) to ``path``."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= 2:
            break
        time.sleep(0.05)
    else:
        raise RuntimeError(f"no counters in {path}")
    a, b = (json.loads(line) for line in lines[:2])
    d = {k: b.get(k, 0) - a.get(k, 0) for k in b}
    return {
        "wakeups_per_token": d["wakeups"] / tokens,
        "events_per_wakeup": d["events"] / max(1, d["wakeups"]),
        "tokens_per_read": tokens / max(1, d["upstream_reads"]),
        "bytes_per_read": d["upstream_bytes"] / max(1, d["upstream_reads"]),
    }


# --- orchestration ------------------------------------------------------------------------


def rotated(servers: Sequence[Server], k: int) -> list[Server]:
    if not servers:
        return []
    k %= len(servers)
    return [*servers[k:], *servers[:k]]


def measure_once_quiet(
    server: Server, sc: Scenario, client: LoadClient, work: Path, tag: str, quiet_wait: float
) -> Result:
    """:func:`measure`; again once if other processes took over ``RETRY_PERCENT`` of the CPU."""
    if quiet_wait:
        wait_quiet(quiet_wait)
    result = measure(server, sc, client, work, tag)
    if result.figures.get("other_cpu_percent", 0.0) > RETRY_PERCENT:
        if quiet_wait:
            wait_quiet(quiet_wait)
        result = measure(server, sc, client, work, tag + "-again")
        result.notes.append("re-measured once (other load)")
    return result


def run_rounds(
    servers: Sequence[Server], scs: Sequence[Scenario], rounds: int, client: LoadClient,
    work: Path, quiet_wait: float, results: list[Result],
) -> None:  # fmt: skip
    """Append one :class:`Result` per (round, scenario, server) to ``results``."""
    for r in range(rounds):
        for sc in scs:
            for server in rotated([s for s in servers if s.serves(sc)], r):
                tag = f"r{r + 1}-{sc.key}-{server.name}"
                result = measure_once_quiet(server, sc, client, work, tag, quiet_wait)
                results.append(result)
                value = result.figures.get(sc.metric)
                shown = "-" if value is None else f"{fmt(value, sc.metric)} {label(sc.metric)}"
                note = f"  ({'; '.join(result.notes)})" if result.notes else ""
                print(f"[round {r + 1}/{rounds}] {sc.key:8} {server.name:14} {shown}{note}",
                      file=sys.stderr, flush=True)  # fmt: skip


@dataclass
class Summary:
    """Median, min and max over rounds of each (scenario, server, figure)."""

    values: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    notes: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, results: Sequence[Result]) -> Summary:
        s = cls()
        for res in results:
            for name, v in res.figures.items():
                if v == v:  # not NaN
                    s.values.setdefault((res.scenario, res.server, name), []).append(v)
            if res.notes:
                s.notes.setdefault((res.scenario, res.server), []).extend(res.notes)
        return s

    def median(self, sc: str, server: str, metric: str) -> float | None:
        vals = self.values.get((sc, server, metric))
        return statistics.median(vals) if vals else None

    def medians(self, sc: str, metric: str, servers: Sequence[Server]) -> Medians:
        out = {}
        for server in servers:
            m = self.median(sc, server.name, metric)
            if m is not None:
                out[server.name] = m
        return out

    def spread(self, sc: str, server: str, metric: str) -> tuple[float, float] | None:
        vals = self.values.get((sc, server, metric))
        return (min(vals), max(vals)) if vals else None

    def noise(self) -> str:
        """How busy the machine was with other work during the load runs."""
        vals = [v for (_, _, m), vs in self.values.items() if m == "other_cpu_percent" for v in vs]
        if not vals:
            return ""
        median, worst = statistics.median(vals), max(vals)
        line = (f"Other processes used a median {median:.1f}% (at worst {worst:.1f}%) of the "
                "machine's CPU during the load runs.")  # fmt: skip
        if median > NOISY_PERCENT:
            line += (" **Warning: the machine was busy with other work; these figures are not "
                     "representative. Rerun on a quiet machine.**")  # fmt: skip
        return line


# --- the report ---------------------------------------------------------------------------

PACKAGES = (
    "trio-stream", "trio", "hypercorn", "quart", "quart-trio", "uvicorn", "starlette",
    "sse-starlette", "h11", "orjson", "anyio", "uvloop", "httptools", "matplotlib",
)  # fmt: skip


def machine_facts() -> list[tuple[str, str]]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor() or "?",
    )  # fmt: skip
    versions = []
    for pkg in PACKAGES:
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    return [
        ("CPUs (nproc)", str(os.cpu_count())),
        ("CPU", cpu),
        ("OS", platform.platform()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("Packages", ", ".join(versions)),
    ]


def revision() -> str:
    """``git describe`` of the tree measured, marked when it had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "log", "-1", "--format=%h %s"], cwd=ROOT, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "trio_stream"], cwd=ROOT,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}" + (" (with uncommitted changes in trio_stream/)" if dirty else "")


def fmt(v: float | None, metric: str = "") -> str:
    if v is None:
        return "-"
    if metric.endswith("_ms") or metric in ("kib_per_stream", "server_cpu_per_s", *IO_METRICS):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"


def ratio_rows(summary: Summary, scs: Sequence[Scenario], servers: Sequence[Server]) -> list[str]:
    """``trio-stream / peer`` of each scenario's headline and ratio figures (medians)."""
    rows = []
    for sc in scs:
        for metric in (sc.metric, *sc.ratios):
            ours = summary.median(sc.key, "trio-stream", metric)
            better = "higher is better" if METRICS[metric][1] else "lower is better"
            for peer in servers:
                if not peer.serves(sc):
                    continue
                theirs = summary.median(sc.key, peer.name, metric)
                if peer.name == "trio-stream" or ours is None or not theirs:
                    continue
                rows.append(
                    f"{sc.key}: trio-stream / {peer.name} = {ours / theirs:.2f}x "
                    f"({label(metric)}, {better})"
                )
    return rows


def target_rows(summary: Summary, servers: Sequence[Server]) -> list[tuple[str, str, str, str]]:
    rows = []
    for t in TARGETS:
        m = summary.medians(t.scenario, t.metric, servers)
        met = t.check(m)
        verdict = "not measured" if met is None else ("met" if met else "**missed**")
        who = "" if t.server == "trio-stream" else f"{t.server}: "
        rows.append((t.scenario, label(t.metric), t.text,
                     f"{who}{fmt(m.get(t.server), t.metric)} — {verdict}"))  # fmt: skip
    return rows


def shell(cmd: Sequence[str]) -> str:
    """A command as the reader would type it, paths relative to the repository."""
    return " ".join(shlex.quote(os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a)
                    for a in cmd)  # fmt: skip


def write_markdown(
    path: Path, png: Path, summary: Summary, scs: Sequence[Scenario], servers: Sequence[Server],
    meta: dict[str, str],
) -> None:  # fmt: skip
    out = ["# Benchmarks", "",
           "Generated by `tools/bench.py`; do not edit by hand. Produced by:", "",
           f"    {meta['command']}", "",
           f"{meta['when']}, {meta['rounds']} interleaved round(s), took {meta['took']}. "
           f"Client: {meta['client']}. Load average at start: {meta['loadavg']}.", "",
           f"trio-stream revision: {meta['revision']}.", "",
           summary.noise(), "", "## Machine", ""]  # fmt: skip
    out += [f"- **{k}**: {v}" for k, v in machine_facts()]
    out += ["", "## Servers", "", "| name | what | command |", "|---|---|---|"]
    sample = Run(8000, 0, True, False, Path("<tmp>"), redis_url="redis://127.0.0.1:6379/0")
    proxied = dataclasses.replace(sample, delay_ms=50, upstream_url="http://127.0.0.1:9000/v1",
                                  redis_url="redis://127.0.0.1:6379/0",
                                  otlp_url="http://127.0.0.1:4318")  # fmt: skip
    for s in servers:
        cmds = ([shell(s.command(sample))] if s.mock else []) + (
            [shell(s.command(proxied))] if s.proxy or s.prepare else [])  # fmt: skip
        if s.client_args:
            cmds.append("client: `trio-stream load --url " + s.url(8000) + " "
                        + " ".join(s.client_args) + " ...`")  # fmt: skip
        out.append(f"| {s.name} | {s.label} | " + "<br>".join(
            c if c.startswith("client:") else f"`{c}`" for c in cmds) + " |")  # fmt: skip
    if any(s.proxy for s in servers):
        out.append(f"| (upstream) | the proxy scenarios' fake OpenAI server, one per measurement "
                   f"| `{shell(_fake_upstream_cmd(9000, 50))}` |")  # fmt: skip
    if any(s.redis for s in servers):
        out.append(f"| (Redis) | one per cluster measurement | "
                   f"`{shell(_redis_cmd(6379, Path('<tmp>')))}` |")  # fmt: skip
    method = [*METHOD, *([COUNT_IO_METHOD] if COUNT_IO else [])]
    out += ["", "## Method", "", *method, "", "## Targets", "",
            "| scenario | figure | target | measured (median) |",
            "|---|---|---|---|"]  # fmt: skip
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in target_rows(summary, servers)]
    out += ["", "## Ratios (trio-stream ÷ peer, medians)", ""]
    out += [f"- {row}" for row in ratio_rows(summary, scs, servers)]
    out += ["", f"![benchmark plot]({png.name})", ""]
    for sc in scs:
        out += scenario_table(summary, sc, servers)
    path.write_text("\n".join(out))


METHOD = [
    "- Every measurement starts a fresh server process on 127.0.0.1 and stops it after; "
    "in each round every scenario runs once on every server, and the server order rotates "
    "by one each round. Figures are medians over rounds (min-max of the headline figure in "
    "brackets).",
    "- All servers stream the same mock reply (`trio_stream.upstream.mocktext`): one event "
    "per token, a finish chunk, `[DONE]`; a delay of 0 means one checkpoint per token, "
    "and a delay is paced by one shared timer in trio-stream and the trio peers (the mock's "
    "`Ticker`), by `asyncio.sleep` in sse-starlette. The peers write "
    "each event with its own send. trio-stream merges queued tokens into one event when its "
    "writer falls behind (coalescing, on by default); with `--no-coalesce` it still sends "
    "every event on its own `id:`, but writes the events already queued in one send.",
    "- The client (`trio-stream load`, one process) is the same for every server. It costs "
    "about 60-110 µs of CPU per read, so against a server that writes one event per send it "
    "saturates its CPU (see *client CPU %*) before the server does: the peers' tokens/s and "
    "events/s are then client-bound. *Server CPU per token / event / request* (utime+stime "
    "from `/proc/<pid>/stat` over the client run) does not depend on the client, and is the "
    "fairer comparison of the servers themselves. *server+client % of machine* near 100 "
    "means the 2-CPU machine itself was the limit.",
    "- *1,000 streams*: the headline is server CPU per token delivered (the same offered "
    "load for every server; CPU s per s is shown too, but every server here is near one full "
    "CPU, so it no longer tells them apart). *p99 delivery delay* is the client's p99 gap "
    "between consecutive events of a stream minus the mock's 50 ms token gap: a proxy for "
    "how late a token reaches the client.",
    "- *Memory per idle stream*: open 20 streams whose first token is 60 s away, read RSS "
    "(`VmRSS`), open N more, wait for every response's headers and 1 s more, read RSS again: "
    "(after - before) / N. trio-stream sends headers with its first event or ping, so it runs "
    "with `--ping-interval 1` here.",
    "- sse-starlette's uvicorn runs on asyncio and h11 (pinned in the peer script); the relay "
    "peer's on uvloop and httptools. *other load %* is the machine's CPU used by processes "
    "outside this bench during a run (the fake upstream and Redis count as the bench's).",
    "- *Proxy* scenarios: the server relays `tools/fake_openai.py`, a fake OpenAI server in its "
    "own process (asyncio protocol on uvloop, one write per token from a loop timer, "
    "the mock's bytes), which streams each reply at 20 tokens/s (50 ms per token, on an "
    "absolute schedule from the request). The client starts all streams at once (concurrency "
    "= streams) and starts a new one as each ends; TTFT is from the client's send to the first "
    "token, so it includes the connection burst. Server CPU is the whole process tree's "
    "(`--workers 2`: supervisor and workers); each cluster measurement gets a fresh "
    "`redis-server`, whose CPU is given on its own (*Redis CPU µs/token*) and added in "
    "*server+Redis*. *fake upstream CPU %* is of one core: it shows the upstream is not the "
    "limit. *ts-cluster-1/2*, *relay* serve only the proxy scenarios; *ts-interval50* "
    "(`--event-interval-ms 50`) serves only *paced*, beside *trio-stream* (interval 0).",
    "- *members*: three fake upstreams run for every server; *trio-stream* relays the first "
    "(`--upstream-url`), *ts-3up* all three as one group of a `--config` file (balanced by "
    "streams in flight), *ts-3same* three members that are all the first fake (the "
    "routing over three members, with the tokens arriving as from one upstream process), "
    "*ts-3up-1dead* the first two and, as its third member, a port "
    "nothing listens on (its server died): requests sent there are refused and fail over, "
    "and the member cools down (1 s, doubling) between tries. *fake upstream CPU %* is the "
    "busiest fake's.",
    "- *Long messages* (the seed's test): 1,000 messages of 1,000 tokens, 16 at once, the "
    "mock unthrottled (`trio-stream load -c 16 -n 1000 --max-tokens 1000`); served only by "
    "*trio-stream* and *bare-trio* (the ceiling). *tokens lost* adds the tokens of any "
    "failed request to those the client found missing: 0 means every message arrived whole.",
]


COUNT_IO_METHOD = (
    "- `--count-io`: trio-stream ran under `tools/count_io.py`, which counts in the server "
    "process its event loop's polls that waited and came back with ready sockets (*loop "
    "wake-ups/token*, *ready fds/wake-up*) and its reads of upstream sockets (*tokens/upstream "
    "read*, *bytes/upstream read*), between the start and the end of the load. The counting "
    "costs a little CPU of its own: compare these rows with each other only."
)


def scenario_table(summary: Summary, sc: Scenario, servers: Sequence[Server]) -> list[str]:
    counted = tuple(
        m
        for m in IO_METRICS  # only with --count-io
        if any(summary.median(sc.key, s.name, m) is not None for s in servers)
    )
    metrics = (sc.metric, *sc.extra, *counted)
    out = [f"## {sc.title}", "",
           f"Server delay {sc.delay_ms:g} ms, coalescing {'on' if sc.coalesce else 'off'}; "
           + (f"{sc.idle_streams} idle streams." if sc.idle else
              f"{sc.requests} requests of {sc.max_tokens} tokens, concurrency {sc.concurrency}."),
           "", "| server | " + " | ".join(label(m) for m in metrics) + " | notes |",
           "|---|" + "---:|" * len(metrics) + "---|"]  # fmt: skip
    for s in servers:
        if not s.serves(sc):
            continue
        cells = []
        for m in metrics:
            med, spread = summary.median(sc.key, s.name, m), summary.spread(sc.key, s.name, m)
            cell = fmt(med, m)
            if spread and spread[0] != spread[1] and m == sc.metric:
                cell += f" ({fmt(spread[0], m)}-{fmt(spread[1], m)})"
            cells.append(cell)
        notes = "; ".join(dict.fromkeys(summary.notes.get((sc.key, s.name), [])))
        out.append(f"| {s.name} | " + " | ".join(cells) + f" | {notes} |")
    saturated = [
        s.name
        for s in servers
        if s.serves(sc)
        and (summary.median(sc.key, s.name, "busy_percent") or 0) >= SATURATED_PERCENT
    ]
    if saturated:
        out += [
            "",
            f"Server and client together kept the machine's CPUs {SATURATED_PERCENT:g}% "
            f"or more busy with: {', '.join(saturated)}. Those rows measure an overloaded "
            "machine shared by server and client, not the server alone: compare server "
            "CPU per token, event or request instead.",
        ]
    return [*out, ""]


def plot(path: Path, summary: Summary, scs: Sequence[Scenario], servers: Sequence[Server]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(sc, sc.metric) for sc in scs]
    panels += [(sc, "delay_p99_ms") for sc in scs if sc.key == "streams"]
    panels += [(sc, "gap_p99_ms") for sc in scs if sc.key == "proxy"]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#7f7f7f", "#ff7f0e", "#9467bd", "#8c564b"]
    for ax, (sc, metric) in zip(axes.flat, panels, strict=False):
        names, meds, lo, hi = [], [], [], []
        for s in servers:
            if not s.serves(sc):
                continue
            med, spread = (
                summary.median(sc.key, s.name, metric),
                summary.spread(sc.key, s.name, metric),
            )
            if med is None or spread is None:
                continue
            names.append(s.name)
            meds.append(med)
            lo.append(med - spread[0])
            hi.append(spread[1] - med)
        order = [s.name for s in servers]
        bars = ax.bar(names, meds, yerr=[lo, hi], capsize=4,
                      color=[colors[order.index(n) % len(colors)] for n in names])  # fmt: skip
        ax.bar_label(bars, labels=[fmt(v, metric) for v in meds], fontsize=8)
        better = "higher" if METRICS[metric][1] else "lower"
        ax.set_title(f"{sc.key}: {label(metric)}\n({better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command line ---------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round, small sizes (smoke run)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path,
                        help="markdown to write (default docs/benchmarks.md; with --quick, "
                             "a file in the temp dir); the PNG goes next to it")  # fmt: skip
    parser.add_argument("--servers", help="comma-separated subset of: "
                        + ", ".join(s.name for s in SERVERS))  # fmt: skip
    parser.add_argument(
        "--scenarios",
        help="comma-separated subset of: tokens, events, streams, idle, short, long, proxy, "
        "proxy100, members, paced",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=0, metavar="S",
        help="before each measurement, wait up to S seconds for the machine to be idle",
    )  # fmt: skip
    parser.add_argument(
        "--count-io", action="store_true",
        help="run trio-stream under tools/count_io.py: loop wake-ups per token, ready fds "
        "per wake-up, tokens and bytes per upstream read (a small cost of its own)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="py-spy samples each server during its load: collapsed stacks in DIR",
    )  # fmt: skip
    parser.add_argument(
        "--keep-logs", action="store_true",
        help="keep server/client logs and JSON (kept anyway when a measurement failed)",
    )  # fmt: skip
    return parser.parse_args(argv)


def select(items: Sequence[Any], names: str | None) -> list[Any]:
    if not names:
        return list(items)
    wanted = [n.strip() for n in names.split(",")]
    known = {getattr(i, "name", None) or i.key: i for i in items}
    missing = [n for n in wanted if n not in known]
    if missing:
        raise SystemExit(f"unknown: {', '.join(missing)}")
    return [known[n] for n in wanted]


def command_line(argv: Sequence[str]) -> str:
    exe = sys.executable
    with contextlib.suppress(ValueError):
        exe = str(Path(exe).relative_to(ROOT))
    return " ".join(shlex.quote(a) for a in [exe, "tools/bench.py", *argv])


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every ``finally``: servers get stopped


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    args = parse_args(argv)
    global COUNT_IO, PROFILE_DIR
    COUNT_IO = args.count_io
    if args.profile:
        PROFILE_DIR = args.profile.resolve()
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    servers = select(SERVERS, args.servers)
    scs = select(scenarios(args.quick), args.scenarios)
    rounds = args.rounds or (1 if args.quick else 3)
    out = args.out or (Path(tempfile.gettempdir()) / "trio-stream-bench" / "benchmarks.md"
                       if args.quick else ROOT / "docs" / "benchmarks.md")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    client = load_client()
    loadavg = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"client: {client.name}; load average {loadavg}", file=sys.stderr)
    started, rev = time.monotonic(), revision()
    work = Path(tempfile.mkdtemp(prefix="trio-stream-bench-"))
    results: list[Result] = []
    try:
        run_rounds(servers, scs, rounds, client, work, args.quiet_wait, results)
    finally:
        failed = any(not n.startswith("re-measured") for r in results for n in r.notes)
        if args.keep_logs or failed:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            for f in work.iterdir():
                f.unlink()
            work.rmdir()
    summary = Summary.of(results)
    took = time.monotonic() - started
    meta = {
        "command": command_line(argv),
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "rounds": str(rounds),
        "took": f"{took / 60:.1f} min",
        "client": client.name,
        "loadavg": loadavg,
        "revision": rev
        if rev == (end := revision())
        else f"{rev}, then {end} (changed during the run)",
    }
    png = out.with_suffix(".png")
    plot(png, summary, scs, servers)
    write_markdown(out, png, summary, scs, servers, meta)
    print_summary(summary, scs, servers)
    print(f"\nwrote {out} and {png}")


def print_summary(summary: Summary, scs: Sequence[Scenario], servers: Sequence[Server]) -> None:
    for sc in scs:
        print(f"\n{sc.title}")
        for s in servers:
            if not s.serves(sc):
                continue
            line = ", ".join(f"{label(m)} {fmt(summary.median(sc.key, s.name, m), m)}"
                             for m in (sc.metric, *sc.extra))  # fmt: skip
            print(f"  {s.name:14} {line}")
    print("\nratios:")
    for row in ratio_rows(summary, scs, servers):
        print(f"  {row}")
    if noise := summary.noise():
        print("\n" + noise.replace("**", ""))
    print("\ntargets:")
    for a, b, c, d in target_rows(summary, servers):
        print(f"  {a:8} {b} {c}: {d.replace('**', '')}")


if __name__ == "__main__":
    main()
