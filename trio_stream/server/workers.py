"""``--workers N``: N worker processes serving one listening socket.

Ownership::

    supervisor (this module, the parent process: no service of its own)
    ├── the listening socket(s), bound once, before any worker starts
    └── N worker processes (multiprocessing, ``spawn``)
        └── each a whole service: serve(settings, sockets=...) with the
            shared state in Redis (cluster mode), so a request may land on
            any worker and every guarantee still holds

Rules:

1. Every worker accepts on the same inherited socket; the kernel spreads the
   connections.  No worker binds a port of its own.
2. A worker that exits while the supervisor is not stopping is restarted at
   once (``worker_restarted``); one that dies within :data:`CRASH_WINDOW` of
   its start waits :data:`CRASH_BACKOFF` first, so a worker that cannot start
   does not spin.
3. SIGTERM or SIGINT to the supervisor is forwarded to every worker, by its
   own pid; each drains as a single server does (``--graceful-timeout``).
   A worker still alive at ``--graceful-timeout`` + :data:`KILL_MARGIN` is
   killed.  The supervisor exits 0.
4. More than one worker needs ``--redis`` (:meth:`Settings.validate` refuses
   to start otherwise): without it, sessions, stop and resume would each
   live in one worker's memory.
5. A worker whose supervisor dies (``kill -9``) drains as on SIGTERM and is
   gone within ``--graceful-timeout`` + :data:`KILL_MARGIN` of that death,
   the bound the supervisor itself would have enforced -- also when its
   event loop is wedged (a write to a stderr pipe nobody reads any more
   blocks it, and a SIGTERM then only interrupts that write, which is
   retried).  The supervisor holds one end of a socket pair and every worker
   the other: a thread of the worker's own (:func:`_watch_supervisor`, not a
   trio task, so that a wedged loop cannot stop it) blocks on its end, and
   end-of-file there means the supervisor is gone.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence

import trio

from ..config import Settings
from ..logs import EventLogger

CRASH_WINDOW = 1.0
CRASH_BACKOFF = 1.0
#: Within ``--graceful-timeout`` + this, every worker has exited (killed if need be).
KILL_MARGIN = 1.5
#: The exit status of a worker that outlived its supervisor past its bound (rule 5).
ORPHAN_EXIT = 1

Process = multiprocessing.process.BaseProcess


def bind(settings: Settings) -> list[socket.socket]:
    """Bind the listening socket(s) once, for every worker to inherit."""
    infos = socket.getaddrinfo(
        settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(4096)
    sock.set_inheritable(True)
    return [sock]


def _worker_main(settings: Settings, sockets: Sequence[socket.socket], link: socket.socket) -> None:
    """A worker process: one whole service on the inherited sockets, until
    a signal or its supervisor's death (rule 5)."""
    from .signals import tune_gc

    bound = settings.graceful_timeout + KILL_MARGIN
    threading.Thread(
        target=_watch_supervisor, args=(link, bound), name="watch-supervisor", daemon=True
    ).start()
    tune_gc()
    trio.run(_worker, settings, sockets)


async def _worker(settings: Settings, sockets: Sequence[socket.socket]) -> None:
    from .signals import serve_until_signal  # the supervisor itself never loads the app

    await serve_until_signal(settings, sockets)


def _watch_supervisor(link: socket.socket, bound: float) -> None:
    """Rule 5, in a thread: wait for end-of-file on ``link`` (the supervisor's
    end closes when it dies, however it dies), then drain as on SIGTERM (by
    this process's own pid) and, if the process is still there ``bound``
    seconds later, end it.  Nothing here waits on the event loop or writes
    to stderr, either of which may be what is stuck."""
    link.setblocking(True)
    try:
        while link.recv(1):  # the supervisor never writes: only its end closing wakes this
            pass
    except OSError:
        pass  # a reset: the supervisor is gone all the same
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(bound)
    os._exit(ORPHAN_EXIT)


class Supervisor:
    """Starts, restarts and stops the worker processes (rules 1-3)."""

    def __init__(self, settings: Settings, logger: EventLogger) -> None:
        self.settings = settings.replace(workers=1)
        self.count = settings.workers
        self.logger = logger
        self.sockets = bind(settings)
        self.port = int(self.sockets[0].getsockname()[1])
        self.stopping = False
        self._context = multiprocessing.get_context("spawn")
        # Rule 5: this process keeps one end (never written, never passed to a
        # worker) and every worker gets the other; ours closes when we die.
        self._link, self._worker_link = socket.socketpair()
        self._live: set[Process] = set()
        self._exited = trio.lowlevel.ParkingLot()

    def _spawn(self) -> Process:
        process = self._context.Process(
            target=_worker_main,
            args=(self.settings, self.sockets, self._worker_link),
            daemon=False,
        )
        process.start()
        self._live.add(process)
        self.logger.event("worker_started", pid=process.pid, port=self.port)
        return process

    async def run(self) -> None:
        """Supervise until a signal, then drain every worker (rule 3).

        Cancellation: a ``Cancelled`` stops supervising at once: the workers are neither
        signalled nor killed and the sockets stay open; a worker drains and exits by itself once
        this process is gone (rule 5).
        """
        async with trio.open_nursery() as nursery:
            for _ in range(self.count):
                nursery.start_soon(self._keep, self._spawn())
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        break
                    self._forward(signal.SIGHUP)  # each worker reloads its keys
            self.stopping = True
            self._forward(signal.SIGTERM)
            with trio.move_on_after(self.settings.graceful_timeout + KILL_MARGIN):
                while self._live:
                    await self._exited.park()
            for process in list(self._live):
                self.logger.event("worker_killed", pid=process.pid)
                process.kill()
                process.join(1)
            nursery.cancel_scope.cancel()
        for sock in (*self.sockets, self._link, self._worker_link):
            sock.close()
        self.logger.event("shutdown_complete", workers=self.count)

    def _forward(self, signum: int) -> None:
        for process in list(self._live):
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signum)

    async def _keep(self, process: Process) -> None:
        """Wait for one worker to exit; restart it unless stopping (rule 2)."""
        while True:
            started = trio.current_time()
            await trio.lowlevel.wait_readable(process.sentinel)
            process.join()
            self._live.discard(process)
            self._exited.unpark_all()
            if self.stopping:
                return
            self.logger.event("worker_exited", pid=process.pid, exitcode=process.exitcode)
            if trio.current_time() - started < CRASH_WINDOW:
                await trio.sleep(CRASH_BACKOFF)
            if self.stopping:
                return
            process = self._spawn()
            self.logger.event("worker_restarted", pid=process.pid)


def run(settings: Settings) -> None:
    """``trio-stream serve --workers N`` (N > 1): supervise until a signal."""
    supervisor = Supervisor(settings, EventLogger(settings.log_format))
    trio.run(supervisor.run)
