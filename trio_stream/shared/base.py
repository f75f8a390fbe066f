"""The shared state of runs: one interface, an in-process and a Redis backend.

What one process used to keep in its own memory -- which run is a session's
current one, where a run lives, how to stop it, and what a detached run has
said so far -- is what several processes must agree on to keep the promises of
docs/api.md section 3 when a request may land on any of them.  This module
states those promises once, as the interface :class:`SharedState`; the
in-process backend (:mod:`trio_stream.shared.local`, the embedded default) and
the Redis backend (:mod:`trio_stream.shared.redis`) implement it, and one
contract suite (``tests/test_shared_contract.py``) runs against both.

Guarantees every backend gives:

G1 (claim)    :meth:`SharedState.claim` is atomic.  When it returns, the new
              run is the session's current run, its epoch is greater than the
              epoch of every earlier claim of the session, and the returned
              predecessors are exactly the session's live, unfenced runs.
G2 (release)  A run leaves its session only by its own id
              (compare-and-delete): releasing an old run never removes its
              successor, whatever the order, however late.
G3 (fence)    A fenced run is no longer anybody's predecessor; its release
              still removes only itself, and tells the caller it was fenced.
G4 (cancel)   :meth:`SharedState.cancel` reaches the run's owner wherever it
              runs, and is idempotent.  A lost message does not lose the
              cancel: the owner also finds it when its listener subscribes
              again, and by polling (Redis pub/sub delivers only to a
              subscribed connection).
G5 (finished) :meth:`SharedState.wait_finished` returns once every given run
              has finished its cleanup, or at the deadline with those that
              have not.
G6 (registry) Any node can look up a run it does not own: its tenant,
              session, owner, status and (for a detached run) its log.
G7 (logs)     A detached run's log, read from any node, is the owner's log:
              the same entries with the same sequence numbers, then its
              outcome.

Failure modes of a distributed backend are named where they are handled
(:mod:`trio_stream.shared.redis`).  A backend that cannot reach its store
raises :class:`SharedUnavailable`, which the HTTP layer answers with 503 and
``Retry-After``.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..core.log import Chunk, Entry, Outcome, RunLog
from ..core.sessions import SessionKey as SessionKey
from ..errors import TrioStreamError
from ..wire.request import ChatRequest


class SharedUnavailable(TrioStreamError):
    """The shared store cannot be reached now (the caller answers 503)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """What :meth:`SharedState.claim` returns (G1)."""

    epoch: int
    predecessors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """What any node knows about a run it may not own (G6)."""

    id: str
    tenant: str
    session_id: str | None
    node: str
    detached: bool
    status: str  # running | completed | cancelled | failed
    reason: str | None
    model: str = ""
    created: float = 0.0
    #: The request asked for ``stream_options.include_usage`` (a follower then
    #: gets the usage chunks as the starter's client does).
    include_usage: bool = False


@dataclass(frozen=True, slots=True)
class LogPage:
    """A slice of a shared log (G7): entries after a cursor, then maybe the end."""

    entries: Sequence[Entry]
    outcome: Outcome | None
    error: dict[str, Any] | None = None
    #: With the end: the chunks after the upstream's finish chunk (RunLog.tail).
    tail: Sequence[Chunk] = ()


class Flag(Protocol):
    """A set-once flag with a wait (a run's ``done``)."""

    def is_set(self) -> bool: ...

    async def wait(self) -> None:
        """Cancellation: a checkpoint; a ``Cancelled`` leaves nothing behind."""


class RunView(Protocol):
    """What the shared state reads of a run.  The runs layer's ``Run`` has
    this shape; the shared state sits below that layer, so it names the
    shape rather than importing the class."""

    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def session_id(self) -> str | None: ...
    @property
    def session_key(self) -> SessionKey | None: ...
    @property
    def request(self) -> ChatRequest: ...
    @property
    def detached(self) -> bool: ...
    @property
    def created(self) -> float: ...
    @property
    def epoch(self) -> int: ...
    @property
    def log(self) -> RunLog: ...
    @property
    def done(self) -> Flag: ...

    def fence(self) -> None:
        """Stop the run's log for good: it appends and emits nothing more."""

    def poke(self) -> None:
        """Wake whoever waits on the run's log (:meth:`wait_changed`)."""

    def wait_changed(self) -> Awaitable[None]:
        """Wait until the log grows, the run ends or :meth:`poke` is called."""


class Owner(Protocol):
    """The node-local side a backend calls back into (the run manager)."""

    def cancel_local(self, run_id: str, reason: str) -> bool:
        """Cancel a run this node owns; False if unknown here or already ended."""

    def local_run(self, run_id: str) -> RunView | None:
        """The run, if this node owns it and still holds it."""

    async def adopt_lost(self, node: str, records: list[RunRecord]) -> None:
        """End the runs of a node that was lost (saving what can be saved).

        Cancellation: the saves are shielded; a ``Cancelled`` between runs leaves the rest to a
        later takeover.
        """


