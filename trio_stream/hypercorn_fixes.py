"""Fixes for hypercorn 0.18.0 bugs that break trio-stream's promises.

Applied by :func:`trio_stream.serve_service` (and idempotent), not at import:
importing trio_stream changes nothing.  They patch hypercorn for the whole
process, which is what a fix of the library itself would do -- so they are
applied only to the version they were written for (:data:`FIXED_VERSION`).
On any other version hypercorn is left alone and the event
``hypercorn_fix_skipped`` is logged: the tests named below then say whether
the new version still needs a fix.

1. ``StreamBuffer.pop`` (``hypercorn/protocol/h2.py``) resumes a paused
   writer whenever the popped chunk is small.  Once a client stops reading,
   its HTTP/2 flow-control window is 0, every pop returns 0 bytes, and so the
   app's ``send`` never blocks: the per-stream buffer grows without bound and
   the ``--stall-timeout`` deadline on HTTP/2 never fires.  Measured: 2 s into
   a never-read stream, ~2 MB had been queued for a client that had taken
   64 KiB.  The fixed ``pop`` resumes the writer only once the buffer is below
   its low-water mark.  Without it ``tests/test_stall.py`` (HTTP/2 cases)
   fails; ``tests/test_hypercorn_fixes.py`` fails once hypercorn's own ``pop``
   no longer has the bug.  (The same flaw was raised on the anycorn fork,
   PR #61.)
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from hypercorn.protocol import h2 as _h2

from .logs import EventLogger

#: The hypercorn release whose code these fixes replace.
FIXED_VERSION = "0.18.0"

#: hypercorn's own ``StreamBuffer.pop``, as imported (before any patch).
original_pop = _h2.StreamBuffer.pop


async def _pop(self: Any, max_length: int) -> bytes:
    """``StreamBuffer.pop``, resuming the writer on what is *left*."""
    length = min(len(self.buffer), max_length)
    data = bytes(self.buffer[:length])
    del self.buffer[:length]
    if len(self.buffer) < _h2.BUFFER_LOW_WATER:
        await self._paused.set()
    if not self.buffer:
        await self._is_empty.set()
    return data


def hypercorn_version() -> str:
    """The installed hypercorn's version string."""
    return metadata.version("hypercorn")


def apply(logger: EventLogger | None = None) -> bool:
    """Install the fixes if hypercorn is :data:`FIXED_VERSION` (idempotent).

    On any other version, change nothing and log ``hypercorn_fix_skipped``
    through ``logger`` (a default :class:`~trio_stream.logs.EventLogger` on
    stderr if none is given).  Returns whether the fixes are installed.
    """
    found = hypercorn_version()
    if found != FIXED_VERSION:
        (logger or EventLogger()).event(
            "hypercorn_fix_skipped", fix="StreamBuffer.pop", hypercorn=found,
            written_for=FIXED_VERSION,
        )  # fmt: skip
        return False
    _h2.StreamBuffer.pop = _pop  # type: ignore[method-assign]
    return True


def applied() -> bool:
    return _h2.StreamBuffer.pop is _pop
