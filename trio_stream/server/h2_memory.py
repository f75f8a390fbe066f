"""Smaller per-connection state in the ``h2`` and ``hpack`` libraries.

Every HTTP/2 connection holds two ``h2.settings.Settings`` (ours and the
peer's) and two HPACK header tables (the encoder's and the decoder's).
``Settings`` keeps each setting's values in a ``collections.deque`` (the
current value first, then values sent and not yet acknowledged), and a
header table its dynamic entries in one: a ``deque`` is at least one block
of 64 slots, about 760 bytes, to hold one or two values.  An idle stream
over h2c held some 14 of them, 11 KB, more than everything else of the
stream (``tools/measure_idle.py --h2 --trace``, docs/design.md section 16).

:func:`apply` gives both modules :class:`Values` in place of ``deque``: a
``list`` with the two ``deque`` methods they call that a list lacks
(``appendleft``, ``popleft``).  Everything else they do with one --
``append``, ``pop``, ``clear``, ``len``, indexing, iterating, ``==`` --
a list does the same.  The lists are short (a setting: one value, two while
a change is unacknowledged; a header table: its entries, at most the
table's 4,096 bytes), so a ``list.insert(0, ...)`` costs nothing a deque
would save.

Applied by :func:`trio_stream.server.serve.serve_service` (idempotent), for
the whole process -- ``h2`` in a client in this process gets the lists too,
with the same behaviour -- and only to the versions it was written for
(:data:`WRITTEN_FOR`): on any other, the modules are left alone and
``h2_memory_skipped`` is logged.  ``tests/test_idle_memory.py`` pins the
functions of ``h2`` and ``hpack`` that make these containers, and checks
that the lists behave as the deques did.
"""

from __future__ import annotations

import types
from importlib import metadata
from typing import TypeVar

import h2.settings
import hpack.table

from ..logs import EventLogger

T = TypeVar("T")

#: The versions whose use of ``deque`` was read (see the module docstring).
WRITTEN_FOR = {"h2": "4.4.1", "hpack": "4.2.0"}


class Values(list[T]):
    """A ``list`` with ``deque``'s ``appendleft`` and ``popleft``."""

    __slots__ = ()

    def appendleft(self, item: T) -> None:
        self.insert(0, item)

    def popleft(self) -> T:
        return self.pop(0)


#: What ``h2.settings`` reads as its ``collections`` module (it uses only ``deque``).
_COLLECTIONS = types.SimpleNamespace(deque=Values)


def apply(logger: EventLogger | None = None) -> bool:
    """Give ``h2.settings`` and ``hpack.table`` :class:`Values` for ``deque``
    if they are the versions of :data:`WRITTEN_FOR` (idempotent); else
    change nothing and log ``h2_memory_skipped``.  Returns whether applied."""
    found = {name: metadata.version(name) for name in WRITTEN_FOR}
    if found != WRITTEN_FOR:
        (logger or EventLogger()).event("h2_memory_skipped", found=found, written_for=WRITTEN_FOR)
        return False
    # setattr/getattr: neither module exports these names (mypy --strict).
    setattr(h2.settings, "collections", _COLLECTIONS)  # noqa: B010
    setattr(hpack.table, "deque", Values)  # noqa: B010
    return True


def applied() -> bool:
    """Whether :func:`apply` is in effect."""
    made = getattr(h2.settings, "collections"), getattr(hpack.table, "deque")  # noqa: B009
    return made == (_COLLECTIONS, Values)