class SharedState(abc.ABC):
    """The session table, run registry, cancel signals and detached logs.

    Cancellation: every method is cancellable; one cancelled mid-way leaves
    the shared state as if it had either happened or not (each write is one
    atomic step of the backend).
    """

    #: This node's id (unique per process): the owner of the runs it drives.
    node: str
    #: Does :meth:`ship` need a task per detached run (a remote log)?
    ships_logs: bool = False

    def attach(self, owner: Owner) -> None:
        self.owner = owner

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (listeners, leases) until cancelled.

        Cancellation: runs until cancelled; a ``Cancelled`` stops the background work and leaves
        the shared store as it was.
        """
        task_status.started()
        await trio.sleep_forever()

    @property
    def healthy(self) -> bool:
        """False while the store is unreachable (``/healthz`` says degraded)."""
        return True

    # -- upstream members' cooldowns (docs/api.md section 1.3) ------------------
    #: Are cooldowns shared with other nodes (a task then syncs them)?
    shares_cooldowns: bool = False

    async def share_cooldowns(self, cooldowns: Mapping[str, float]) -> None:
        """Tell every node that these upstream members cool down for these
        seconds (never shortening a cooldown under way).  In-process: no one
        to tell.  Cancellation: atomic per member (see the class).
        """
        return None

    async def cooldowns(self, members: Sequence[str]) -> dict[str, float]:
        """The ``members`` cooling down cluster-wide, with the seconds left.
        Cancellation: reads only; a ``Cancelled`` leaves nothing behind.
        """
        return {}

    # -- sessions (G1-G3) ---------------------------------------------------
    @abc.abstractmethod
    async def claim(self, key: SessionKey, run_id: str) -> Claim:
        """G1.  Cancellation: see the class: a ``Cancelled`` leaves the claim made or not made,
        never half made.
        """

    @abc.abstractmethod
    async def fence(self, key: SessionKey, run_id: str) -> None:
        """G3.  Cancellation: see the class (atomic)."""

    @abc.abstractmethod
    async def release(self, key: SessionKey, run_id: str) -> bool:
        """Remove ``run_id`` from its session (G2).  Returns True if it had
        been fenced (G3).

        Cancellation: see the class (atomic).
        """

    @abc.abstractmethod
    async def current(self, key: SessionKey) -> str | None:
        """The session's current run.  Cancellation: see the class (a read)."""

    @abc.abstractmethod
    async def live(self, key: SessionKey) -> dict[str, bool]:
        """The session's live runs, id -> fenced.

        Cancellation: see the class (a read).
        """

    # -- cancel and completion (G4, G5) ---------------------------------------
    @abc.abstractmethod
    async def cancel(self, run_id: str, reason: str) -> None:
        """G4.  Cancellation: see the class: the cancel request is sent or not."""

    @abc.abstractmethod
    async def wait_finished(self, run_ids: Sequence[str], grace: float) -> tuple[str, ...]:
        """Wait up to ``grace`` seconds; return the ids that have not finished.

        Cancellation: cancellable while it waits; a ``Cancelled`` leaves nothing behind.
        """

    # -- registry and logs (G6, G7) -------------------------------------------
    async def register(self, run: RunView) -> None:
        """Publish a new run (a no-op where every run is local).

        Cancellation: see the class (atomic).
        """
        return None

    async def finished(self, run: RunView) -> None:
        """The owner's cleanup of ``run`` is over (after its save).

        Cancellation: see the class (atomic).
        """
        return None

    async def lookup(self, run_id: str) -> RunRecord | None:
        """A run owned elsewhere, or None (always None in-process).

        Cancellation: see the class (a read).
        """
        return None

    async def read_log(self, run_id: str, cursor: int, *, wait: bool) -> LogPage:
        """A remote detached run's log after ``cursor``; with ``wait``, block
        a while for more when there is none yet.

        Cancellation: see the class (a read).
        """
        return LogPage((), None)

    async def ship(self, run: RunView) -> None:
        """Copy a detached run's log to the shared store until it ends.

        Cancellation: a ``Cancelled`` stops the copy; what was shipped stays.
        """
        return None

    async def end_lost(self, record: RunRecord, last_seq: int) -> None:
        """End a lost node's run in the shared store (its log, record, session).

        Cancellation: each step is atomic and idempotent; a ``Cancelled`` between them is
        finished by the next takeover.
        """
        return None

    async def leave(self) -> None:
        """This node stops (after its runs ended): give up its lease now.

        Cancellation: a ``Cancelled`` leaves the lease to expire by itself (``--node-lease``).
        """
        return None
