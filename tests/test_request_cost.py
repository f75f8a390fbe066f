"""Per-request work the run lifecycle skips, and what it still does.

Each test states an invariant that a per-request cost cut must keep.
"""

from __future__ import annotations

import io
from pathlib import Path

import orjson

from trio_stream.config import Settings
from trio_stream.logs import EventLogger, RecordingSink
from trio_stream.metrics import Metrics
from trio_stream.runs import RunManager
from trio_stream.shared import LocalState, RunView
from trio_stream.store import open_store
from trio_stream.upstream.mock import MockUpstream
from trio_stream.wire.request import parse_chat_request

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                     "max_tokens": 3})  # fmt: skip


class Listening(LocalState):
    """The in-process backend, plus a ``finished`` that records its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.finished_runs: list[str] = []

    async def finished(self, run: RunView) -> None:
        self.finished_runs.append(run.id)


def manager(tmp_path: Path, shared: LocalState, sink: RecordingSink) -> RunManager:
    tmp_path.mkdir()
    settings = Settings(port=0, db=str(tmp_path / "t.db"), mock_delay_ms=0)
    store = open_store(settings.db, threaded=False)
    logger = EventLogger(stream=io.StringIO(), sink=sink)
    return RunManager(settings, MockUpstream(0), store, Metrics(), logger, shared)


async def test_finish_step_only_for_a_backend_that_overrides_it(tmp_path: Path) -> None:
    """The cleanup's "finished" step (a shielded, deadlined scope) is skipped
    for a backend whose ``finished`` is the base no-op (in-process); a backend
    that overrides it is called exactly once per run, after the save, and the
    run still ends saved and done either way."""
    for shared, announces in ((LocalState(), False), (Listening(), True)):
        sink = RecordingSink()
        runs = manager(tmp_path / type(shared).__name__, shared, sink)
        assert runs._announces_finish is announces
        run = await runs.create("public", "s1", parse_chat_request(BODY))
        await runs.drive(run)
        assert run.done.is_set()
        assert run.log.last_seq == 3
        assert await runs.store.count(run.id) == 1
        assert runs.live == 0
        assert shared.sessions.live(("public", "s1")) == {}
        if isinstance(shared, Listening):
            assert shared.finished_runs == [run.id]
