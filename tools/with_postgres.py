"""Run a command beside a throwaway Postgres: ``{pg_url}`` in its arguments
is replaced by the database's URL.

Creates a cluster (``initdb``) in a temporary directory, starts ``postgres``
in the foreground on a free 127.0.0.1 port (as the ``postgres`` user when run
as root: Postgres refuses root), runs the command, and when the command exits
-- or this process gets SIGTERM/SIGINT, which it passes on -- stops Postgres
and removes the directory.  Exits with the command's status.  Postgres runs
with its defaults (``fsync`` on) unless ``--no-fsync``.

Used by ``tools/bench.py`` (the ``ts-postgres`` server)::

    .venv/bin/python tools/with_postgres.py -- \\
        .venv/bin/trio-stream serve --port 8000 --db '{pg_url}'
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path is None:
        raise SystemExit("Postgres is not installed: run `make services` (Debian's postgresql)")
    return Path(on_path).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_owner(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _wait_listening(port: int, server: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"postgres exited ({server.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"postgres not listening on {port} after {timeout} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-fsync", action="store_true", help="run Postgres with fsync=off")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    bindir = _bindir()
    workdir = Path(tempfile.mkdtemp(prefix="trio-stream-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
    data, port = workdir / "data", _free_port()
    child: subprocess.Popen[bytes] | None = None
    server: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        subprocess.run(
            _as_owner([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                       "-E", "UTF8", "--locale=C"]),
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        options = ["-c", "listen_addresses=127.0.0.1", "-c", f"port={port}",
                   "-c", "unix_socket_directories=", "-c", "max_connections=200"]  # fmt: skip
        if args.no_fsync:
            options += ["-c", "fsync=off"]
        with (workdir / "log").open("ab") as log:
            server = subprocess.Popen(
                _as_owner([str(bindir / "postgres"), "-D", str(data), *options]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_listening(port, server)
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        child = subprocess.Popen([a.replace("{pg_url}", url) for a in command])
        while True:
            try:
                return child.wait()
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # fast shutdown
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
