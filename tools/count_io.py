"""Run ``trio-stream`` with counters on its event loop and its upstream reads.

    python tools/count_io.py serve --config members.toml ...   # the arguments of trio-stream

Counts, in the server process itself (a few integer additions per call, no
tracing, so the server's batching is left as it is):

* ``polls``: calls of trio's ``epoll.poll``; ``wakeups``: those that waited
  (timeout > 0) and came back with events; ``events``: file descriptors
  reported ready by all polls;
* ``upstream_reads`` / ``upstream_bytes``: :meth:`UpstreamConnection.receive`
  calls (one ``recv`` each) and the bytes they returned.

On ``SIGUSR2`` it writes the counters so far as one JSON line to the file named
by ``$COUNT_IO_OUT`` (appending): the bench takes one line before its load and
one after, and uses the differences (``tools/bench.py --count-io``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from trio._core._io_epoll import EpollIOManager

from trio_stream import cli
from trio_stream.upstream import h1

COUNTS: Counter[str] = Counter()


def _install() -> None:
    poll = EpollIOManager.get_events
    receive = h1.UpstreamConnection.receive

    def get_events(self: EpollIOManager, timeout: float) -> Any:
        events = poll(self, timeout)
        COUNTS["polls"] += 1
        COUNTS["events"] += len(events)
        if timeout > 0 and events:
            COUNTS["wakeups"] += 1
        return events

    async def counted_receive(self: h1.UpstreamConnection) -> bytes:
        data = await receive(self)
        COUNTS["upstream_reads"] += 1
        COUNTS["upstream_bytes"] += len(data)
        return data

    EpollIOManager.get_events = get_events  # type: ignore[method-assign]
    h1.UpstreamConnection.receive = counted_receive  # type: ignore[method-assign]


def _dump(_signum: int, _frame: FrameType | None) -> None:
    with Path(os.environ["COUNT_IO_OUT"]).open("a") as out:
        out.write(json.dumps(dict(COUNTS)) + "\n")


def main() -> None:
    _install()
    signal.signal(signal.SIGUSR2, _dump)
    sys.argv[0] = "trio-stream"
    cli.main(prog_name="trio-stream")


if __name__ == "__main__":
    main()
