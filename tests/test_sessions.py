"""Plain synchronous tests of the session table (trio_stream/core/sessions.py)."""

from __future__ import annotations

import pytest

from trio_stream.core.sessions import SessionKey, SessionTable

A: SessionKey = ("tenant-a", "s1")
B: SessionKey = ("tenant-b", "s1")  # same session id, other API key


def test_first_claim_has_no_predecessors() -> None:
    """Rule 1: the first run of a session becomes current with nothing to wait for."""
    table = SessionTable()
    assert table.claim(A, "r1") == ()
    assert table.current(A) == "r1"
    assert table.live(A) == {"r1": False}


def test_claim_returns_every_unfinished_predecessor() -> None:
    """Rule 1: a new claim becomes current at once and returns every earlier
    run of the session that has not finished, oldest first."""
    table = SessionTable()
    table.claim(A, "r1")
    assert table.claim(A, "r2") == ("r1",)
    assert table.claim(A, "r3") == ("r1", "r2")
    assert table.current(A) == "r3"
    table.release(A, "r1")
    assert table.claim(A, "r4") == ("r2", "r3")


def test_claiming_twice_is_a_bug() -> None:
    """A run id claims its session once; a second claim raises."""
    table = SessionTable()
    table.claim(A, "r1")
    with pytest.raises(ValueError, match="already claimed"):
        table.claim(A, "r1")


def test_tenants_never_share_a_session() -> None:
    """Sessions are keyed by (tenant, session id): the same id under another
    API key is another session, with no predecessor."""
    table = SessionTable()
    table.claim(A, "r1")
    assert table.claim(B, "r2") == ()
    assert table.current(A) == "r1"
    assert table.current(B) == "r2"
    assert len(table) == 2


def test_old_runs_finish_never_removes_its_successor() -> None:
    """Rule 2 (compare-and-delete): the superseded run's finish leaves the
    successor current and live."""
    table = SessionTable()
    table.claim(A, "old")
    table.claim(A, "new")
    table.release(A, "old")
    assert table.current(A) == "new"
    assert table.live(A) == {"new": False}


def test_current_runs_finish_leaves_unfinished_predecessors_live() -> None:
    """Rule 2: the current run finishing first clears `current` but keeps a
    predecessor that has not finished; the session goes when that one does."""
    table = SessionTable()
    table.claim(A, "old")
    table.claim(A, "new")
    table.release(A, "new")
    assert table.current(A) is None
    assert table.live(A) == {"old": False}
    assert len(table) == 1
    table.release(A, "old")
    assert len(table) == 0


def test_fenced_predecessor_is_nobodys_predecessor() -> None:
    """Rule 3: a fenced straggler stays live (it has not finished) but later
    claims no longer wait for it."""
    table = SessionTable()
    table.claim(A, "r1")
    table.claim(A, "r2")
    assert table.fence(A, "r1") is True
    assert table.is_fenced(A, "r1")
    assert not table.is_fenced(A, "r2")
    assert table.live(A) == {"r1": True, "r2": False}
    assert table.claim(A, "r3") == ("r2",)


@pytest.mark.parametrize(
    ("key", "run_id"),
    [(A, "finished"), (A, "never-claimed"), (("nobody", "x"), "r1")],
    ids=["already-finished", "unknown-run", "unknown-session"],
)
def test_fence_of_a_run_that_is_not_live(key: SessionKey, run_id: str) -> None:
    """Rule 3: fencing a run that already finished (or never was) returns
    False and changes nothing; in particular it creates no session."""
    table = SessionTable()
    table.claim(A, "finished")
    table.claim(A, "current")
    table.release(A, "finished")
    before = (len(table), table.live(A), table.current(A))
    assert table.fence(key, run_id) is False
    assert (len(table), table.live(A), table.current(A)) == before
    assert not table.is_fenced(key, run_id)


def test_fenced_run_leaves_by_its_own_id() -> None:
    """Rules 2 and 3: a fenced straggler's finish removes only itself."""
    table = SessionTable()
    table.claim(A, "old")
    table.claim(A, "new")
    table.fence(A, "old")
    table.release(A, "old")
    assert table.current(A) == "new"
    assert table.live(A) == {"new": False}


@pytest.mark.parametrize(
    "finish_order",
    [("r1", "r2", "r3"), ("r3", "r2", "r1"), ("r2", "r3", "r1"), ("r1", "r3", "r2")],
    ids=lambda order: "-".join(order),
)
def test_table_forgets_empty_sessions(finish_order: tuple[str, ...]) -> None:
    """Rule 4: whatever the order the runs finish in, the session is forgotten
    exactly when its last live run finishes, so size is bounded by live runs."""
    table = SessionTable()
    for r in ("r1", "r2", "r3"):
        table.claim(A, r)
    for i, r in enumerate(finish_order, start=1):
        assert len(table) == 1
        table.release(A, r)
        assert r not in table.live(A)
        assert (table.current(A) == "r3") == ("r3" not in finish_order[:i])
    assert len(table) == 0
    assert table.current(A) is None
    assert table.live(A) == {}


def test_finish_is_idempotent_and_tolerates_unknown_keys() -> None:
    """finish of an unknown session or an already finished run is a no-op."""
    table = SessionTable()
    table.release(A, "r1")
    table.claim(A, "r1")
    table.claim(A, "r2")
    table.release(A, "r1")
    table.release(A, "r1")
    assert table.current(A) == "r2"
    assert len(table) == 1


def test_live_returns_a_copy() -> None:
    """live() is a snapshot: mutating it cannot corrupt the table."""
    table = SessionTable()
    table.claim(A, "r1")
    table.live(A)["r1"] = True
    table.live(A).clear()
    assert table.live(A) == {"r1": False}
