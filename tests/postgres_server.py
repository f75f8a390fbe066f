"""A real Postgres for the tests, started with ``initdb`` and ``pg_ctl``.

``make services`` installs it (Debian's ``postgresql``; the binaries live in
``/usr/lib/postgresql/<version>/bin``).  A missing binary fails the test that
needs it, loudly: the Postgres store is never skipped.

Postgres refuses to run as root: as root the server runs as the ``postgres``
system user (``runuser``), in a temporary directory that user owns.  It
listens on 127.0.0.1 only, on a free port, with ``trust`` authentication and
no Unix socket.  Each test gets a database of its own (:func:`pg_url`).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

_databases = itertools.count()


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path is None:
        pytest.fail("Postgres is not installed: run `make services` (Debian's postgresql)")
    return Path(on_path).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    bindir: Path
    dir: Path  # owned by the user the server runs as
    port: int

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_owner(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def pg_ctl_args(self, *args: str) -> list[str]:
        """The ``pg_ctl`` command line (as the owner) for this server."""
        return self._as_owner(str(self.bindir / "pg_ctl"), "-D", str(self.data), *args)

    def init(self) -> None:
        subprocess.run(
            self._as_owner(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                           "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def start(self) -> None:
        """Start it and wait until it accepts connections."""
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   "-c unix_socket_directories='' -c fsync=off -c max_connections=200")  # fmt: skip
        subprocess.run(
            self.pg_ctl_args("-w", "-t", "30", "-l", str(self.dir / "log"), "-o", options, "start"),
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode``: ``immediate`` is a crash, as far as clients can tell."""
        subprocess.run(self.pg_ctl_args("-w", "-m", mode, "stop"), check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _spawn() -> PostgresServer:
    """initdb + start a new server in a fresh directory."""
    bindir = _bindir()
    if not (bindir / "initdb").exists():
        pytest.fail(f"{bindir}/initdb is missing: run `make services` (Debian's postgresql)")
    workdir = Path(tempfile.mkdtemp(prefix="trio-stream-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
    server = PostgresServer(bindir, workdir, _free_port())
    server.init()
    deadline = time.monotonic() + 30
    while True:  # another process may take the free port between probe and bind
        try:
            server.start()
            return server
        except subprocess.CalledProcessError:
            if time.monotonic() > deadline:
                raise
            server.port = _free_port()


def _teardown(server: PostgresServer) -> None:
    if (server.data / "postmaster.pid").exists():
        server.stop("immediate")
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One Postgres for the session; tests keep apart by database."""
    server = _spawn()
    yield server
    _teardown(server)


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database on the session's Postgres."""
    return postgres_server.new_database()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A Postgres of this test's own, for tests that stop and restart it."""
    server = _spawn()
    yield server
    _teardown(server)
