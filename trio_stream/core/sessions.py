"""The session table: who is the current run of each session -- sans-IO.

Sessions are keyed by ``(tenant, session_id)``: two API keys never share one.

Rule 1: a session has at most one *current* run.  :meth:`SessionTable.claim`
        makes the new run current at once and returns every earlier run of the
        session that has not finished yet: the caller cancels them and awaits
        their cleanup (with a deadline) before it opens its upstream request.
Rule 2: a run leaves the table only by its own id (compare-and-delete):
        :meth:`release` of an old run never removes its successor.  This is the
        rule whose absence made a peer delete its successor's entry and hang.
Rule 3: a predecessor still running when the deadline passes is *fenced*: it
        stays in the table until it finishes, but it is no longer anybody's
        predecessor to wait for, and the trio layer stops it from emitting or
        saving over the current run.
Rule 4: a session with no current run and no live run is forgotten, so the
        table's size is bounded by the live runs.

This module never imports trio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SessionKey = tuple[str, str]


@dataclass(slots=True)
class _Session:
    current: str | None = None
    # live run id -> fenced?
    live: dict[str, bool] = field(default_factory=dict)


class SessionTable:
    def __init__(self) -> None:
        self._sessions: dict[SessionKey, _Session] = {}

    def claim(self, key: SessionKey, run_id: str) -> tuple[str, ...]:
        """Rule 1: make ``run_id`` current; return its unfenced live predecessors."""
        session = self._sessions.setdefault(key, _Session())
        if run_id in session.live:
            raise ValueError(f"run {run_id} already claimed {key}")
        previous = tuple(r for r, fenced in session.live.items() if not fenced)
        session.current = run_id
        session.live[run_id] = False
        return previous

    def fence(self, key: SessionKey, run_id: str) -> bool:
        """Rule 3: mark a straggler.  Returns False if it had already finished."""
        session = self._sessions.get(key)
        if session is None or run_id not in session.live:
            return False
        session.live[run_id] = True
        return True

    def release(self, key: SessionKey, run_id: str) -> None:
        """Rule 2: remove ``run_id`` and clear ``current`` only if it is this run."""
        session = self._sessions.get(key)
        if session is None:
            return
        session.live.pop(run_id, None)
        if session.current == run_id:
            session.current = None
        if session.current is None and not session.live:
            del self._sessions[key]  # rule 4

    def current(self, key: SessionKey) -> str | None:
        session = self._sessions.get(key)
        return None if session is None else session.current

    def is_fenced(self, key: SessionKey, run_id: str) -> bool:
        session = self._sessions.get(key)
        return bool(session and session.live.get(run_id))

    def live(self, key: SessionKey) -> dict[str, bool]:
        """A copy of the session's live runs (id -> fenced), for checks and tests."""
        session = self._sessions.get(key)
        return dict(session.live) if session else {}

    def __len__(self) -> int:
        return len(self._sessions)
