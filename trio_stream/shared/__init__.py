"""Shared state of runs behind one interface (see :mod:`.base`)."""

from .base import Claim, LogPage, Owner, RunRecord, SessionKey, SharedState, SharedUnavailable
from .local import LocalState

__all__ = [
    "Claim",
    "LocalState",
    "LogPage",
    "Owner",
    "RunRecord",
    "SessionKey",
    "SharedState",
    "SharedUnavailable",
]
