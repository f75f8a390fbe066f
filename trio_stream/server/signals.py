"""Serve until SIGTERM or SIGINT: the process's outermost task.

Ownership::

    serve_until_signal(settings)      one nursery
    ├── on_signal                     SIGTERM/SIGINT -> shutdown.set()
    └── serve(settings, shutdown)     (its body) returns after the graceful shutdown

Used by ``trio-stream serve`` and by each ``--workers`` worker process.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Sequence

import trio

from ..config import Settings
from .serve import serve


async def serve_until_signal(settings: Settings, sockets: Sequence[socket.socket] = ()) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully.

    Cancellation: as :func:`~trio_stream.server.serve.serve` (an abrupt stop; every run still
    saves).
    """
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    shutdown.set()

        nursery.start_soon(on_signal)
        await serve(settings, shutdown=shutdown, sockets=sockets)
        nursery.cancel_scope.cancel()
