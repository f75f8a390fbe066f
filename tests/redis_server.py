"""A real Redis server for the tests, started from the ``redis-server`` binary.

``make services`` installs it (Debian's ``redis-server``).  A missing binary
fails the test that needs it, loudly: cluster mode is never skipped.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BINARY = "redis-server"


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """Stop it at once (SIGKILL, by its own pid), as a crash would."""
        self.process.kill()
        self.process.wait()

    def start(self) -> None:
        """(Re)start it on the same port, empty, and wait until it answers."""
        self.process = _spawn(self.port, self.dir)


@contextlib.contextmanager
def hung_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose TCP connects hang: a listener that never
    accepts, its backlog already filled.  A client's connect to it waits for
    its own deadline (a Redis that is unreachable without refusing)."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepts: once its queue is full, a connect hangs
        port = int(listener.getsockname()[1])
        for _ in range(4):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        yield port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which(BINARY)
    if binary is None:
        pytest.fail(f"{BINARY} is not installed: run `make services` (Debian's redis-server)")
    # DEBUG SLEEP (from 127.0.0.1) stages a Redis that answers late.
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir),
            "--enable-debug-command", "local"]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return process
        except OSError:
            time.sleep(0.02)
    process.kill()
    pytest.fail(f"{BINARY} did not answer on port {port}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the session; tests keep apart by key prefix."""
    workdir = tmp_path_factory.mktemp("redis")
    port = _free_port()
    server = RedisServer(port, _spawn(port, workdir), workdir)
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, for tests that kill and restart it."""
    port = _free_port()
    server = RedisServer(port, _spawn(port, tmp_path), tmp_path)
    yield server
    if server.process.poll() is None:
        server.kill()
