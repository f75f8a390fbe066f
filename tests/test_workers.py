"""``--workers N``: one port, N worker processes, restarts and a bounded drain."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import httpx
import orjson
import trio

from tests.conftest import ServeProcess, serve_process
from tests.redis_server import RedisServer
from trio_stream.server.workers import KILL_MARGIN

BODY = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def worker_pids(server: ServeProcess) -> list[int]:
    return [int(line.split("pid=")[1].split()[0]) for line in server.lines
            if line.startswith(("worker_started", "worker_restarted"))]  # fmt: skip


async def chat(port: int, session: str) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.post("/v1/chat/completions", json=BODY, headers={"x-session-id": session})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_more_than_one_worker_needs_redis() -> None:
    """Rule 4: --workers 2 without --redis refuses to start, with a clear
    message and exit code 2, before binding anything."""
    result = subprocess.run(
        [sys.executable, "-m", "trio_stream", "serve", "--workers", "2", "--port", "0"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--workers 2 needs --redis" in result.stderr


async def test_workers_share_a_port_restart_and_drain(redis_server: RedisServer) -> None:
    """Rules 1-3: two workers answer on one port; a worker killed with
    SIGKILL is restarted and the port keeps answering; SIGTERM to the
    supervisor drains every worker and it exits 0 within
    --graceful-timeout + 2 s."""
    args = ["--workers", "2", "--redis", redis_server.url, "--port", "0", "--db", ":memory:",
            "--mock-delay-ms", "1", "--graceful-timeout", "1"]  # fmt: skip
    with trio.fail_after(60):
        async with serve_process(*args) as server:
            while len(worker_pids(server)) < 2:
                await server.wait_for_line(lambda line: line.startswith("worker_started"))
            assert [await chat(server.port, f"s{i}") for i in range(6)]
            victim = worker_pids(server)[0]
            os.kill(victim, signal.SIGKILL)
            await server.wait_for_line(lambda line: line.startswith("worker_restarted"))
            for i in range(6):
                await chat(server.port, f"after{i}")
            started = trio.current_time()
            server.process.send_signal(signal.SIGTERM)
            assert await server.wait_exit() == 0
            assert trio.current_time() - started < 1 + 2
            assert any(line.startswith("shutdown_complete workers=2") for line in server.lines)
            for pid in worker_pids(server):
                assert not _alive(pid), f"worker {pid} outlived its supervisor"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _orphan_workers(redis_url: str, *, wedge: bool) -> float:
    """Start ``--workers 2 --graceful-timeout 1``, SIGKILL the supervisor (with
    ``wedge``: once both workers are blocked writing to the stderr pipe, which
    this test stops reading after startup), and return how long after the
    kill the last worker was gone.  Every process is killed at the end (the
    workers through pidfds opened while they lived: never a reused pid)."""
    args = [sys.executable, "-m", "trio_stream", "serve", "--workers", "2", "--redis", redis_url,
            "--port", "0", "--db", ":memory:", "--mock-delay-ms", "0",
            "--graceful-timeout", "1", "--log-format", "json"]  # fmt: skip
    process = await trio.lowlevel.open_process(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    pidfds: list[int] = []
    try:
        text, listening = b"", 0
        with trio.fail_after(30):
            while listening < 2:
                chunk = await process.stderr.receive_some()
                assert chunk, text
                text += chunk
                listening = text.count(b'"event":"listening"')
        records = [orjson.loads(line) for line in text.splitlines() if line.startswith(b"{")]
        pids = [r["pid"] for r in records if r["event"] == "worker_started"]
        port = next(r["port"] for r in records if r["event"] == "listening")
        assert len(pids) == 2, text
        pidfds = [os.pidfd_open(pid) for pid in pids]
        if wedge:  # stop reading; requests log until the pipe is full and the workers block
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=1, limits=limits) as client:
                with trio.fail_after(60):
                    while True:
                        try:
                            await client.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                              json=BODY)  # fmt: skip
                        except httpx.TimeoutException:
                            break
        process.kill()  # the supervisor, by its own pid
        killed = trio.current_time()
        with trio.fail_after(30):
            for fd in pidfds:
                await trio.lowlevel.wait_readable(fd)  # readable once the worker has exited
        return trio.current_time() - killed
    finally:
        for fd in pidfds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        process.kill()
        await process.wait()
        await process.stderr.aclose()


async def test_workers_exit_when_their_supervisor_is_killed(redis_server: RedisServer) -> None:
    """Rule 5: when the supervisor is killed (SIGKILL), its idle workers drain
    and are gone within --graceful-timeout + KILL_MARGIN (1 + 1.5 s) of it."""
    took = await _orphan_workers(redis_server.url, wedge=False)
    assert took < 1 + KILL_MARGIN, took


async def test_wedged_workers_exit_when_their_supervisor_is_killed(
    redis_server: RedisServer,
) -> None:
    """Rule 5, with the workers' event loops wedged: the stderr pipe they
    share is full and nobody reads it (as when whatever read the supervisor's
    output went away with it), so each blocks at its next log line (a
    request's, or its drain's ``shutdown_start``).  They are still gone within
    --graceful-timeout + KILL_MARGIN (+ 1 s of slack) of the supervisor's
    death.  Before, an orphan noticed its supervisor's death from a trio task
    (polling its parent pid), which a wedged loop never runs, and a SIGTERM
    only interrupted the blocked write: it lived until killed by hand."""
    took = await _orphan_workers(redis_server.url, wedge=True)
    assert took < 1 + KILL_MARGIN + 1, took
