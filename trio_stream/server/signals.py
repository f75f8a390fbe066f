"""Serve until SIGTERM or SIGINT: the process's outermost task.

Ownership::

    serve_until_signal(settings)      one nursery
    ├── on_signal                     SIGTERM/SIGINT -> shutdown.set(); SIGHUP -> a reload
    └── serve(settings, shutdown)     (its body) returns after the graceful shutdown

Used by ``trio-stream serve`` and by each ``--workers`` worker process.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import socket
from collections.abc import Sequence

import trio

from ..config import Settings
from .serve import serve

#: The serving process's cyclic-GC thresholds (CPython's default: 700, 10, 10).
GC_THRESHOLDS = (7000, 10, 10)


def tune_gc() -> None:
    """The serving process's garbage collector (docs/design.md section 15).

    With 1,000 paced streams, CPython's cyclic collector took 11-20% of the
    server's CPU: a collection every 700 net container allocations (a token
    allocates several: outcome values, coroutine frames), each generation-2
    pass walking every object the process ever imported.  ``gc.freeze()``
    moves what exists after start-up (modules, the app, the service) out of
    the collector's reach, and a young generation ten times larger collects
    ten times less often.  Memory is still reclaimed by reference counting;
    only cycles wait longer.  The library (``open_service``) leaves an
    embedder's collector alone: ``trio-stream serve`` and each ``--workers``
    worker call this before ``trio.run``.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve_until_signal(settings: Settings, sockets: Sequence[socket.socket] = ()) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully.

    Cancellation: as :func:`~trio_stream.server.serve.serve` (an abrupt stop; every run still
    saves).
    """
    shutdown = trio.Event()
    # SIGHUP: reload the configuration file's keys.  One pending reload is
    # enough: it reads the file as it is when it runs.
    reload_send, reloads = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        shutdown.set()
                    else:
                        with contextlib.suppress(trio.WouldBlock):
                            reload_send.send_nowait(None)

        nursery.start_soon(on_signal)
        await serve(settings, shutdown=shutdown, sockets=sockets, reloads=reloads)
        nursery.cancel_scope.cancel()
