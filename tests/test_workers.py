"""``--workers N``: one port, N worker processes, restarts and a bounded drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import trio

from tests.conftest import ServeProcess, serve_process
from tests.redis_server import RedisServer

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
